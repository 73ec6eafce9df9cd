"""Training methods: which parameters train and how they enter the frozen model.

Every method has the same interface (see `base.Method`), so the trainer, the CLI's
`--method` switch and the experiments treat them alike.
"""
from __future__ import annotations

from .adapter import AdapterMethod
from .base import Method
from .embedding import EmbeddingMethod
from .finetune import FinetuneMethod
from .infix import InfixMethod
from .prefix import PrefixMethod
from ..run_dir import EXPORT_FILES  # what `train` writes for each method

METHODS: dict[str, type[Method]] = {
    "prefix": PrefixMethod, "prefix-flat": PrefixMethod,
    "embedding-only": EmbeddingMethod, "infix": InfixMethod,
    "finetune": FinetuneMethod, "finetune-top2": FinetuneMethod,
    "adapter": AdapterMethod,
}


def build_method(name: str, model, tokenizer, spec, config) -> Method:
    """`config` is the TrainConfig: each method reads the fields it needs."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](name, model, tokenizer, spec, config)


__all__ = ["EXPORT_FILES", "METHODS", "Method", "build_method"]
