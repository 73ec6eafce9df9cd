"""`main`: the paper's main tables (Tables 1 and 2): E2E, WebNLG, DART and XSUM.

Prefix-tuning (0.1%) against fine-tuning, fine-tuning the top 2 layers, and adapters at
0.1% and 3% of the parameters. At `--scale paper` with the paper's models and
hyperparameters; on CPU at small scale.
"""
from __future__ import annotations

from . import report as R
from .cell import Cell
from .scales import TABLE_TO_TEXT, base_scale, task_options, word_init
from .study import grid

NAME = "main"
TITLE = "Main results: prefix-tuning against fine-tuning, FT-top2 and adapters"
TASKS = ("e2e", "webnlg", "dart", "xsum")
DEFAULT_TASKS = ("e2e", "webnlg", "dart", "xsum")
MULTI_TASK = True
METHODS = {"prefix": ("prefix", {}), "finetune": ("finetune", {}), "finetune-top2": ("finetune-top2", {}),
           "adapter-0.1%": ("adapter", {"adapter_budget": 0.001}), "adapter-3%": ("adapter", {"adapter_budget": 0.03})}

DOC = """\
**Study.** Every method trains on the same data with the same budget of steps and decodes the
same test inputs. `--task` takes one task, a comma-separated list, or `all` (the default: the
four tasks). At paper scale: GPT-2 medium (table-to-text) and BART-large (XSUM) with the
paper's epochs, learning rates, batch sizes and beam 5. Below paper scale the prefix starts
from the activations of "table-to-text:" ("summarize" for XSUM).
"""


def make_scale(scale: str, task: str):
    return base_scale(scale, task)


def make_cells(task: str, scale) -> list[Cell]:
    train_options, test_options = task_options(task, scale.name)

    def cell(label, sample, seed):
        method, params = METHODS[label]
        p = dict(params)
        if method == "prefix" and scale.name != "paper":
            p["init"] = word_init(task)
        return Cell(NAME, task, method, label, scale.train_size, sample, seed, p, train_options,
                    {"test": test_options}, {"config": label})

    return grid(scale, METHODS, cell)


def write_report(run):
    verdicts, rows, groups = [], [], {}
    header = ["method", "trainable % (shipped %)"]
    aggs_by_task = {}
    for task, lines in run.lines.items():
        metric, label = R.headline(task, lines)
        header.append(f"{task} {label}")
        aggs = {name: R.collect(lines, metric=metric, label=name) for name in METHODS}
        aggs_by_task[task] = aggs
        groups[task] = aggs
        if task in TABLE_TO_TEXT:
            verdicts.append(R.claim(f"{task}: prefix (0.1%) comparable to fine-tuning",
                                    "prefix-tuning comparable to fine-tuning on table-to-text (Table 1)",
                                    aggs["prefix"], aggs["finetune"], "~", a_name="prefix", b_name="finetune"))
            verdicts.append(R.claim(f"{task}: prefix beats the same-budget adapter (0.1%)",
                                    "prefix above adapter-0.1% (Table 1)", aggs["prefix"], aggs["adapter-0.1%"],
                                    ">", a_name="prefix", b_name="adapter-0.1%"))
            verdicts.append(R.claim(f"{task}: prefix beats FT-top2", "prefix above FT-top2 (Table 1)",
                                    aggs["prefix"], aggs["finetune-top2"], ">", a_name="prefix",
                                    b_name="finetune-top2"))
        else:
            verdicts.append(R.claim(f"{task}: prefix slightly below fine-tuning on summarisation",
                                    "prefix a little below fine-tuning on XSUM (Table 2)", aggs["prefix"],
                                    aggs["finetune"], "<", a_name="prefix", b_name="finetune"))
    for name in METHODS:
        first = next((ls for ls in run.lines.values() if any(l["label"] == name for l in ls)), [])
        row = [name, R.percent_of(first, label=name)]
        for task in run.lines:
            a = aggs_by_task[task][name]
            row.append(f"{a.fmt()} (n={a.n}) {R.cite(a.ids, 2)}")
        rows.append(row)
    figure = R.bar_figure(run.out_dir / "main.png", groups, "score (each task's headline metric)",
                          "Main results")
    sections = ["## Results\n\n" + R.md_table(header, rows) + f"\n\n![main]({R.rel(figure, run.out_dir)})\n"]
    return R.assemble(run, TITLE, DOC, verdicts, sections)
