"""The paper's Table 1 beside ours: WebNLG and DART in full, and the summary over the three datasets.

`prefixtune experiment table1` writes `reports/table1/` from the finished cells of the three converged
main-table studies (it runs nothing): every method on E2E, WebNLG seen/unseen/all and DART beside the
paper's numbers, the paper's three claims on the average over the datasets (as the paper computes them),
and the extrapolation claim on WebNLG's unseen categories.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..atomic import atomic_write_bytes
from . import report as R
from .runner import CELLS_FILE, CellStore

# Where the converged studies write their cells (the commands in docs/experiments.md).
SOURCES = {"e2e": "reports/main-e2e-10epochs", "webnlg": "reports/main-webnlg", "dart": "reports/main-dart"}
DATASETS = {"e2e": "E2E", "webnlg": "WebNLG (A)", "dart": "DART"}
METHODS = ("prefix", "finetune", "finetune-top2", "adapter-0.1%", "adapter-3%")

# Li & Liang (2021), Table 1, GPT-2 medium. METEOR and TER as ours (x100; the paper prints 0.44 for 44).
# The averages of BLEU over E2E, WebNLG (A) and DART reproduce the paper's "+4.1 BLEU over adapter-0.1%".
PAPER_WEBNLG = {  # BLEU S/U/A, METEOR S/U/A, TER S/U/A (lower is better)
    "finetune": (64.2, 27.7, 46.5, 45, 30, 38, 33, 76, 53),
    "finetune-top2": (53.6, 18.9, 36.0, 38, 23, 31, 49, 99, 72),
    "adapter-3%": (60.4, 48.3, 54.9, 43, 38, 41, 35, 45, 39),
    "adapter-0.1%": (54.5, 45.1, 50.2, 39, 36, 38, 40, 46, 43),
    "prefix": (62.9, 45.6, 55.1, 44, 38, 41, 35, 49, 41),
}
WEBNLG_METRICS = ("BLEU_seen", "BLEU_unseen", "BLEU", "METEOR_seen", "METEOR_unseen", "METEOR",
                  "TER_seen", "TER_unseen", "TER")
PAPER_DART = {  # BLEU, METEOR, TER
    "finetune": (46.2, 39, 46), "finetune-top2": (41.0, 34, 56), "adapter-3%": (45.2, 38, 46),
    "adapter-0.1%": (42.4, 36, 48), "prefix": (46.4, 39, 46),
}
DART_METRICS = ("BLEU", "METEOR", "TER")
PAPER_BLEU = {"e2e": {"prefix": 69.7, "finetune": 68.2, "finetune-top2": 68.1, "adapter-0.1%": 66.3, "adapter-3%": 68.9},
              "webnlg": {m: v[2] for m, v in PAPER_WEBNLG.items()}, "dart": {m: v[0] for m, v in PAPER_DART.items()}}
BEAM_SUBSET = "test-beam-subset"  # main_table's name for a scale's beam_subset evaluation


def _ours(lines: list[dict], label: str, metric: str, evaluation: str = "test") -> str:
    agg = R.collect(lines, evaluation=evaluation, metric=metric, label=label)
    return agg.fmt() if agg.n else "–"


def webnlg_in_full(lines: list[dict]) -> str:
    """BLEU, METEOR and TER on the seen (S), unseen (U) and all (A) categories, ours / the paper's."""
    header = ["method"] + [m.replace("_seen", " S").replace("_unseen", " U") + ("" if "_" in m else " A")
                           for m in WEBNLG_METRICS]
    rows = [[name] + [f"{_ours(lines, name, m)} / {PAPER_WEBNLG[name][i]:g}" for i, m in enumerate(WEBNLG_METRICS)]
            for name in METHODS]
    table = R.md_table(header, rows)
    return ("## WebNLG in full, beside the paper's Table 1 (ours / paper)\n\n" + table + "\n\n"
            "S: the 10 categories seen in training (971 test entries); U: the 5 unseen ones (891); A: all 1,862. "
            "TER: lower is better. The paper: GPT-2 medium on all of WebNLG's training set; here SmolLM2-135M on "
            "2,000 training pairs." + _dash_note(table, "the method's cell has not run yet") + "\n")


def _dash_note(table: str, meaning: str) -> str:  # only while some cell is missing
    return f" A dash: {meaning}." if "–" in table else ""


