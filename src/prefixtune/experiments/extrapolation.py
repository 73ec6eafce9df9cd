"""`extrapolation`: train on some categories or topics, test on unseen ones (the paper's §6.4, Tables 1 and 3).

* WebNLG: train on the 10 seen categories, test on seen and unseen categories separately;
  prefix against fine-tuning and adapters (0.1% and 3%).
* XSUM (the local sample): news -> sport, and within news (world/UK/business -> other topics);
  prefix against fine-tuning.
"""
from __future__ import annotations

from dataclasses import replace

from . import report as R
from .cell import Cell
from .scales import base_scale, word_init
from .study import grid

NAME = "extrapolation"
TITLE = "Extrapolation to unseen categories and topics"
TASKS = ("webnlg", "xsum")
DEFAULT_TASKS = ("webnlg",)
MULTI_TASK = False
WEBNLG_METHODS = {"prefix": ("prefix", {}), "finetune": ("finetune", {}),
                  "adapter-0.1%": ("adapter", {"adapter_budget": 0.001}),
                  "adapter-3%": ("adapter", {"adapter_budget": 0.03})}
XSUM_METHODS = {"prefix": ("prefix", {}), "finetune": ("finetune", {})}
XSUM_SCHEMES = ("news-sport", "within-news")

DOC = """\
**Study.** Train on data from some categories (topics) and measure how well each method carries
over to categories it never saw. WebNLG: train on the 10 training categories, evaluate the seen
and the 5 unseen test categories separately. XSUM: train on news and test on sport, or train on
world/UK/business news and test on the other news topics. Below paper scale the prefix starts
from the activations of "table-to-text:" ("summarize" for XSUM).
"""


def make_scale(scale: str, task: str):
    s = base_scale(scale, task)
    if scale == "cpu" and task == "webnlg":
        # 8 cells: 4 methods x 2 seeds, 60 steps of 8 on 1,000 sampled pairs; 40 seen + 40 unseen test entries.
        return replace(s, seeds=(1, 2), test_size=40)
    if scale == "cpu" and task == "xsum":
        # 4 cells: 2 schemes x 2 methods x 1 seed, 40 steps of 4; 20 test articles per scheme.
        return replace(s, train_size=None)
    if scale == "paper" and task == "xsum":
        return replace(s, train_size=None)
    return s


def make_cells(task: str, scale) -> list[Cell]:
    init = {"init": word_init(task)} if scale.name != "paper" else {}

    def params(method, base):
        return {**base, **(init if method == "prefix" else {})}

    if task == "webnlg":
        def webnlg_cell(label, sample, seed):
            method, p = WEBNLG_METHODS[label]
            return Cell(NAME, task, method, label, scale.train_size, sample, seed, params(method, p), {},
                        {"seen": {"subset": "seen"}, "unseen": {"subset": "unseen"}}, {"config": label})

        return grid(scale, WEBNLG_METHODS, webnlg_cell)

    def xsum_cell(config, sample, seed):
        scheme, label = config
        method, p = XSUM_METHODS[label]
        return Cell(NAME, task, method, label, scale.train_size, sample, seed, params(method, p),
                    {"scheme": scheme}, {"test": {"scheme": scheme}}, {"config": label, "scheme": scheme})

    return grid(scale, [(scheme, label) for scheme in XSUM_SCHEMES for label in XSUM_METHODS], xsum_cell)


def write_report(run):
    sections, verdicts, metric_names = [], [], {}
    for task, lines in run.lines.items():
        if task == "webnlg":
            s, v, m = webnlg_section(run, lines)
        else:
            s, v, m = xsum_section(run, lines)
        sections += s
        verdicts += v
        metric_names[task] = m
    return R.assemble(run, TITLE, DOC, verdicts, sections, metric_names)


def webnlg_section(run, lines):
    metric, label = R.headline("webnlg", lines, "seen")
    if metric != R.headline("webnlg", lines, "unseen")[0]:
        metric, label = "sacreBLEU", R.metric_label("webnlg", "sacreBLEU")
    aggs = {name: {e: R.collect(lines, e, metric, label=name) for e in ("seen", "unseen")} for name in WEBNLG_METHODS}
    rows = []
    for name, by_eval in aggs.items():
        s, u = by_eval["seen"], by_eval["unseen"]
        gap = f"{s.mean - u.mean:.1f}" if s.n and u.n else "–"
        rows.append([name, R.percent_of(lines, label=name), f"{s.fmt()} (n={s.n})",
                     f"{u.fmt()} (n={u.n})", gap, R.cite(s.ids, 4)])
    figure = R.bar_figure(run.out_dir / "extrapolation_webnlg.png",
                          {e: {name: aggs[name][e] for name in WEBNLG_METHODS} for e in ("seen", "unseen")},
                          R.axis_label(metric), "WebNLG: seen vs unseen categories")
    section = (f"## WebNLG: {label} on seen and unseen categories\n\n" +
               R.md_table(["method", "trainable % (shipped %)", "seen", "unseen", "seen − unseen", "cells"], rows) +
               f"\n\n![extrapolation webnlg]({R.rel(figure, run.out_dir)})\n")
    verdicts = [
        R.claim("webnlg: prefix-tuning beats fine-tuning on unseen categories",
                "prefix above fine-tuning on the unseen categories (Table 1)", aggs["prefix"]["unseen"],
                aggs["finetune"]["unseen"], ">", a_name="prefix", b_name="finetune"),
        R.claim("webnlg: adapter (3%) beats fine-tuning on unseen categories",
                "lightweight methods extrapolate better than fine-tuning (Table 1)", aggs["adapter-3%"]["unseen"],
                aggs["finetune"]["unseen"], ">", a_name="adapter-3%", b_name="finetune"),
        R.claim("webnlg: adapter (0.1%) extrapolates comparably to prefix-tuning",
                "adapter-tuning's extrapolation is comparable with prefix-tuning's (§6.4)", aggs["prefix"]["unseen"],
                aggs["adapter-0.1%"]["unseen"], "~", a_name="prefix", b_name="adapter-0.1%"),
    ]
    return [section], verdicts, {"seen": metric, "unseen": metric}


def xsum_section(run, lines):
    metric, label = R.headline("xsum", lines)
    aggs = {name: {s: R.collect(lines, metric=metric, config=name, scheme=s) for s in XSUM_SCHEMES}
            for name in XSUM_METHODS}
    rows = [[name] + [f"{aggs[name][s].fmt(2)} (n={aggs[name][s].n})" for s in XSUM_SCHEMES] +
            [R.cite([i for s in XSUM_SCHEMES for i in aggs[name][s].ids], 4)] for name in XSUM_METHODS]
    figure = R.bar_figure(run.out_dir / "extrapolation_xsum.png",
                          {s: {name: aggs[name][s] for name in XSUM_METHODS} for s in XSUM_SCHEMES},
                          R.axis_label(metric), "XSUM: extrapolation to new topics")
    section = (f"## XSUM: {label} on unseen topics\n\n" +
               R.md_table(["method"] + list(XSUM_SCHEMES) + ["cells"], rows) +
               f"\n\n![extrapolation xsum]({R.rel(figure, run.out_dir)})\n")
    verdicts = [R.claim(f"xsum {s}: prefix-tuning beats fine-tuning", "prefix above fine-tuning (Table 3)",
                        aggs["prefix"][s], aggs["finetune"][s], ">", a_name="prefix", b_name="finetune")
                for s in XSUM_SCHEMES]
    return [section], verdicts, {"test": metric}
