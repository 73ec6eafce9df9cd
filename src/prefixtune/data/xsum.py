"""XSum (Narayan et al. 2018): BBC articles with one-sentence summaries.

Local files: a folder ``<data>/xsum/`` (the full release) or ``<data>/xsum_sample/``
holding ``*.data`` files from the XSum extraction scripts::

    [XSUM]URL[XSUM]            http://www.bbc.co.uk/news/uk-wales-12345678
    [XSUM]INTRODUCTION[XSUM]   the summary (the reference)
    [XSUM]RESTBODY[XSUM]       the article (the source)

``*.summary`` files of the original download (``[SN]URL[SN]``,
``[SN]FIRST-SENTENCE[SN]``, ``[SN]RESTBODY[SN]``) are read the same way. The
topic comes from the URL path (``/news/world-europe-...`` -> section "news",
topic "world-europe"; ``/sport/football/...`` -> "sport", "football"), also for
web.archive.org copies.

Schemes (the paper's extrapolation study, plus the official split):

* ``news-sport``: train/dev on news articles, test on sport articles.
* ``within-news``: train/dev on world, UK and business news, test on the other
  news topics (health, technology, entertainment-arts, ...).
* ``official``: the ids in ``XSum-TRAINING-DEV-TEST-SPLIT-90-5-5.json``.

In the two topic schemes dev is a fixed 5% of the training pool, chosen by a
hash of the article id (stable across machines and dataset orderings). Only the
``news`` section counts as news (``newsround``, ``newsbeat``, ``newyddion`` are
left out of both topic schemes). With a network and no local files,
``source="hub"`` (or ``"auto"``) loads the full XSum from the Hugging Face hub
via ``datasets``; the hub copy has no URLs, so it serves the official scheme only.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from .records import DATA_ENV, Record, resolve_data_dir

SCHEMES = ("news-sport", "within-news", "official")
SPLITS = ("train", "dev", "test")
SPLIT_ALIASES = {"validation": "dev", "valid": "dev", "val": "dev"}
SPLIT_FILE = "XSum-TRAINING-DEV-TEST-SPLIT-90-5-5.json"
LOCAL_FOLDERS = ("xsum", "xsum_sample")
HUB_DATASET = "EdinburghNLP/xsum"
DEV_PERCENT = 5
WITHIN_NEWS_TRAIN = ("world", "uk", "business")

_FIELD = re.compile(r"\[(?:XSUM|SN)\]([A-Z-]+)\[(?:XSUM|SN)\]")
_BBC_PATH = re.compile(r"bbc\.(?:co\.uk|com)(?::\d+)?/([^?#\s]*)")


def parse_article(text: str) -> dict:
    """Fields of one ``.data``/``.summary`` file: url, summary, article."""
    parts = _FIELD.split(text)
    fields = {name: body.strip() for name, body in zip(parts[1::2], parts[2::2])}
    summary = fields.get("INTRODUCTION", fields.get("FIRST-SENTENCE", ""))
    return {"url": fields.get("URL", ""), "summary": " ".join(summary.split()), "article": fields.get("RESTBODY", "")}


def url_topic(url: str) -> tuple[str, str]:
    """(section, topic) from a BBC URL: ("news", "world-europe"), ("sport", "football"), ("", "") if unknown."""
    matches = _BBC_PATH.findall(url or "")
    if not matches:
        return "", ""
    parts = [p for p in matches[-1].split("/") if p]
    if not parts:
        return "", ""
    section = parts[0].lower()
    topic = ""
    if len(parts) > 1:
        topic = re.sub(r"-?\d+$", "", parts[1].lower())  # "world-europe-12345678" -> "world-europe"
    return section, topic


def topic_group(topic: str) -> str:
    """world / uk / business for the within-news training topics, otherwise "other"."""
    for group in WITHIN_NEWS_TRAIN:
        if topic == group or topic.startswith(group + "-"):
            return group
    return "other"


def _in_dev(article_id: str) -> bool:
    return int(hashlib.md5(article_id.encode()).hexdigest(), 16) % 100 < DEV_PERCENT


def _local_folder(data_dir) -> Path | None:
    root = resolve_data_dir(data_dir, "xsum")
    for name in LOCAL_FOLDERS:
        folder = root / name
        if folder.is_dir():
            return folder
    return None


def _load_local(folder: Path) -> list[Record]:
    files = sorted(list(folder.rglob("*.data")) + list(folder.rglob("*.summary")), key=lambda p: (p.stem, str(p)))
    records, seen = [], set()
    for path in files:
        if path.stem in seen:
            continue
        seen.add(path.stem)
        fields = parse_article(path.read_text(encoding="utf-8", errors="replace"))
        if not fields["summary"] or not fields["article"]:
            continue
        section, topic = url_topic(fields["url"])
        records.append(Record(
            source=fields["article"],
            references=[fields["summary"]],
            meta={"id": path.stem, "url": fields["url"], "section": section, "topic": topic,
                  "group": topic_group(topic) if section == "news" else section or "unknown"},
        ))
    return records


def _official_ids(folder: Path | None, split: str) -> set[str]:
    candidates = list(folder.rglob(SPLIT_FILE)) if folder is not None else []
    if not candidates:
        raise FileNotFoundError(f"XSum official split file {SPLIT_FILE} not found under {folder}")
    with open(candidates[0], encoding="utf-8") as f:
        ids = json.load(f)
    key = {"train": "train", "dev": "validation", "test": "test"}[split]
    return {str(i) for i in ids[key]}


def _load_hub(split: str) -> list[Record]:
    try:
        import datasets  # optional: only users with a network need it
    except ImportError as exc:
        raise FileNotFoundError(
            f"no local XSum files and the `datasets` package is not installed: put XSum under "
            f"${DATA_ENV}/xsum/ or `pip install datasets` to load {HUB_DATASET} from the hub") from exc
    hub_split = {"train": "train", "dev": "validation", "test": "test"}[split]
    ds = datasets.load_dataset(HUB_DATASET, split=hub_split)
    return [Record(source=row["document"], references=[row["summary"]],
                   meta={"id": str(row["id"]), "url": None, "section": None, "topic": None, "group": None})
            for row in ds]


def load_xsum(split: str = "train", data_dir=None, scheme: str = "news-sport", source: str = "auto") -> list[Record]:
    """Records of XSum ``split`` (train|dev|test) under ``scheme`` (news-sport|within-news|official).

    ``source``: "local" (files under the data dir), "hub" (Hugging Face, needs a
    network and ``datasets``; official scheme only) or "auto" (local if present).
    meta: ``id``, ``url``, ``section``, ``topic``, ``group``. Deterministic: sorted by id.
    """
    split = SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"unknown XSum split {split!r}; choose one of {list(SPLITS)}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown XSum scheme {scheme!r}; choose one of {list(SCHEMES)}")
    if source not in ("auto", "local", "hub"):
        raise ValueError(f"unknown XSum source {source!r}; choose auto, local or hub")

    folder = None
    if source != "hub":
        try:
            folder = _local_folder(data_dir)
        except FileNotFoundError:
            if source == "local":
                raise
    if folder is None and source == "local":
        raise FileNotFoundError(f"no XSum folder ({' or '.join(LOCAL_FOLDERS)}) in the data directory")
    if folder is None:
        if scheme != "official":
            raise ValueError(f"XSum scheme {scheme!r} needs article URLs (for topics), which the hub copy lacks: "
                             f"put the raw XSum files under <data>/xsum/ or use scheme='official'")
        return _load_hub(split)

    records = _load_local(folder)
    if scheme == "official":
        ids = _official_ids(folder, split)
        chosen = [r for r in records if r.meta["id"] in ids]
    else:
        if scheme == "news-sport":
            pool = [r for r in records if r.meta["section"] == "news"]
            test = [r for r in records if r.meta["section"] == "sport"]
        else:
            news = [r for r in records if r.meta["section"] == "news"]
            pool = [r for r in news if r.meta["group"] in WITHIN_NEWS_TRAIN]
            test = [r for r in news if r.meta["group"] == "other"]
        if split == "test":
            chosen = test
        else:
            chosen = [r for r in pool if _in_dev(r.meta["id"]) == (split == "dev")]
    if not chosen:
        raise ValueError(f"XSum split {split!r} of scheme {scheme!r} is empty in {folder}"
                         + (" (the sample holds only official test articles)" if scheme == "official" else ""))
    return chosen
