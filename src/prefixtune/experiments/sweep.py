"""Learning rates chosen on dev loss: a study's cells are planned in two stages.

For every configuration of a study (a label at a training size), the first sample's cell is
trained once per rate in `Scale.lr_sweep[method]`; the rate with the lowest best dev loss is
then used by every cell of that configuration. Every method gets the same procedure, and the
report shows every sweep cell, so a reader can check the choice was fair.

With `Scale.sweep_max_steps` unset the sweep cells are full cells (same budget, and they
decode): the winner *is* the first sample's cell, found again by its id. With it set, the
sweep cells are short runs that only measure dev loss, and the chosen rate trains anew.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .cell import Cell, Scale


@dataclass
class SweepGroup:
    key: tuple                      # (task, label, train_size), or (task, label) with a single sweep size
    cells: list[Cell]               # one per rate
    rates: tuple
    chosen: float | None = None     # None until every sweep cell has finished


def group_key(cell: Cell, scale: Scale) -> tuple:
    return (cell.task, cell.label) if scale.sweep_size else (cell.task, cell.label, cell.train_size)


def sweep_cells(cell: Cell, scale: Scale) -> list[Cell]:
    """The cells that try each rate of `cell`'s method on its configuration's first sample."""
    out = []
    for rate in scale.lr_sweep[cell.method]:
        params = {**cell.params, "lr": rate}
        if scale.sweep_max_steps:
            # a short run on dev loss alone: no early stop within it, no decoding
            params.update(max_steps=scale.sweep_max_steps, early_stop_patience=0)
            out.append(replace(cell, params=params, evals={}, tags={**cell.tags, "sweep": True}))
        else:
            out.append(replace(cell, params=params))
    return out


def with_final_epochs(cell: Cell, scale: Scale) -> Cell:
    """`cell` under the scale's `--epochs` override, if any. Only final cells take it: sweep runs are bounded
    by their steps, so a study at 10 epochs shares its sweep (the same cell ids) with the same study at 5."""
    if scale.final_epochs is None:
        return cell
    return replace(cell, params={**cell.params, "epochs": scale.final_epochs})


def plan(cells: list[Cell], scale: Scale, done: dict[str, dict], model_name: str) -> tuple[list[Cell], list[Cell],
                                                                                            list[SweepGroup]]:
    """(sweep cells, final cells whose rate is known, groups) given the finished lines `done`.

    Without a sweep in the scale every cell is final. A configuration's final cells appear once all of
    its sweep cells have finished; ties in dev loss go to the smaller rate.
    """
    if not scale.lr_sweep:
        return [], [with_final_epochs(c, scale) for c in cells], []
    groups: dict[tuple, SweepGroup] = {}
    for cell in cells:
        if cell.method not in scale.lr_sweep:
            raise ValueError(f"the scale sweeps no rate for method {cell.method!r}")
        if scale.sweep_size and cell.train_size != scale.sweep_size:
            continue
        key = group_key(cell, scale)
        if key not in groups:  # the first cell of a configuration stands for its first sample
            groups[key] = SweepGroup(key, sweep_cells(cell, scale), tuple(scale.lr_sweep[cell.method]))
    missing = {group_key(c, scale) for c in cells} - set(groups)
    if missing:
        raise ValueError(f"no cell at the sweep size {scale.sweep_size} for {sorted(missing)}")
    for group in groups.values():
        lines = [done.get(c.id(scale, model_name)) for c in group.cells]
        if all(line is not None for line in lines):
            ranked = sorted(zip(lines, group.rates),
                            key=lambda lr: (float("inf") if lr[0]["best_dev_loss"] is None else lr[0]["best_dev_loss"],
                                            lr[1]))
            group.chosen = ranked[0][1]
    finals = [with_final_epochs(replace(c, params={**c.params, "lr": groups[group_key(c, scale)].chosen}), scale)
              for c in cells if groups[group_key(c, scale)].chosen is not None]
    sweeps = [c for g in groups.values() for c in g.cells]
    return sweeps, finals, list(groups.values())


def sweep_rows(groups: list[SweepGroup], scale: Scale, done: dict[str, dict], model_name: str) -> list[list]:
    """One row per sweep cell for the report: configuration, rate, best dev loss (at step), stop, chosen."""
    rows = []
    for group in groups:
        task, label = group.key[:2]
        size = group.cells[0].train_size
        for cell, rate in zip(group.cells, group.rates):
            cell_id = cell.id(scale, model_name)
            line = done.get(cell_id)
            if line is None:
                rows.append([label, size or "all", f"{rate:g}", "(not run yet)", "", "", "", f"`{cell_id}`"])
                continue
            loss = line.get("best_dev_loss")
            rows.append([label, size or "all", f"{rate:g}",
                         "–" if loss is None else f"{loss:.4f} (step {line.get('best_step')})",
                         line.get("steps"), line.get("stop_reason", "–"),
                         "**chosen**" if group.chosen == rate else "", f"`{cell_id}`"])
    return rows


SWEEP_HEADER = ["configuration", "train size", "learning rate", "best dev loss", "steps", "stopped by", "",
                "cell"]
