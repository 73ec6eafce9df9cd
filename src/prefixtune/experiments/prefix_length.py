"""`prefix-length`: the metric as the prefix grows (the paper's Figure 4).

Table-to-text sweeps lengths 1 to 40; summarisation 1 to 200 (where the paper puts the
threshold). The paper: performance increases with the length up to a threshold (10 for
table-to-text, 200 for summarisation), and a slightly longer prefix then does a little worse.
"""
from __future__ import annotations

from dataclasses import replace

from . import report as R
from .cell import Cell
from .scales import base_scale, task_options, word_init
from .study import grid

NAME = "prefix-length"
TITLE = "Prefix length"
TASKS = ("e2e", "webnlg", "dart", "xsum")
DEFAULT_TASKS = ("e2e",)
MULTI_TASK = False
LENGTHS = {
    "tiny": {"table": (1, 3), "xsum": (1, 3)},
    "cpu": {"table": (1, 5, 10, 20, 40), "xsum": (1, 10, 50, 100, 200)},
    "paper": {"table": (1, 5, 10, 20, 40), "xsum": (1, 10, 50, 100, 200, 300)},
}
THRESHOLD = {"table": 10, "xsum": 200}

DOC = """\
**Study.** Train prefixes of several lengths (everything else fixed) and compare. Below paper
scale the prefix starts from the activations of "table-to-text:" ("summarize" for XSUM),
repeated to fill the length: with a few dozen steps a random prefix is mostly untrained (see the
`init` study), and the question here is the length, not the initialisation.
"""


def kind(task: str) -> str:
    return "xsum" if task == "xsum" else "table"


def make_scale(scale: str, task: str):
    s = base_scale(scale, task)
    if scale == "cpu":
        # 15 cells: 5 lengths x 3 seeds, 60 steps of 8 on 1,000 sampled pairs.
        return replace(s, seeds=(1, 2, 3))
    return s


def lengths(task, scale) -> tuple:
    return LENGTHS[scale.name][kind(task)]


def make_cells(task: str, scale) -> list[Cell]:
    train_options, test_options = task_options(task, scale.name)
    init = {"init": word_init(task)} if scale.name != "paper" else {}

    def cell(length, sample, seed):
        return Cell(NAME, task, "prefix", f"prefix-{length}", scale.train_size, sample, seed,
                    {"prefix_len": length, **init}, train_options, {"test": test_options}, {"length": length})

    return grid(scale, lengths(task, scale), cell)


def write_report(run):
    sections, verdicts = [], []
    for task, lines, ctx, metric, label in R.per_task(run):
        ls = lengths(task, ctx.scale)
        aggs = {n: R.collect(lines, metric=metric, length=n) for n in ls}
        figure = R.line_figure(run.out_dir / f"prefix_length_{task}.png", {"prefix": list(aggs.items())},
                               "prefix length", R.axis_label(metric), f"{task.upper()}: prefix length", logx=True)
        rows = [[n, f"{a.fmt()} (n={a.n})", R.cite(a.ids, 4)] for n, a in aggs.items()]
        sections.append(f"## {task}: {label} by prefix length\n\n" + R.md_table(["length", label, "cells"], rows)
                        + f"\n\n![prefix length {task}]({R.rel(figure, run.out_dir)})\n")
        threshold = min(ls, key=lambda n: abs(n - THRESHOLD[kind(task)]))
        done = {n: a for n, a in aggs.items() if a.n}
        if done:
            best = max(done, key=lambda n: done[n].mean)
            sections.append(f"Best length here: **{best}** ({done[best].fmt()}); the paper's threshold: "
                            f"{THRESHOLD[kind(task)]}.\n")
        shortest = ls[0]
        verdicts.append(R.claim(f"{task}: a longer prefix helps up to the threshold ({threshold} vs {shortest})",
                                f"performance increases with length up to {THRESHOLD[kind(task)]} (Fig. 4)",
                                aggs[threshold], aggs[shortest], ">", a_name=f"len {threshold}",
                                b_name=f"len {shortest}"))
        longer = [n for n in ls if n > threshold and aggs[n].n]
        if longer:
            top = max(longer, key=lambda n: aggs[n].mean)
            verdicts.append(R.claim(f"{task}: beyond the threshold a longer prefix does not help "
                                    f"({threshold} vs the best longer one, {top})",
                                    "slight drop beyond the threshold (Fig. 4)", aggs[threshold], aggs[top], ">",
                                    a_name=f"len {threshold}", b_name=f"len {top}"))
    return R.assemble(run, TITLE, DOC, verdicts, sections)
