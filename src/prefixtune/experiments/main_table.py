"""`main`: the paper's main tables (Tables 1 and 2): E2E, WebNLG, DART and XSUM.

Prefix-tuning (0.1%) against fine-tuning, fine-tuning the top 2 layers, and adapters at
0.1% and 3% of the parameters. At `--scale paper` with the paper's models and
hyperparameters; on CPU at small scale.
"""
from __future__ import annotations

from . import report as R
from .cell import Cell
from .runner import EVAL_DECODING
from .table1 import BEAM_SUBSET, dart_in_full, extrapolation_claim, webnlg_in_full
from .scales import TABLE_TO_TEXT, base_scale, task_options, word_init
from .study import grid

NAME = "main"
TITLE = "Main results: prefix-tuning against fine-tuning, FT-top2 and adapters"
TASKS = ("e2e", "webnlg", "dart", "xsum")
DEFAULT_TASKS = ("e2e", "webnlg", "dart", "xsum")
MULTI_TASK = True
METHODS = {"prefix": ("prefix", {}), "finetune": ("finetune", {}), "finetune-top2": ("finetune-top2", {}),
           "adapter-0.1%": ("adapter", {"adapter_budget": 0.001}), "adapter-3%": ("adapter", {"adapter_budget": 0.03})}

# The paper's Table 1, E2E (GPT-2 medium, the whole training set, beam 5): BLEU, NIST, METEOR, ROUGE-L, CIDEr.
PAPER_E2E = {"prefix": (69.7, 8.81, 46.1, 71.4, 2.49), "finetune": (68.2, 8.62, 46.2, 71.0, 2.47),
             "finetune-top2": (68.1, 8.59, 46.0, 70.8, 2.41), "adapter-0.1%": (66.3, 8.41, 45.0, 69.8, 2.40),
             "adapter-3%": (68.9, 8.71, 46.1, 71.3, 2.47)}
E2E_METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "SER")

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
        evals = {"test": test_options}
        if scale.beam_subset:
            evals[BEAM_SUBSET] = {**test_options, EVAL_DECODING: dict(scale.beam_subset)}
        return Cell(NAME, task, method, label, scale.train_size, sample, seed, p, train_options,
                    evals, {"config": label})

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
    if "e2e" in run.lines:
        sections.append(e2e_in_full(run.lines["e2e"]))
    if "webnlg" in run.lines:
        verdicts.append(extrapolation_claim(run.lines["webnlg"]))
        sections.append(webnlg_in_full(run.lines["webnlg"]))
    if "dart" in run.lines:
        sections.append(dart_in_full(run.lines["dart"]))
    return R.assemble(run, TITLE, DOC, verdicts, sections)


def e2e_in_full(lines: list[dict]) -> str:
    """Every E2E metric of every method (mean over its cells) beside the paper's Table 1."""
    def ours(name, metric):
        a = R.collect(lines, metric=metric, label=name)
        if not a.n:
            return "–"
        return f"{a.mean:.2f}" if metric in ("NIST", "CIDEr") else f"{a.mean:.1f}"

    header = ["method"] + [f"{m} (ours / paper)" if m != "SER" else "SER % (ours)" for m in E2E_METRICS]
    rows = []
    for name in METHODS:
        paper = PAPER_E2E[name]
        row = [name]
        for i, metric in enumerate(E2E_METRICS):
            digits = 2 if metric in ("NIST", "CIDEr") else 1
            row.append(ours(name, metric) if metric == "SER" else f"{ours(name, metric)} / {paper[i]:.{digits}f}")
        rows.append(row)
    return ("## E2E in full, beside the paper's Table 1\n\n" + R.md_table(header, rows) + "\n\n"
            "The paper: GPT-2 medium (345M parameters), the whole E2E training set (42k pairs), 5 epochs, beam 5 "
            "on the test set. Here: SmolLM2-135M, one fixed subset of the training set, each method trained until "
            "its dev loss stopped improving (at most the scale's epochs), its rate chosen on dev loss, beam 5 on "
            "the same test set. SER (slot error rate, Dušek et al. 2019; lower is better) is not in the paper. "
            "A dash: the method's cells have not run yet.\n")
