"""Training checkpoints: one file per run, `OUTPUT_DIR/checkpoint.pt`, its keys defined here once.

A checkpoint holds all a run needs to continue exactly (`train --resume`) or to export its best
or last step later (`export`): the trained module's state, the optimiser and schedule, the step,
the best step so far (with its state), the dev-loss history, the random generators and the config.

A module's state here is its trained state (`trained_state`): the parameters that train, nothing frozen.
For `adapter` and `finetune-top2` the module wraps a whole copy of the model, whose frozen weights are the
base model's and come back from it when the method is built again; keeping them made a 0.1% adapter's
checkpoint 1.08 GB (module and best state) for ~100K trained numbers. Checkpoints written before this
hold the full state_dict; `load_trained_state` loads those unchanged.

A checkpoint is loaded as data (`torch.load(weights_only=True)`): tensors, plain Python values and the
numpy arrays of the random generators' state, nothing else. A run directory may be shared, and a
pickle that names any other callable (os.system, ...) would run it on `export` or `--resume`: such a
file is refused.
"""
from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomic import atomic_torch_save

CHECKPOINT = "checkpoint.pt"
# What a checkpoint holds beyond tensors and plain values: numpy's RNG state (train._rng_state), a uint32
# array. numpy 1.x pickled its array constructor as numpy.core.multiarray, numpy 2 as numpy._core.multiarray.
_RECONSTRUCT = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
SAFE_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), (_RECONSTRUCT, "numpy._core.multiarray._reconstruct"),
                (_RECONSTRUCT, "numpy.core.multiarray._reconstruct")]


def load_checkpoint_file(path: str | Path) -> dict:
    """The dict a checkpoint file holds, unpickled as data only (see above)."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL (\S+)|but got (.+)", str(e))  # torch's text names what it refused
            detail = f" (it names {(found.group(1) or found.group(2)).strip()})" if found else ""
            raise ValueError(f"{path} is not a prefixtune checkpoint: it holds objects other than tensors and plain "
                             f"data, which are not loaded (they could run code){detail}") from None


def _trained_names(module: nn.Module) -> set[str]:
    # every name of a trained parameter: a tied one (embeddings and lm_head) under each of its names
    return {n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}


def trained_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict entries of `module`'s trained parameters (sharing their storage, as state_dict does).

    No buffer is kept: no method trains one, and the frozen model's (rotary frequencies, BART's
    final_logits_bias) are built with it. A tied weight is kept under each name; torch.save writes its storage once."""
    names = _trained_names(module)
    return {k: v for k, v in module.state_dict().items() if k in names}


def load_trained_state(module: nn.Module, state: dict[str, torch.Tensor]):
    """Put a trained state (or an older checkpoint's full state_dict) back into `module`.

    Refused before anything is loaded: a key the module does not have, or a trained parameter the state
    lacks (it would keep its fresh initial value silently)."""
    unknown = sorted(set(state) - set(module.state_dict()))
    lacking = sorted(_trained_names(module) - set(state))
    if unknown or lacking:
        said = [f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for what, keys in (("keys this module does not have", unknown),
                                   ("trained weights missing", lacking)) if keys]
        raise ValueError(f"the saved state does not fit this {type(module).__name__}: {'; '.join(said)}; "
                         f"was it saved by another method or model?")
    try:
        module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape: torch names each
        raise ValueError(f"the saved state does not fit this {type(module).__name__}: {e}") from None


@dataclass
class Checkpoint:
    module: dict                 # the module's trained state at `step` (older checkpoints: its full state_dict)
    optimizer: dict
    scheduler: dict
    step: int
    best: dict                   # {"loss", "step", "state"}: the lowest dev loss so far (state None: none yet)
    history: list
    rng: dict
    config: dict                 # asdict(TrainConfig)
    data: dict | None = None     # what the run trained on (train.data_provenance); None in older checkpoints

    def save(self, run_dir: str | Path):
        # a plain dict (not asdict: that would deep-copy every tensor), as checkpoints have always been
        atomic_torch_save({f.name: getattr(self, f.name) for f in fields(self)}, Path(run_dir) / CHECKPOINT)

    @classmethod
    def load(cls, run_dir: str | Path) -> "Checkpoint":
        path = Path(run_dir) / CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        return cls(**load_checkpoint_file(path))

    def has_best(self) -> bool:
        return self.best["state"] is not None

    def state(self, which: str) -> dict:
        """The module state to export: `best` (lowest dev loss; the last step when none was measured) or `last`."""
        check_which(which)
        return self.best["state"] if which == "best" and self.has_best() else self.module


WHICH = ("best", "last")


def check_which(which: str):
    """`export --which`: a misspelt `best` must not export the last step silently."""
    if which not in WHICH:
        raise ValueError(f"which must be best or last, not {which!r}")
