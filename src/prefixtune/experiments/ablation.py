"""`ablation`: where the trainable activations sit (the paper's Table 4 / §7.3).

EMB-k (k trainable input embeddings only, no deeper activations) and INFIX-k ([x; INFIX; y],
activations at every layer that x does not see) against PREFIX (activations at every layer,
before x). The paper: embedding-only is far worse than prefix; infix is slightly worse.
"""
from __future__ import annotations

from dataclasses import replace

from . import report as R
from .cell import Cell
from .scales import base_scale, task_options, word_init
from .study import grid

NAME = "ablation"
TITLE = "Ablation: embedding-only and infix against prefix"
TASKS = ("e2e", "webnlg", "dart", "xsum")
DEFAULT_TASKS = ("e2e",)
MULTI_TASK = False
KS = {"tiny": (1, 2), "cpu": (1, 10, 20), "paper": (1, 10, 20)}
PREFIX_LEN = 10

DOC = """\
**Study.** Same data, steps and decoding for every configuration; only where the trainable
vectors enter changes: EMB-k (k virtual input embeddings, like prompt tuning), INFIX-k (k
keys/values at every layer, seen only by the last source token and the target), and PREFIX
(length {prefix_len}, keys/values at every layer seen by every token). Each method uses its own default
learning rate (prefix and infix 5e-4 through the MLP; embeddings 3e-2). Below paper scale all
start from the frozen model's representation of "table-to-text:" ("summarize" for XSUM):
embeddings of those tokens for EMB, their activations for INFIX and PREFIX.
"""


def make_scale(scale: str, task: str):
    s = base_scale(scale, task)
    if scale == "cpu":
        # 14 cells: 7 configurations x 2 seeds, 60 steps of 8 on 1,000 sampled pairs.
        return replace(s, seeds=(1, 2))
    return s


def configurations(scale) -> list[tuple[str, str, int]]:
    ks = KS[scale.name]
    prefix_len = PREFIX_LEN if scale.name != "tiny" else ks[-1]
    return ([(f"EMB-{k}", "embedding-only", k) for k in ks] + [(f"INFIX-{k}", "infix", k) for k in ks]
            + [(f"PREFIX-{prefix_len}", "prefix", prefix_len)])


def make_cells(task: str, scale) -> list[Cell]:
    train_options, test_options = task_options(task, scale.name)
    init = {"init": word_init(task)} if scale.name != "paper" else {}

    def cell(config, sample, seed):
        label, method, k = config
        return Cell(NAME, task, method, label, scale.train_size, sample, seed, {"prefix_len": k, **init},
                    train_options, {"test": test_options}, {"config": label, "k": k})

    return grid(scale, configurations(scale), cell)


def write_report(run):
    sections, verdicts = [], []
    for task, lines, ctx, metric, label in R.per_task(run):
        configs = configurations(ctx.scale)
        aggs = {name: R.collect(lines, metric=metric, label=name) for name, _, _ in configs}
        prefix_name = configs[-1][0]
        rows = [[name, f"{a.fmt()} (n={a.n})", R.percent_of(lines, label=name), R.cite(a.ids, 4)]
                for name, a in aggs.items()]
        ks = KS[ctx.scale.name]
        groups = {"EMB": {f"k={k}": aggs[f"EMB-{k}"] for k in ks}, "INFIX": {f"k={k}": aggs[f"INFIX-{k}"] for k in ks}}
        figure = R.bar_figure(run.out_dir / f"ablation_{task}.png", groups, R.axis_label(metric),
                              f"{task.upper()}: embedding-only / infix vs prefix", reference=(prefix_name, aggs[prefix_name]))
        sections.append(f"## {task}: {label} by configuration\n\n" +
                        R.md_table(["configuration", label, "trainable % (shipped %)", "cells"], rows) +
                        f"\n\n![ablation {task}]({R.rel(figure, run.out_dir)})\n")
        emb = [aggs[f"EMB-{k}"] for k in ks if aggs[f"EMB-{k}"].n]
        infix = [aggs[f"INFIX-{k}"] for k in ks if aggs[f"INFIX-{k}"].n]
        best_emb = max(emb, key=lambda a: a.mean) if emb else R.Agg([], [])
        best_infix = max(infix, key=lambda a: a.mean) if infix else R.Agg([], [])
        verdicts.append(R.claim(f"{task}: prefix beats the best embedding-only EMB-k",
                                "EMB-k far below PREFIX: deep activations matter (Table 4)", aggs[prefix_name],
                                best_emb, ">", a_name="PREFIX", b_name="best EMB"))
        verdicts.append(R.claim(f"{task}: prefix beats the best INFIX-k",
                                "INFIX slightly below PREFIX (Table 4)", aggs[prefix_name], best_infix, ">",
                                a_name="PREFIX", b_name="best INFIX"))
    # the text names the PREFIX cell's own length (10 at cpu and paper scale, 2 at tiny)
    lengths = sorted({configurations(ctx.scale)[-1][2] for ctx in run.contexts.values()})
    doc = DOC.format(prefix_len=" / ".join(map(str, lengths)) or PREFIX_LEN)
    return R.assemble(run, TITLE, doc, verdicts, sections)
