"""`lowdata`: prefix-tuning against fine-tuning on 50, 100, 200 and 500 training examples (the paper's Figure 3).

Each size is sampled several times (different datasets) and trained with several
seeds; the report plots the metric against the size with error bars and shows a
qualitative table of generations for a few test inputs.
"""
from __future__ import annotations

import math
from dataclasses import replace

from . import report as R
from .cell import Cell
from .runner import select_test
from .scales import PAPER, TABLE_TO_TEXT, base_scale, task_options, word_init
from .study import grid

NAME = "lowdata"
TITLE = "Low-data: prefix-tuning vs fine-tuning"
TASKS = ("e2e", "webnlg", "dart", "xsum")
DEFAULT_TASKS = ("e2e",)
MULTI_TASK = False
METHODS = ("prefix", "finetune")
SIZES = {"tiny": (6, 12), "cpu": (50, 100, 200, 500), "converged": (50, 100, 200, 500), "paper": (50, 100, 200, 500)}
QUALITATIVE = 3  # test inputs in the qualitative table

DOC = """\
**Study.** Train prefix-tuning and full fine-tuning on small random samples of the training
set (sizes 50, 100, 200, 500; several samples per size and several seeds per sample), decode
the same test inputs, and compare. As the paper suggests for low data (§7.2), the prefix is
initialised from the activations of task words ("table-to-text:"; "summarize" for XSUM).
"""


def make_scale(scale: str, task: str):
    s = replace(base_scale(scale, task), train_size=None)  # the sizes are the study's cells
    if scale == "tiny":
        return s
    if scale == "converged":
        # 2 samples per size; 200 test inputs (one output weighs 0.5%); greedy decoding; dev loss on 100 dev
        # pairs. Rates are swept at size 200 on the first sample (its sweep cells are that size's cells).
        return replace(s, train_size=None, samples=2, seeds=(1,), test_size=200, beams=1, dev_size=100,
                       sweep_max_steps=None, sweep_size=200, eval_every=0, save_every=0)
    if scale == "cpu":
        # 16 cells: 4 sizes x 2 methods x 2 samples x 1 seed, 50 steps of 8 (400 examples seen per run).
        return replace(s, max_steps=50 if task != "xsum" else s.max_steps, train_size=None, samples=2, seeds=(1,))
    return replace(s, samples=5, seeds=(1, 2))


def converged_budget(size: int, batch_size: int) -> dict:
    """Enough epochs to overfit (at least 8, and at least 300 steps), a dev evaluation about every epoch
    (every 25 steps at the least), and a stop after 3 evaluations without a new best."""
    steps_per_epoch = math.ceil(size / batch_size)
    every = max(25, steps_per_epoch)
    return dict(epochs=max(8, math.ceil(300 * batch_size / size)), eval_every=every, save_every=every)


def sizes(scale) -> tuple:
    return SIZES[scale.name]


def make_cells(task: str, scale) -> list[Cell]:
    train_options, test_options = task_options(task, scale.name)

    def params(method, size):
        params = {"init": word_init(task)} if method == "prefix" else {}
        if scale.name == "converged":
            params.update(converged_budget(size, scale.batch_size))
        if scale.name == "paper":
            # Our choice (the paper gives no low-data schedule): at least 200 steps per run and
            # a dev set of 30% of the training size for early stopping.
            batch = PAPER[task]["batch_size"]
            params.update(epochs=max(PAPER[task]["epochs"], math.ceil(200 * batch / size)),
                          dev_size=max(10, int(0.3 * size)), eval_every=max(10, size // batch))
        return params

    def cells(size, sample, seed):  # both methods at each grid point
        return [Cell(NAME, task, method, method, size, sample, seed, params(method, size), train_options,
                     {"test": test_options}, {"size": size}) for method in METHODS]

    return grid(scale, sizes(scale), cells)


def write_report(run):
    sections, verdicts = [], []
    for task, lines, ctx, metric, label in R.per_task(run):
        size_list = sizes(ctx.scale)
        aggs = {m: [R.collect(lines, metric=metric, method=m, train_size=n) for n in size_list] for m in METHODS}
        rows = []
        for n, p, f in zip(size_list, aggs["prefix"], aggs["finetune"]):
            diff = f"{p.mean - f.mean:+.1f}" if p.n and f.n else "–"
            rows.append([n, f"{p.fmt()} (n={p.n})", f"{f.fmt()} (n={f.n})", diff, R.cite(p.ids + f.ids, 4)])
        figure = R.line_figure(run.out_dir / f"lowdata_{task}.png",
                               {"prefix": list(zip(size_list, aggs["prefix"])),
                                "finetune": list(zip(size_list, aggs["finetune"]))},
                               "training examples", R.axis_label(metric), f"{task.upper()}: low-data", logx=True)
        paper = ("prefix-tuning beats fine-tuning in low data, by 2.9 BLEU on average over sizes (E2E, Fig. 3)"
                 if task in TABLE_TO_TEXT else "prefix-tuning beats fine-tuning in low data (XSUM, Fig. 3)")
        verdicts.append(R.claim(f"{task}: prefix-tuning outperforms fine-tuning in low-data settings "
                                f"(mean over sizes)", paper, aggs["prefix"], aggs["finetune"], ">",
                                a_name="prefix", b_name="finetune"))
        smallest = R.claim(f"{task}: ... including the smallest size ({size_list[0]})", "prefix above fine-tuning "
                           "across the sizes of Fig. 3", aggs["prefix"][0], aggs["finetune"][0], ">",
                           a_name="prefix", b_name="finetune")
        verdicts.append(smallest)
        sections.append(f"## {task}: {label} by training size\n\nMean ± std over samples and seeds "
                        f"(n = cells).\n\n" + R.md_table(
                            ["train size", "prefix", "finetune", "prefix − finetune", "cells"], rows) +
                        f"\n\n![low-data {task}]({R.rel(figure, run.out_dir)})\n")
        sections.append(qualitative(run, task, lines, ctx, size_list))
    return R.assemble(run, TITLE, DOC, verdicts, sections)


def qualitative(run, task, lines, ctx, size_list) -> str:
    """Generations of the first sample and seed at each size, for the first few test inputs."""
    options = lines[0]["config"]["evals"]["test"] if lines else {}
    try:
        records = select_test(ctx.records(task, "test", **options), ctx.scale.test_size)[:QUALITATIVE]
    except (FileNotFoundError, ValueError) as e:
        return f"## {task}: generations\n\n(test data unavailable here: {e})\n"
    out = [f"## {task}: generations\n\nFirst sample, first seed at each size (cells cited per row).\n"]
    for i, record in enumerate(records):
        rows = []
        for n in size_list:
            row = [n]
            ids = []
            for m in METHODS:
                line = next((l for l in lines if l["method"] == m and l["train_size"] == n and l["sample"] == 1
                             and l["seed"] == ctx.scale.seeds[0]), None)
                hyps = R.read_hypotheses(run.out_dir, line) if line else []
                row.append(hyps[i] if i < len(hyps) else "–")
                ids += [line["id"]] if line else []
            rows.append(row + [R.cite(ids)])
        source = record.source if len(record.source) < 300 else record.source[:300] + " …"
        out.append(f"**Input {i + 1}:** `{source}`  \n**A reference:** {record.references[0]}\n")
        out.append(R.md_table(["train size", "prefix", "finetune", "cells"], rows) + "\n")
    return "\n".join(out)
