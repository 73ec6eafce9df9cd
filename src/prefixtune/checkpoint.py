"""Training checkpoints: one file per run, `OUTPUT_DIR/checkpoint.pt`, its keys defined here once.

A checkpoint holds all a run needs to continue exactly (`train --resume`) or to export its best
or last step later (`export`): the trained module's state, the optimiser and schedule, the step,
the best step so far (with its state), the dev-loss history, the random generators and the config.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .atomic import atomic_torch_save

CHECKPOINT = "checkpoint.pt"


@dataclass
class Checkpoint:
    module: dict                 # the trained module's state_dict at `step`
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
        return cls(**torch.load(path, map_location="cpu", weights_only=False))

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