def dart_in_full(lines: list[dict]) -> str:
    """BLEU, METEOR and TER, ours / the paper's, and what greedy decoding costs on the beam subset."""
    header = ["method"] + list(DART_METRICS) + ["beam subset: BLEU beam 5", "same inputs greedy", "gap"]
    rows = []
    for name in METHODS:
        row = [name] + [f"{_ours(lines, name, m)} / {PAPER_DART[name][i]:g}" for i, m in enumerate(DART_METRICS)]
        beam = R.collect(lines, evaluation=BEAM_SUBSET, metric="BLEU", label=name)
        greedy = R.collect(lines, evaluation=f"{BEAM_SUBSET}:scale-decoding", metric="BLEU", label=name)
        gap = f"{beam.mean - greedy.mean:+.1f}" if beam.n and greedy.n else "–"
        rows.append(row + [beam.fmt() if beam.n else "–", greedy.fmt() if greedy.n else "–", gap])
    return ("## DART in full, beside the paper's Table 1 (ours / paper)\n\n" + R.md_table(header, rows) + "\n\n"
            "The whole test set (5,097 inputs) decoded greedily; beam 5 (the paper's decoding) on a fixed subset of "
            "500 inputs, with the greedy outputs of the same inputs beside it. The paper's BERTScore, MoverScore and "
            "BLEURT need model weights this machine cannot download. TER: lower is better.\n")


def extrapolation_claim(lines: list[dict]) -> R.Verdict:
    return R.claim("webnlg: prefix beats fine-tuning on the unseen categories (U)",
                   "extrapolation: prefix 45.6 vs fine-tuning 27.7 BLEU on WebNLG U (Table 1, §6.4)",
                   R.collect(lines, metric="BLEU_unseen", label="prefix"),
                   R.collect(lines, metric="BLEU_unseen", label="finetune"), ">", a_name="prefix", b_name="finetune")


def final_lines(directory: Path) -> list[dict]:
    """A study's finished final cells (not its learning-rate sweep), in file order: one per method. A method with
    two (cells of other settings left in the folder, say) is refused: averaged into one cell, they would move a
    Table 1 number silently."""
    done = CellStore(directory / CELLS_FILE).load()
    lines = [line for line in done.values() if not line.get("tags", {}).get("sweep")]
    by_label: dict = {}
    for line in lines:
        by_label.setdefault(line.get("label"), []).append(line)
    for label, group in by_label.items():
        if len(group) > 1:
            cells = "; ".join(f"{line['id']} ({_settings(line)})" for line in group)
            raise ValueError(f"{directory / CELLS_FILE}: {len(group)} final cells of {label}: {cells}. Table 1 takes "
                             f"one per method: move the cells of other settings out of the folder")
    return lines


def _settings(line: dict) -> str:
    return ", ".join(f"{k} {line[k]}" for k in ("scale", "scale_epochs", "rates_from", "model", "lr")
                     if line.get(k) is not None) or "no settings recorded"


def average_claims(per_dataset: dict[str, list[dict]]) -> list[R.Verdict]:
    """The paper's three claims on BLEU averaged over the datasets where both sides have a cell."""
    def aggs(label):
        return {task: R.collect(lines, metric="BLEU", label=label) for task, lines in per_dataset.items()}

    prefix = aggs("prefix")
    verdicts = []
    for other, expect, text, paper in (
            ("finetune", "~", "prefix (0.1%) comparable to fine-tuning", "prefix 57.1 vs fine-tuning 53.6"),
            ("adapter-0.1%", ">", "prefix beats the same-budget adapter (0.1%)", "prefix 57.1 vs adapter-0.1% 53.0 (+4.1)"),
            ("finetune-top2", ">", "prefix beats FT-top2", "prefix 57.1 vs FT-top2 48.4")):
        theirs = aggs(other)
        both = [t for t in per_dataset if prefix[t].n and theirs[t].n]
        where = ", ".join(DATASETS[t] for t in both) or "no dataset yet"
        verdict = R.claim(f"{text}: BLEU averaged over {where}", f"{paper} (average BLEU over the three datasets)",
                          [prefix[t] for t in both], [theirs[t] for t in both], expect,
                          a_name="prefix", b_name=other)
        if len(both) < len(DATASETS):
            verdict.verdict = f"{verdict.verdict} (on {len(both)} of {len(DATASETS)} datasets so far)"
        verdicts.append(verdict)
    return verdicts


