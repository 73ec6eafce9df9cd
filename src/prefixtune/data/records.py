"""The one record type every dataset loader yields, plus the low-data sampler."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

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


def resolve_data_dir(data_dir: str | os.PathLike | None, task: str) -> Path:
    """The data directory from a flag, else $PREFIXTUNE_DATA; a clear error if neither holds the task."""
    root = data_dir or os.environ.get(DATA_ENV)
    if not root:
        raise FileNotFoundError(
            f"no data directory for task {task!r}: pass --data-dir DIR or set {DATA_ENV}=DIR "
            f"(DIR holds e2e/, webnlg2017/, dart/, xsum_sample/; see the README for downloads)"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {str(path)!r} does not exist")
    return path


def training_pairs(records: list[Record]) -> list[tuple[str, str]]:
    """One (source, target) pair per reference: how the paper trains on multi-reference data."""
    return [(r.source, ref) for r in records for ref in r.references]


def sample_pairs(pairs: list[tuple[str, str]], size: int | None, seed: int) -> list[tuple[str, str]]:
    """The low-data sampler: `size` pairs drawn without replacement with a fixed seed (None = all)."""
    if size is None or size >= len(pairs):
        return list(pairs)
    if size <= 0:
        raise ValueError(f"train size must be positive, got {size}")
    return random.Random(seed).sample(pairs, size)
