"""The one record type every dataset loader yields, plus the low-data sampler."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from .chat import Conversation

DATA_ENV = "PREFIXTUNE_DATA"


@dataclass
class Record:
    """One input with all of its references.

    `source` is the linearised input the model reads (x); `references` are the
    gold outputs (y), grouped so that multi-reference metrics see them together;
    `meta` holds anything else a study needs (category, topic, id, ...).
    """

    source: str
    references: list[str]
    meta: dict = field(default_factory=dict)


DATASET_FOLDERS = ("e2e", "webnlg2017", "dart", "xsum_sample", "xsum")


def default_data_dirs() -> list[Path]:
    """Where the datasets are looked for without --data-dir or $PREFIXTUNE_DATA: ./data and ../shared/data,
    then the same two beside the source checkout this package runs from (an editable install)."""
    checkout = Path(__file__).resolve().parents[3]  # <checkout>/src/prefixtune/data/records.py
    places = [Path("data"), Path("..") / "shared" / "data", checkout / "data", checkout.parent / "shared" / "data"]
    unique: dict[Path, Path] = {}
    for place in places:
        unique.setdefault(place.resolve(), place)
    return list(unique.values())


def _holds_datasets(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_dir() for name in DATASET_FOLDERS)


def resolve_data_dir(data_dir: str | os.PathLike | None, task: str) -> Path:
    """The data directory from a flag, else $PREFIXTUNE_DATA, else the first of `default_data_dirs()`
    that holds datasets; a clear error if none does."""
    root = data_dir or os.environ.get(DATA_ENV)
    if root:
        path = Path(root).expanduser()
        if path.is_file():
            raise FileNotFoundError(f"data directory {str(path)!r} is a file, not a directory: give the folder "
                                    f"that holds e2e/, webnlg2017/, dart/ or xsum_sample/")
        if not path.is_dir():
            raise FileNotFoundError(f"data directory {str(path)!r} does not exist")
        return path
    for path in default_data_dirs():
        if _holds_datasets(path):
            return path
    looked = ", ".join(str(p) for p in default_data_dirs())
    raise FileNotFoundError(
        f"no data directory for task {task!r}: pass --data-dir DIR or set {DATA_ENV}=DIR "
        f"(DIR holds e2e/, webnlg2017/, dart/, xsum_sample/; see the README for downloads); looked in {looked}"
    )


def training_pairs(records: list[Record]) -> list:
    """One (source, target) pair per reference: how the paper trains on multi-reference data.

    A chat record (`meta["messages"]`) is one `Conversation` instead: it trains on all its assistant turns.
    """
    pairs: list = []
    for r in records:
        if "messages" in r.meta:
            pairs.append(Conversation.of(r.meta["messages"], r.meta.get("where", "")))
        else:
            pairs += [(r.source, ref) for ref in r.references]
    return pairs


def check_pairs(items, name: str = "train_pairs") -> list[tuple[str, str]]:
    """(source, target) pairs from `items`, each a pair of two non-empty strings or a `Record` (one pair per
    reference). Anything else is refused naming the index of the first bad item: a dict would otherwise
    unpack to its keys and train the prefix to map "source" to "target"."""
    if isinstance(items, (str, bytes, dict)) or not hasattr(items, "__iter__"):
        raise TypeError(f"{name} must be a list of (source, target) pairs or Records, got {type(items).__name__}")
    pairs: list[tuple[str, str]] = []
    for i, item in enumerate(items):
        if isinstance(item, Record):
            texts = [("source", item.source)] + [(f"reference {j}", r) for j, r in enumerate(item.references or [])]
            if len(texts) == 1:
                raise ValueError(f"{name}[{i}] is a Record without references: nothing to train on")
        elif isinstance(item, dict):
            raise TypeError(f"{name}[{i}] is a dict (keys {sorted(map(str, item))}); give (source, target) pairs, "
                            f"e.g. [(row['source'], row['target']) for row in rows], or Records")
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            texts = [("source", item[0]), ("target", item[1])]
        else:
            raise TypeError(f"{name}[{i}] is {type(item).__name__} {str(item)[:60]!r}; each item must be a "
                            f"(source, target) pair of strings or a Record")
        for part, text in texts:
            if not isinstance(text, str):
                raise TypeError(f"{name}[{i}]: its {part} is {type(text).__name__}, not a string")
            if not text.strip():
                raise ValueError(f"{name}[{i}]: its {part} is empty")
        if isinstance(item, Record):
            pairs.extend((item.source, ref) for ref in item.references)
        else:
            pairs.append((item[0], item[1]))
    return pairs


def sample_pairs(pairs: list[tuple[str, str]], size: int | None, seed: int) -> list[tuple[str, str]]:
    """The low-data sampler: `size` pairs drawn without replacement with a fixed seed (None = all)."""
    if size is None or size >= len(pairs):
        return list(pairs)
    if size <= 0:
        raise ValueError(f"train size must be positive, got {size}")
    return random.Random(seed).sample(pairs, size)
