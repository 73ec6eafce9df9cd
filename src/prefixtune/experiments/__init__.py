"""The paper's studies, each a grid of cells run through the one trainer, written up as a report.

`run_experiment("lowdata", task="e2e", scale="cpu", out="reports/lowdata")` runs every
unfinished cell of the study (one JSONL line each in `OUT/cells.jsonl`), then writes
`OUT/report.md` and its PNG figures. The CLI's `prefixtune experiment` calls it.

Studies: lowdata, prefix-length, init, ablation, extrapolation, main (see docs/experiments.md).
"""
from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import ablation, extrapolation, init_study, lowdata, main_table, prefix_length, sweep
from .cell import Cell, Scale
from .runner import CELLS_FILE, CellStore, Context, line_files, run_cells
from .scales import SCALES, default_model
from .study import Study

STUDIES: dict[str, Study] = {m.NAME: m for m in (lowdata, prefix_length, init_study, ablation, extrapolation, main_table)}
CONVERGED = ("lowdata", "main", "extrapolation")  # the studies sized for `--scale converged`


@dataclass
class StudyRun:
    """What the report writer gets: per task, the context (scale, model) and the finished lines."""

    name: str
    scale: str
    out_dir: Path
    command: str
    contexts: dict = field(default_factory=dict)   # task -> Context
    lines: dict = field(default_factory=dict)      # task -> list of JSONL lines (cell order)
    planned: dict = field(default_factory=dict)    # task -> number of cells in the plan
    sweeps: dict = field(default_factory=dict)     # task -> learning-rate sweep rows (scales with a sweep)
    retried: dict = field(default_factory=dict)    # cell id -> attempts, for cells whose Ray task died and ran again


def command_line(name: str, task: str | None, scale: str, out, model: str | None, data_dir: str | None,
                 epochs: float | None = None, reuse_from=None, rates_from=None) -> str:
    parts = ["prefixtune", "experiment", name]
    if task:
        parts += ["--task", task]
    parts += ["--scale", scale]
    if epochs is not None:
        parts += ["--epochs", f"{epochs:g}"]
    if reuse_from is not None:
        parts += ["--reuse-from", str(reuse_from)]
    if rates_from is not None:
        parts += ["--rates-from", str(rates_from)]
    parts += ["--out", str(out)]
    if model:
        parts += ["--model", model]
    if data_dir:
        parts += ["--data-dir", str(data_dir)]
    return " ".join(shlex.quote(p) for p in parts)


def resolve_tasks(study: Study, task: str | None) -> list[str]:
    if task in (None, ""):
        return list(study.DEFAULT_TASKS)
    tasks = list(study.TASKS) if task == "all" else [t.strip() for t in task.split(",") if t.strip()]
    bad = [t for t in tasks if t not in study.TASKS]
    if bad:
        raise ValueError(f"study {study.NAME!r} runs on {', '.join(study.TASKS)}; not on {', '.join(bad)}")
    if len(tasks) > 1 and not study.MULTI_TASK:
        raise ValueError(f"study {study.NAME!r} takes one task at a time")
    return tasks


