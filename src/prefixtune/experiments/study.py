"""What a study is (after torchtune's recipe interface): a module with these names, read directly.

`run_experiment` needs nothing else of a study. Cells come from `grid`, which fixes their order
(configuration, then sample, then seed); the order is the run order and the report's, and each
cell's id hashes only its own configuration.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Protocol, runtime_checkable

from .cell import Cell, Scale


@runtime_checkable
class Study(Protocol):
    NAME: str                     # `prefixtune experiment NAME`; also in every cell's id
    TITLE: str                    # the report's title
    TASKS: tuple[str, ...]        # the tasks it can run on
    DEFAULT_TASKS: tuple[str, ...]
    MULTI_TASK: bool              # several tasks in one run (one report), or one at a time

    def make_scale(self, scale: str, task: str) -> Scale: ...

    def make_cells(self, task: str, scale: Scale) -> list[Cell]: ...

    def write_report(self, run) -> Path: ...


def grid(scale: Scale, configurations: Iterable, make: Callable[..., Cell | list[Cell]]) -> list[Cell]:
    """`make(configuration, sample, seed)` for every configuration, sample and seed of the scale, in that
    order; `make` returns a cell, or a list of them (several methods at one grid point)."""
    cells: list[Cell] = []
    for config in configurations:
        for sample in range(1, scale.samples + 1):
            for seed in scale.seeds:
                made = make(config, sample, seed)
                cells.extend(made if isinstance(made, list) else [made])
    return cells
