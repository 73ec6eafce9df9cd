"""WebNLG Challenge 2017 (Gardent et al. 2017), read from the challenge XML.

Layout under ``<data>/webnlg2017/``: ``train/<n>triples/*.xml`` and
``dev/<n>triples/*.xml`` (one file per triple count and category) and
``test/testdata_with_lex.xml`` (all 1,862 test entries with references).

Following the paper's code, the input is the *modified* triple set and only
lexicalisations marked ``comment="good"`` are kept. Each triple becomes
``subject : property : object`` and triples are joined with `` | ``::

    Aarhus : leaderName : Jacob_Bundsgaard | Aarhus_Airport : cityServed : Aarhus

Entities keep their DBpedia spelling (underscores, quotes) exactly as in the
XML. References stay grouped per entry. ``subset`` selects test entries from
the 10 categories seen in training ("seen", 971 entries), the 5 new ones
("unseen", 891) or both ("all", 1,862).
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from .records import Record, resolve_data_dir

# "seen" is every other category (the 10 of the training data)
UNSEEN_CATEGORIES = ("Artist", "Athlete", "CelestialBody", "MeanOfTransportation", "Politician")
SUBSETS = ("all", "seen", "unseen")
SPLITS = ("train", "dev", "test")
TEST_FILE = "test/testdata_with_lex.xml"


def linearize_triples(triples) -> str:
    """``s : p : o | s : p : o``: the shared WebNLG/DART source format."""
    return " | ".join(f"{s} : {p} : {o}" for s, p, o in triples)


def split_triple(text: str) -> tuple[str, str, str]:
    """An ``<mtriple>`` ("s | p | o") as a (subject, property, object) tuple."""
    parts = [p.strip() for p in " ".join(text.split()).split(" | ", 2)]
    if len(parts) != 3:
        raise ValueError(f"malformed triple {text!r}: expected 'subject | property | object'")
    return parts[0], parts[1], parts[2]


def _clean(text: str | None) -> str:
    return " ".join((text or "").split())


def parse_benchmark(path: Path) -> list[dict]:
    """Entries of one WebNLG-style XML file: category, eid, size, triples and (text, comment) lexes."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"cannot parse WebNLG XML {path}: {exc}") from exc
    entries = []
    for entry in root.iter("entry"):
        mset = entry.find("modifiedtripleset")
        triples = [split_triple(t.text or "") for t in (mset.findall("mtriple") if mset is not None else [])]
        lexes = [(_clean("".join(lex.itertext())), lex.get("comment", "")) for lex in entry.findall("lex")]
        entries.append({
            "category": entry.get("category", ""),
            "eid": entry.get("eid", ""),
            "size": int(entry.get("size") or len(triples)),
            "triples": triples,
            "lexes": lexes,
        })
    return entries


def _split_files(root: Path, split: str) -> list[Path]:
    if split == "test":
        path = root / TEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"WebNLG test file not found: {path}")
        return [path]
    folder = root / split
    files = sorted(folder.glob("*triples/*.xml"))
    if not files:
        raise FileNotFoundError(f"no WebNLG {split} XML files under {folder} (expected {split}/<n>triples/*.xml)")
    return files


def load_webnlg(split: str = "train", data_dir=None, subset: str = "all", good_only: bool = True) -> list[Record]:
    """Records of WebNLG 2017 ``split`` (train|dev|test); ``subset`` (all|seen|unseen) filters by category.

    meta: ``id`` (the test ``eid``, e.g. "Id12"; for train/dev "<n>triples/<Category>/<eid>"),
    ``eid``, ``category``, ``seen`` (bool), ``size`` (number of triples), ``relations``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown WebNLG split {split!r}; choose one of {list(SPLITS)}")
    if subset not in SUBSETS:
        raise ValueError(f"unknown WebNLG subset {subset!r}; choose one of {list(SUBSETS)}")
    if split != "test" and subset == "unseen":
        raise ValueError("WebNLG train/dev hold only the 10 seen categories; subset='unseen' applies to test")
    root = resolve_data_dir(data_dir, "webnlg") / "webnlg2017"
    records: list[Record] = []
    for path in _split_files(root, split):
        for entry in parse_benchmark(path):
            refs = [text for text, comment in entry["lexes"] if text and (not good_only or comment == "good")]
            if not refs and split != "test":
                continue  # nothing to learn from; the test set keeps every entry
            category = entry["category"]
            seen = category not in UNSEEN_CATEGORIES
            if (subset == "seen" and not seen) or (subset == "unseen" and seen):
                continue
            eid = entry["eid"]
            rid = eid if split == "test" else f"{path.parent.name}/{category}/{eid}"
            records.append(Record(
                source=linearize_triples(entry["triples"]),
                references=refs,
                meta={"id": rid, "eid": eid, "category": category, "seen": seen, "size": entry["size"],
                      "relations": [p for _, p, _ in entry["triples"]]},
            ))
    return records
