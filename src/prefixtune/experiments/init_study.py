"""`init`: random initialisation against real-word initialisations, in low data (the paper's Figure 5).

The paper: random init gives low performance with high variance in low data; starting
from the activations of real words helps, task-relevant words ("table-to-text",
"summarize") slightly more than irrelevant ones ("elephant", "divide").
"""
from __future__ import annotations

import statistics
from dataclasses import replace

from . import report as R
from .cell import Cell
from .scales import base_scale, task_options
from .study import grid

NAME = "init"
TITLE = "Prefix initialisation in low data"
TASKS = ("e2e", "webnlg", "dart", "xsum")
DEFAULT_TASKS = ("e2e",)
MULTI_TASK = False
INITS = {"random": "random", "table-to-text": "words:table-to-text:", "summarize": "words:summarize",
         "elephant": "words:elephant", "divide": "words:divide"}
RELEVANT = ("table-to-text", "summarize")
IRRELEVANT = ("elephant", "divide")
SIZE = {"tiny": 8, "cpu": 50, "paper": 50}

DOC = """\
**Study.** Train a prefix on a small sample of the training set from five starting points:
random, or the frozen model's own activations for the words "table-to-text:", "summarize",
"elephant" and "divide" (repeated to fill the prefix). Several data samples per init show
the spread.
"""


def make_scale(scale: str, task: str):
    s = replace(base_scale(scale, task), train_size=None)  # the study's size is SIZE
    if scale == "cpu":
        # 15 cells: 5 inits x 3 samples of 50 examples x 1 seed, 50 steps of 8.
        return replace(s, max_steps=50 if task != "xsum" else s.max_steps, samples=3, seeds=(1,))
    if scale == "paper":
        return replace(s, samples=5, seeds=(1, 2))
    return s


def make_cells(task: str, scale) -> list[Cell]:
    train_options, test_options = task_options(task, scale.name)
    size = SIZE[scale.name]

    def cell(name, sample, seed):
        return Cell(NAME, task, "prefix", f"init={name}", size, sample, seed, {"init": INITS[name]},
                    train_options, {"test": test_options}, {"init": name})

    return grid(scale, INITS, cell)


def write_report(run):
    sections, verdicts = [], []
    for task, lines in run.lines.items():
        metric, label = R.headline(task, lines)
        aggs = {name: R.collect(lines, metric=metric, init=name) for name in INITS}
        figure = R.bar_figure(run.out_dir / f"init_{task}.png", {n: {"prefix": a} for n, a in aggs.items()},
                              R.axis_label(metric), f"{task.upper()}: prefix initialisation ({SIZE[run.scale]} examples)")
        rows = [[n, f"{a.fmt()} (n={a.n})", f"{a.std:.2f}" if a.n > 1 else "–", R.cite(a.ids, 5)]
                for n, a in aggs.items()]
        sections.append(f"## {task}: {label} by initialisation\n\n" +
                        R.md_table(["init", label, "std", "cells"], rows) +
                        f"\n\n![init {task}]({R.rel(figure, run.out_dir)})\n")
        real = merge(aggs[n] for n in RELEVANT + IRRELEVANT)
        relevant, irrelevant = merge(aggs[n] for n in RELEVANT), merge(aggs[n] for n in IRRELEVANT)
        verdicts.append(R.claim(f"{task}: real-word init beats random init", "random init is low and "
                                "high-variance; real words help (Fig. 5)", real, aggs["random"], ">",
                                a_name="real words", b_name="random"))
        verdicts.append(R.claim(f"{task}: task words beat irrelevant words", '"table-to-text"/"summarize" '
                                'slightly above "elephant"/"divide" (Fig. 5)', relevant, irrelevant, ">",
                                a_name="task words", b_name="other words"))
        verdicts.append(variance_claim(task, aggs))
    return R.assemble(run, TITLE, DOC, verdicts, sections)


def merge(aggs) -> R.Agg:
    aggs = list(aggs)
    return R.Agg([v for a in aggs for v in a.values], [i for a in aggs for i in a.ids])


def variance_claim(task, aggs) -> R.Verdict:
    """Random init's spread against the typical spread of one real-word init (needs 3+ cells each)."""
    random_agg = aggs["random"]
    word_stds = [aggs[n].std for n in RELEVANT + IRRELEVANT if aggs[n].n >= 3]
    ids = [i for a in aggs.values() for i in a.ids]
    if random_agg.n < 3 or not word_stds:
        return R.Verdict(f"{task}: random init varies more than real-word init", "high variance (Fig. 5)",
                         "needs 3+ cells per init", R.INCONCLUSIVE, ids)
    typical = statistics.fmean(word_stds)
    ratio = random_agg.std / typical if typical > 0 else float("inf")
    verdict = R.HELD if ratio > 1.5 else R.NOT_HELD if ratio < 1 / 1.5 else R.INCONCLUSIVE
    return R.Verdict(f"{task}: random init varies more than real-word init", "high variance (Fig. 5)",
                     f"std random {random_agg.std:.2f} vs mean std of a word init {typical:.2f} (ratio {ratio:.2f}; "
                     f"held above 1.5, did not hold below 1/1.5)", verdict, ids)
