"""Datasets: every loader returns a list of `Record`s for a split (the paper's tasks, or the user's own file)."""
from __future__ import annotations

from .dart import load_dart
from .e2e import load_e2e
from .files import DataFileError, load_records, load_train_dev, split_dev
from .records import DATA_ENV, Record, check_pairs, resolve_data_dir, sample_pairs, training_pairs
from .webnlg import load_webnlg
from .xsum import load_xsum

LOADERS = {"e2e": load_e2e, "webnlg": load_webnlg, "dart": load_dart, "xsum": load_xsum}


def load_task(task: str, split: str, data_dir=None, **options) -> list[Record]:
    """Records of `task` (e2e, webnlg, dart, xsum) for `split`; options are the loader's own."""
    if task not in LOADERS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(LOADERS)}")
    return LOADERS[task](split, data_dir=data_dir, **options)


__all__ = ["DATA_ENV", "LOADERS", "DataFileError", "Record", "check_pairs", "load_records", "load_task", "load_train_dev",
           "split_dev", "resolve_data_dir", "sample_pairs", "training_pairs"]
