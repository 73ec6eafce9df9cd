"""DART v1.1.1 (Nan, Radev et al. 2021): open-domain triple sets to text.

Files under ``<data>/dart/``: ``dart-v1.1.1-full-{train,dev,test}.json`` (the
release's JSON: ``tripleset`` as [subject, property, object] lists and
``annotations`` with ``text``) or the same split as WebNLG-style XML
(``dart-v1.1.1-full-test.xml``). Both are read into the same linearisation as
WebNLG, ``subject : property : object`` joined with `` | ``; as in the paper's
code (``read_triples_files``) the property is lowercased::

    Mars Hill College : joined : 1973 | Mars Hill College : location : Mars Hill, North Carolina

The shared data directory holds only dev (JSON) and test (XML). ``train`` then
raises a clear error; ``train_from="dev"`` (CLI ``--train-from dev``) returns
the dev records instead, which is how the tests train. With a network,
``download=True`` fetches the full release JSON from the DART GitHub repository
into the data directory (see ``download_dart``).
"""
from __future__ import annotations

import json
import random
import urllib.request
from pathlib import Path

from .records import Record, resolve_data_dir
from .webnlg import linearize_triples, parse_benchmark

SPLITS = ("train", "dev", "test")
RELEASE_URL = "https://raw.githubusercontent.com/Yale-LILY/dart/master/data/v1.1.1/dart-v1.1.1-full-{split}.json"
FILE_STEM = "dart-v1.1.1-full-{split}"


def _clean(text) -> str:
    return " ".join(str(text or "").split())


def _split_file(folder: Path, split: str) -> Path | None:
    for ext in (".json", ".xml"):
        path = folder / (FILE_STEM.format(split=split) + ext)
        if path.is_file():
            return path
    return None


def download_dart(data_dir=None, splits=SPLITS, timeout: float = 60.0) -> list[Path]:
    """Fetch the full DART v1.1.1 release JSON for ``splits`` into ``<data>/dart/`` (needs a network)."""
    folder = resolve_data_dir(data_dir, "dart") / "dart"
    paths = []
    for split in splits:
        target = folder / (FILE_STEM.format(split=split) + ".json")
        if target.is_file():
            paths.append(target)
            continue
        url = RELEASE_URL.format(split=split)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                payload = resp.read()
            json.loads(payload)  # refuse to store an error page
            tmp = target.with_suffix(".json.part")
            tmp.write_bytes(payload)
            tmp.replace(target)
        except (OSError, ValueError) as exc:
            raise OSError(f"could not download DART {split} from {url} into {folder}: {exc}") from exc
        paths.append(target)
    return paths


def _records_from_json(path: Path, lowercase_relations: bool) -> list[Record]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a DART JSON file ({e}): expected a JSON list of "
                         f'{{"tripleset": [[s, p, o], ...], "annotations": [{{"text": ...}}]}}') from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path} holds no DART examples: expected a non-empty JSON list")
    records = []
    for i, example in enumerate(data):
        try:
            triples = [(_clean(s), _clean(p), _clean(o)) for s, p, o in example["tripleset"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}, example {i}: expected a \"tripleset\" of [subject, property, object] "
                             f"lists, found keys {sorted(example) if isinstance(example, dict) else type(example).__name__}"
                             ) from None
        if lowercase_relations:
            triples = [(s, p.lower(), o) for s, p, o in triples]
        annotations = example.get("annotations", [])
        refs = [_clean(a.get("text")) for a in annotations if _clean(a.get("text"))]
        records.append(Record(
            source=linearize_triples(triples),
            references=refs,
            meta={"id": f"Id{i + 1}", "category": None, "size": len(triples),
                  "sources": [a.get("source") for a in annotations],
                  "subtree_was_extended": example.get("subtree_was_extended"),
                  "relations": [p for _, p, _ in triples]},
        ))
    return records


def _records_from_xml(path: Path, lowercase_relations: bool) -> list[Record]:
    records = []
    for entry in parse_benchmark(path):
        triples = entry["triples"]
        if lowercase_relations:
            triples = [(s, p.lower(), o) for s, p, o in triples]
        records.append(Record(
            source=linearize_triples(triples),
            references=[text for text, _ in entry["lexes"] if text],
            meta={"id": entry["eid"], "category": entry["category"], "size": entry["size"],
                  "sources": [comment for _, comment in entry["lexes"]],
                  "relations": [p for _, p, _ in triples]},
        ))
    return records


def load_dart(split: str = "train", data_dir=None, train_from: str | None = None,
              download: bool = False, lowercase_relations: bool = True, holdout: int = 0) -> list[Record]:
    """Records of DART v1.1.1 ``split`` (train|dev|test).

    ``train_from="dev"`` makes ``split="train"`` return the dev records (the
    shared data has no train split). ``holdout=N`` with it keeps the entries of
    N of its triple sets (drawn with seed 0) out of training: ``split="dev"``
    then returns exactly those, so dev loss is measured on inputs never trained on.
    ``download=True`` fetches missing splits of the full release first. meta:
    ``id``, ``category`` (XML only), ``size``, ``sources`` (annotation
    sources), ``relations``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown DART split {split!r}; choose one of {list(SPLITS)}")
    if holdout and train_from is None:
        raise ValueError("holdout applies with train_from (entries of that split kept out of training)")
    if train_from is not None:
        if train_from not in SPLITS:
            raise ValueError(f"train_from must be one of {list(SPLITS)}, got {train_from!r}")
        if split in ("train", "dev"):
            records = load_dart(train_from, data_dir, download=download, lowercase_relations=lowercase_relations)
            if split == "dev" and not holdout:
                return records
            if holdout >= len(records):
                raise ValueError(f"holdout {holdout} leaves no DART {train_from} entries to train on "
                                 f"({len(records)} in all)")
            # held out by source: entries that share a triple set stay on one side
            sources = list(dict.fromkeys(r.source for r in records))
            held = set(random.Random(0).sample(sources, min(holdout, len(sources)))) if holdout else set()
            if split == "dev":
                return [r for r in records if r.source in held]
            records = [r for r in records if r.source not in held]
            for r in records:
                r.meta["loaded_from"] = train_from
            return records
    folder = resolve_data_dir(data_dir, "dart") / "dart"
    path = _split_file(folder, split)
    if path is None and download:
        download_dart(data_dir, [split])
        path = _split_file(folder, split)
    if path is None:
        hint = ""
        if split == "train":
            hint = (" The shared data has no DART train split: pass train_from='dev' (CLI --train-from dev)"
                    " to train on dev, or download=True to fetch the full release.")
        raise FileNotFoundError(f"DART {split} file not found: expected {folder}/{FILE_STEM.format(split=split)}"
                                f".json or .xml.{hint}")
    if path.suffix == ".json":
        return _records_from_json(path, lowercase_relations)
    return _records_from_xml(path, lowercase_relations)
