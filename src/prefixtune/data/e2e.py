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
MR_FORM = "attribute[value], attribute[value], ... e.g. 'name[The Eagle], eatType[pub], area[riverside]'"
COLUMNS = ("mr", "ref")


def linearize_mr(mr: str) -> str:
    parts = []
    for key, value in _ATTR.findall(mr):
        parts.append(f"{KEY_NAMES.get(key, key)} : {value.strip()}")
    if not parts:
        raise ValueError(f"cannot parse E2E meaning representation {mr!r}: expected {MR_FORM}")
    return " | ".join(parts)


def load_e2e(split: str = "train", data_dir=None) -> list[Record]:
    if split not in FILES:
        raise ValueError(f"unknown E2E split {split!r}; choose one of {sorted(FILES)}")
    path = resolve_data_dir(data_dir, "e2e") / "e2e" / FILES[split]
    if not path.is_file():
        raise FileNotFoundError(f"E2E {split} file not found: {path}")
    grouped: dict[str, Record] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            _check_header(path, reader.fieldnames)
            for row in reader:
                mr, ref = row["mr"], row["ref"]
                if mr is None or ref is None:
                    raise ValueError(f"{path}, line {reader.line_num}: a row with fewer than the 2 columns mr, ref")
                if mr not in grouped:
                    try:
                        source = linearize_mr(mr)
                    except ValueError as e:
                        raise ValueError(f"{path}, line {reader.line_num}: {e}") from None
                    grouped[mr] = Record(source=source, references=[], meta={"mr": mr, "id": len(grouped)})
                grouped[mr].references.append(ref.strip())
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text: expected an E2E CSV with the columns {', '.join(COLUMNS)}") from None
    except csv.Error as e:
        raise ValueError(f"{path} is not a readable CSV ({e}): expected the columns {', '.join(COLUMNS)}") from None
    if not grouped:
        raise ValueError(f"{path} holds no rows: an E2E CSV has a header (mr,ref) and one row per reference")
    return list(grouped.values())


def _check_header(path, fieldnames):
    """The two columns E2E's CSVs have; a JSON, Parquet or other file is told apart from a CSV with other names."""
    if not fieldnames:
        raise ValueError(f"{path} is empty: an E2E CSV has a header (mr,ref) and one row per reference")
    missing = [c for c in COLUMNS if c not in fieldnames]
    if not missing:
        return
    first = ",".join(fieldnames)
    if first.lstrip().startswith(("{", "[")):
        kind = "it looks like JSON"
    elif not first.isprintable():
        kind = "it looks like a binary file"
    else:
        kind = f"its header has {', '.join(repr(n) for n in fieldnames[:8])}"
    raise ValueError(f"{path}: expected an E2E CSV with the columns {', '.join(COLUMNS)}, but {kind}")
