"""E2E NLG Challenge (Novikova et al. 2017): CSVs with one row per reference.

Rows are grouped by MR in order of first appearance, so the test split has 630
records with all of their references. The MR is linearised as the paper's code
does: `name : The Eagle | Type : coffee shop | price : cheap | ...`.
"""
from __future__ import annotations

import csv
import re

from .records import Record, resolve_data_dir

FILES = {"train": "trainset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"}
# The paper's code renames three attributes; the rest keep their E2E names.
KEY_NAMES = {"eatType": "Type", "priceRange": "price", "familyFriendly": "family friendly"}
_ATTR = re.compile(r"\s*([^\[\],]+?)\s*\[(.*?)\]\s*")


def linearize_mr(mr: str) -> str:
    parts = []
    for key, value in _ATTR.findall(mr):
        parts.append(f"{KEY_NAMES.get(key, key)} : {value.strip()}")
    if not parts:
        raise ValueError(f"cannot parse E2E meaning representation: {mr!r}")
    return " | ".join(parts)


def load_e2e(split: str = "train", data_dir=None) -> list[Record]:
    if split not in FILES:
        raise ValueError(f"unknown E2E split {split!r}; choose one of {sorted(FILES)}")
    path = resolve_data_dir(data_dir, "e2e") / "e2e" / FILES[split]
    if not path.is_file():
        raise FileNotFoundError(f"E2E {split} file not found: {path}")
    grouped: dict[str, Record] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            mr = row["mr"]
            if mr not in grouped:
                grouped[mr] = Record(source=linearize_mr(mr), references=[], meta={"mr": mr, "id": len(grouped)})
            grouped[mr].references.append(row["ref"].strip())
    return list(grouped.values())