def run_experiment(name: str, task: str | None = None, scale: str = "cpu", out: str | Path | None = None,
                   model: str | None = None, data_dir: str | None = None, *, model_obj=None, tokenizer=None,
                   loader=None, progress: bool = True, report_only: bool = False, epochs: float | None = None,
                   reuse_from: str | Path | None = None, rates_from: str | Path | None = None,
                   ray: bool | str = False, threads: int = 1) -> dict:
    """Run (or resume) a study and write its report; returns {"report", "cells", "ran", "planned", "retried"}.

    `epochs`: the final cells' epoch limit instead of the scale's (sweep runs are step-bounded and keep
    their ids). `reuse_from`: another study directory whose finished cells with the same ids are copied
    in instead of being run again (a 10-epoch study reuses the 5-epoch study's learning-rate sweep).
    `rates_from`: another study directory whose final cells' learning rates (chosen by its sweep) every
    configuration of this one uses, with no sweep of its own (WebNLG and DART at E2E's rates).

    `ray`: run the cells as Ray tasks (`ray_runner.py`): an address ("local": a new Ray on this machine; "auto",
    "HOST:6379") or True (`ray.init()`'s own choice: `$RAY_ADDRESS`, a cluster that `ray start` began here, else
    a new one); each task asks for `threads` CPUs (or a GPU where the cluster has them). "retried": the study's
    cells whose Ray task died and ran again.

    `model_obj`/`tokenizer`: an already loaded model (the tests pass a tiny one); `loader`:
    (task, split, **options) -> records, instead of the data directory.
    """
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose one of {', '.join(STUDIES)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    study = STUDIES[name]
    if scale == "converged" and name not in CONVERGED:
        raise ValueError(f"study {name!r} has no converged scale; it runs for {', '.join(CONVERGED)}")
    if epochs is not None and not (epochs > 0 and math.isfinite(epochs)):
        raise ValueError(f"--epochs must be a number > 0, got {epochs}")
    if ray and not report_only:  # before anything loads: a missing Ray is one line naming the extra
        from .ray_runner import require_ray

        require_ray()
    tasks = resolve_tasks(study, task)
    out_dir = Path(out or Path("reports") / name)
    reused = CellStore(Path(reuse_from) / CELLS_FILE).load() if reuse_from is not None else {}
    rates = chosen_rates(CellStore(Path(rates_from) / CELLS_FILE).load(), rates_from) if rates_from is not None else {}
    if reuse_from is not None and not reused:
        raise ValueError(f"--reuse-from {str(reuse_from)!r} holds no finished cells ({CELLS_FILE})")
    # the printed command is the one that made the study: its copied cells name the --reuse-from it was run with
    shown_reuse = reuse_from if reuse_from is not None else recorded_reuse(out_dir, name, tasks)
    run = StudyRun(name, scale, out_dir, command_line(name, ",".join(tasks), scale, out_dir, model, data_dir,
                                                      epochs, shown_reuse, rates_from))
    models: dict = {}
    ran = 0
    plan_ids: set = set()  # every cell this command plans (sweeps included): --report-only checks the store holds them
    for t in tasks:
        from ..models import model_name as name_of

        s = study.make_scale(scale, t)
        if epochs is not None:
            s = replace(s, final_epochs=epochs)
        if model_obj is not None:
            chosen = model or name_of(model_obj)
            models.setdefault(chosen, (model_obj, tokenizer))
        else:
            chosen = model or default_model(scale, t)
        loaded = models.get(chosen, (None, None))
        cells = study.make_cells(t, s)
        if rates_from is not None:
            s, cells = with_rates(s, cells, rates, rates_from)
        # the cells run at this scale (with_rates's included): each line records `rates_from` from it
        ctx = Context(out_dir, s, chosen, data_dir, loaded[0], loaded[1], loader, run.command, progress)
        ids = [c.id(s, chosen) for c in cells]
        if len(set(ids)) != len(ids):
            raise ValueError("two cells of the study have the same configuration")
        planner = lambda done, cells=cells, s=s, chosen=chosen: sum(sweep.plan(cells, s, done, chosen)[:2], [])
        store = CellStore(out_dir / CELLS_FILE)
        if reused and not report_only:
            copy_reused(store, lambda done, s=s, chosen=chosen: [c.id(s, chosen) for c in planner(done)], reused,
                        Path(reuse_from))
        before = len(store.load())
        if not report_only:
            complete = lambda done, cells=cells, s=s, chosen=chosen: all(
                g.chosen is not None for g in sweep.plan(cells, s, done, chosen)[2])
            if ray:
                from .ray_runner import run_cells_on_ray

                run_cells_on_ray(planner, ctx, f"{name} {t}", None if ray is True else ray, cpus_per_cell=threads,
                                 complete=complete)
            else:
                run_cells(planner, ctx, f"{name} {t}", complete=complete)
            if ctx.model is not None:
                models[chosen] = (ctx.model, ctx.tokenizer)
        done = store.load()
        ran += len(done) - before
        sweep_cells, finals, groups = sweep.plan(cells, s, done, chosen)
        run.planned[t] = len(cells)
        plan_ids |= {c.id(s, chosen) for c in sweep_cells + finals}
        lines = [done[i] for i in (c.id(s, chosen) for c in finals) if i in done]
        if groups:
            run.sweeps[t] = sweep.sweep_rows(groups, s, done, chosen)
        run.contexts[t], run.lines[t] = ctx, lines
    if report_only and not any(run.lines.values()):
        refuse_other_settings(CellStore(out_dir / CELLS_FILE).load(), name, tasks, plan_ids, out_dir, run.command)
    run.retried = {i: line["attempts"] for i, line in CellStore(out_dir / CELLS_FILE).load().items()
                   if line.get("attempts", 1) > 1}
    report = study.write_report(run)
    return {"report": str(report), "cells": sum(len(v) for v in run.lines.values()), "ran": ran,
            "planned": sum(run.planned.values()), "retried": len(run.retried)}


def refuse_other_settings(lines: dict[str, dict], name: str, tasks: list[str], plan_ids: set, out_dir: Path,
                          command: str):
    """ValueError when `--report-only` finds none of its plan's final cells but the study's cells run with other
    settings (another --epochs, --rates-from, --scale or --model): its report would say 0 cells and ask for a re-run."""
    theirs = [line for line in lines.values()
              if line.get("study") == name and line.get("task") in tasks and line["id"] not in plan_ids]
    if not theirs:
        return
    settings = sorted({", ".join(f"{k} {line[k]}" for k in ("scale", "scale_epochs", "rates_from", "model")
                                 if line.get(k) is not None) for line in theirs})
    raise ValueError(f"--report-only: {out_dir / CELLS_FILE} holds {len(theirs)} cells of {name} but none of "
                     f"`{command}`; they were run with other settings ({'; '.join(settings)}): give the options "
                     f"they were run with (the command at the top of {out_dir / 'report.md'}); report.md is unchanged")


def recorded_reuse(out_dir: Path, name: str, tasks: list[str]) -> str | None:
    """The `--reuse-from` that the study's copied cells came from (`copy_reused` stamps them), when it is one
    directory that still holds cells, else None: a rerun or `--report-only` without the option prints it."""
    sources = {line["reused_from"] for line in CellStore(out_dir / CELLS_FILE).load().values()
               if line.get("reused_from") and line.get("study") == name and line.get("task") in tasks}
    if len(sources) != 1:
        return None
    source = sources.pop()
    return source if (Path(source) / CELLS_FILE).is_file() else None


def chosen_rates(lines: dict[str, dict], source) -> dict[str, float]:
    """label -> learning rate of another study's final cells (its sweep's choices); one rate per label."""
    rates: dict[str, set] = {}
    for line in lines.values():
        if not line.get("tags", {}).get("sweep") and line.get("lr") is not None:
            rates.setdefault(line["label"], set()).add(line["lr"])
    if not rates:
        raise ValueError(f"--rates-from {str(source)!r} holds no finished final cells ({CELLS_FILE})")
    mixed = {k: sorted(v) for k, v in rates.items() if len(v) > 1}
    if mixed:
        raise ValueError(f"--rates-from {str(source)!r}: more than one rate per configuration: {mixed}")
    return {k: v.pop() for k, v in rates.items()}


def with_rates(scale: Scale, cells: list[Cell], rates: dict[str, float], source) -> tuple[Scale, list[Cell]]:
    """The scale without a sweep, and every cell at its configuration's rate from `rates`."""
    missing = sorted({c.label for c in cells} - set(rates))
    if missing:
        raise ValueError(f"--rates-from has no rate for {', '.join(missing)}")
    return (replace(scale, lr_sweep={}, sweep_max_steps=None, rates_from=str(source)),
            [replace(c, params={**c.params, "lr": rates[c.label]}) for c in cells])


def copy_reused(store: CellStore, planned_ids, reused: dict[str, dict], source: Path) -> int:
    """Append to `store` every line of `reused` (from study directory `source`) whose id the plan holds and the
    store lacks, with its hypothesis files and loss curve; each copy records `reused_from`. The plan grows as
    lines arrive (a finished sweep adds its final cells), so `planned_ids(done)` is asked again until nothing
    new is found. Returns the lines copied."""
    from ..atomic import atomic_write_bytes

    copied = 0
    while True:
        done = store.load()
        new = [i for i in planned_ids(done) if i in reused and i not in done]
        if not new:
            return copied
        for i in new:
            for rel in line_files(reused[i]):
                atomic_write_bytes(store.path.parent / rel, (source / rel).read_bytes())
            store.append({**reused[i], "reused_from": str(source)})
        copied += len(new)


__all__ = ["Cell", "Context", "STUDIES", "Scale", "run_experiment"]