def summary_table(per_dataset: dict[str, list[dict]]) -> str:
    header = ["method", "E2E BLEU", "WebNLG BLEU S", "WebNLG BLEU U", "WebNLG BLEU A", "DART BLEU", "average"]
    rows = []
    for name in METHODS:
        values, row = [], [name]
        for task, metrics in (("e2e", ("BLEU",)), ("webnlg", ("BLEU_seen", "BLEU_unseen", "BLEU")), ("dart", ("BLEU",))):
            for metric in metrics:
                agg = R.collect(per_dataset.get(task, []), metric=metric, label=name)
                paper = (PAPER_WEBNLG[name][WEBNLG_METRICS.index(metric)] if task == "webnlg"
                         else PAPER_BLEU[task][name])
                row.append(f"{agg.fmt() if agg.n else '–'} / {paper:g}")
                if metric == "BLEU" and agg.n:
                    values.append(agg.mean)
        paper_avg = statistics.fmean(PAPER_BLEU[t][name] for t in DATASETS)
        ours = f"{statistics.fmean(values):.1f}" if len(values) == len(DATASETS) else f"– ({len(values)} of 3)"
        rows.append(row + [f"{ours} / {paper_avg:.1f}"])
    return R.md_table(header, rows)


def write_summary(out: str | Path = "reports/table1", sources: dict[str, str] | None = None) -> dict:
    """Write OUT/report.md (and OUT/table1.json) from the three studies' cells; returns what it found."""
    out = Path(out)
    sources = dict(SOURCES if sources is None else sources)
    per_dataset = {task: final_lines(Path(path)) for task, path in sources.items()}
    if not any(per_dataset.values()):  # e.g. run from another directory: not a report of dashes and "no dataset yet"
        raise FileNotFoundError(f"table1: no finished cells in {', '.join(map(str, sources.values()))} (relative to "
                                f"{Path.cwd()}): run it from the folder that holds the main studies' reports")
    verdicts = average_claims(per_dataset) + [extrapolation_claim(per_dataset.get("webnlg", []))]
    command = "prefixtune experiment table1 --out " + str(out)
    reading = out / R.READING
    parts = [f"# Table 1 at converged scale: E2E, WebNLG and DART\n\nMade by `{command}` from the finished cells of "
             + ", ".join(f"[{DATASETS[t]}]({Path('..') / Path(p).name / 'report.md'})" for t, p in sources.items())
             + ". Each number names its cells in those reports; nothing here is run.\n",
             "## The paper's claims and our numbers\n\n" + R.verdict_table(verdicts) + "\n\n"
             "The paper averages BLEU over E2E, WebNLG (A) and DART. Every number here is one cell (one seed), so "
             "the margin is the convention for single cells (±1.0 BLEU).\n"]
    if reading.is_file():
        parts.append("## Reading\n\n" + reading.read_text().strip() + "\n")
    groups = {label: {name: R.collect(per_dataset.get(task, []), metric=metric, label=name) for name in METHODS}
              for label, task, metric in (("E2E", "e2e", "BLEU"), ("WebNLG S", "webnlg", "BLEU_seen"),
                                          ("WebNLG U", "webnlg", "BLEU_unseen"), ("WebNLG A", "webnlg", "BLEU"),
                                          ("DART", "dart", "BLEU"))}
    figure = R.bar_figure(out / "table1.png", groups, "BLEU", "Table 1 at converged scale (SmolLM2-135M)")
    summary = summary_table(per_dataset)
    parts += ["## BLEU on every dataset (ours / paper)\n\n" + summary + "\n\n"
              "Ours: SmolLM2-135M, 2,000 training pairs per dataset, each method trained until its dev loss stopped "
              "improving (at most 10 epochs), at the rate its E2E sweep chose. The paper: GPT-2 medium on the whole "
              f"training sets.{_dash_note(summary, 'not run yet')}\n\n![Table 1]({figure.name})\n",
              webnlg_in_full(per_dataset.get("webnlg", [])), dart_in_full(per_dataset.get("dart", []))]
    atomic_write_bytes(out / "report.md", "\n".join(parts).encode())
    found = {task: len(lines) for task, lines in per_dataset.items()}
    atomic_write_bytes(out / "table1.json", (json.dumps(
        {"cells": found, "verdicts": [{"claim": v.claim, "ours": v.ours, "verdict": v.verdict} for v in verdicts]},
        indent=1) + "\n").encode())
    return {"report": str(out / "report.md"), "cells": found}
