"""The report writer: mean ± std tables, claim verdicts computed from the numbers, PNG figures.

Every aggregated number names the cells (ids in `cells.jsonl`) it comes from, and
the report ends with a table of every cell, so each number is traceable to a line.
"""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_write_bytes
from .aggregate import Agg
from .figures import bar_figure, line_figure  # noqa: F401  (studies draw through R.*)
from .runner import primary_metric

HELD, NOT_HELD, INCONCLUSIVE = "held", "did not hold", "inconclusive at this scale"
READING = "reading.md"  # an optional hand-written interpretation in the report folder, shown after the verdicts
MIN_MARGIN = 0.5  # points: a difference smaller than this is never called either way


def collect(lines: list[dict], evaluation: str = "test", metric: str | None = None, **match) -> Agg:
    """The metric of every line whose fields (or tags) equal `match`."""
    values, ids = [], []
    for line in lines:
        tags = line.get("tags", {})
        if all((tags[k] if k in tags else line.get(k)) == v for k, v in match.items()):
            m = line["metrics"].get(evaluation, {})
            value = m.get(metric) if metric else line["primary"].get(evaluation)
            if value is not None:
                values.append(float(value))
                ids.append(line["id"])
    return Agg(values, ids)


@dataclass
class Verdict:
    claim: str
    paper: str
    ours: str
    verdict: str
    cells: list[str] = field(default_factory=list)


def compare(a: Agg | list[Agg], b: Agg | list[Agg], expect: str = ">") -> tuple[float, float, str]:
    """(difference a - b, margin, verdict) for the claim "a `expect` b".

    With lists, the difference is the mean of the per-pair differences (e.g. over data sizes).
    The margin is max(1 standard error of the difference, MIN_MARGIN); with a single cell on a side
    the standard error is unknown and the margin is 2 x MIN_MARGIN. The claim held when the difference
    has the expected sign beyond the margin, did not hold when it has the other sign beyond it, and is
    inconclusive otherwise. `expect="~"` (comparable) holds when |difference| <= margin + 2 points.
    """
    pairs = list(zip(a, b)) if isinstance(a, list) else [(a, b)]
    pairs = [(x, y) for x, y in pairs if x.n and y.n]
    if not pairs:
        return float("nan"), float("nan"), INCONCLUSIVE
    diffs = [x.mean - y.mean for x, y in pairs]
    diff = statistics.fmean(diffs)
    ses = [None if x.se is None or y.se is None else math.hypot(x.se, y.se) for x, y in pairs]
    if any(s is None for s in ses):
        margin = 2 * MIN_MARGIN
    else:
        margin = max(math.sqrt(sum(s * s for s in ses)) / len(ses), MIN_MARGIN)
    if expect == "~":
        return diff, margin, HELD if abs(diff) <= margin + 2.0 else NOT_HELD
    sign = 1 if expect == ">" else -1
    if sign * diff > margin:
        return diff, margin, HELD
    if sign * diff < -margin:
        return diff, margin, NOT_HELD
    return diff, margin, INCONCLUSIVE


def claim(text: str, paper: str, a, b, expect: str = ">", unit: str = "", a_name: str = "", b_name: str = "") -> Verdict:
    diff, margin, verdict = compare(a, b, expect)
    aggs = (a if isinstance(a, list) else [a]) + (b if isinstance(b, list) else [b])
    ids = [i for agg in aggs for i in agg.ids]
    if math.isnan(diff):
        ours = "no finished cells"
    else:
        side = lambda x: statistics.fmean(g.mean for g in (x if isinstance(x, list) else [x]) if g.n)
        ours = (f"{a_name or 'A'} {side(a):.1f} vs {b_name or 'B'} {side(b):.1f}: difference {diff:+.2f}{unit} "
                f"(margin ±{margin:.2f})")
    return Verdict(text, paper, ours, verdict, ids)


def percent_of(lines: list[dict], **match) -> str:
    """"trainable % (shipped %)" of the first line matching, e.g. "4.59 (0.086)" for a prefix with its MLP."""
    for line in lines:
        tags = line.get("tags", {})
        if all((tags[k] if k in tags else line.get(k)) == v for k, v in match.items()):
            t, s = line["trainable_pct"], line["shipped_pct"]
            return f"{t:.3g}" if abs(t - s) < 1e-9 else f"{t:.3g} ({s:.3g})"
    return "–"


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for row in rows:
        out.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |")
    return "\n".join(out)


def cite(ids: list[str], limit: int = 12) -> str:
    shown = ", ".join(f"`{i}`" for i in ids[:limit])
    return shown + (f", … (+{len(ids) - limit})" if len(ids) > limit else "")


def verdict_table(verdicts: list[Verdict]) -> str:
    return md_table(["claim", "paper", "ours", "verdict", "cells"],
                    [[v.claim, v.paper, v.ours, f"**{v.verdict}**", cite(v.cells, 6)] for v in verdicts])


def cells_table(lines: list[dict], metric_names: dict[str, str]) -> str:
    """Every cell: its id, configuration, metric(s) and cost; the report's numbers come from these rows."""
    header = ["cell", "label", "train size", "sample", "seed"] + [f"{e}: {m}" for e, m in metric_names.items()] + \
             ["dev loss", "trainable %", "shipped %", "steps", "stopped by", "tokens/s", "elapsed s",
              "hypotheses, curve"]
    rows = []
    for line in lines:
        metrics = []
        for e, m in metric_names.items():
            value = line["metrics"].get(e, {}).get(m)
            metrics.append("–" if value is None else f"{value:.2f}")
        hyps = ", ".join([*(f"[{e}]({p})" for e, p in line["hypotheses"].items()),
                          *([f"[curve]({line['curve']})"] if line.get("curve") else [])])  # its loss curve, linkable
        dev_loss = line.get("best_dev_loss")  # none when a cell trains without a dev set
        rows.append([f"`{line['id']}`", line["label"], line["train_size"] if line["train_size"] else "all",
                     line["sample"], line["seed"], *metrics, "–" if dev_loss is None else f"{dev_loss:.3f}",
                     f"{line['trainable_pct']:.4g}",
                     f"{line['shipped_pct']:.4g}", line["steps"], stopped_by(line),
                     f"{line['tokens_per_s']:.0f}", f"{line['elapsed_s']:.0f}", hyps])
    return md_table(header, rows)


def stopped_by(line: dict) -> str:
    """Why a cell's training ended, and after how many epochs (cells run before this was recorded had no
    early stopping: a step budget ended them, or their epochs)."""
    if "stop_reason" not in line:
        return "step limit" if line.get("config", {}).get("train", {}).get("max_steps") else "epoch limit"
    return f"{line['stop_reason'].replace('_', ' ')} ({line['epochs_run']:.3g} ep)"


def scale_table(scale, model_name: str, notes: list[str] = ()) -> str:
    d = scale.describe()
    rows = [["model", model_name], ["scale", d.pop("name")]]
    rows += [[k, v] for k, v in d.items()]
    rows += [["note", n] for n in notes]
    return md_table(["setting", "value"], rows)


def total_hours(lines: list[dict]) -> float:
    return sum(line["elapsed_s"] for line in lines) / 3600


def write_report(out_dir: Path, text: str) -> Path:
    path = Path(out_dir) / "report.md"
    atomic_write_bytes(path, (text.rstrip() + "\n").encode())
    return path


def header(title: str, command: str, study_doc: str) -> str:
    return (f"# {title}\n\nRegenerate this report (finished cells are reused, missing ones are run), with "
            f"`PREFIXTUNE_DATA` pointing at the datasets (or add `--data-dir DIR`):\n\n"
            f"```bash\n{command}\n```\n\n{study_doc.strip()}\n")


def rel(path: Path, out_dir: Path) -> str:
    return os.path.relpath(path, out_dir)


VERDICT_RULE = (f"A claim **held** when our difference has the paper's sign and exceeds its margin "
                f"(one standard error of the difference over samples and seeds, at least {MIN_MARGIN} points; "
                f"{2 * MIN_MARGIN} points when a side has a single cell), **did not hold** when it has the opposite "
                f"sign beyond the margin, and is **inconclusive at this scale** otherwise; a claim that two "
                f"methods are *comparable* held when they differ by at most the margin plus 2 points. "
                f"Verdicts are computed "
                f"from the numbers in `cells.jsonl` each time the report is written.")


def axis_label(metric: str) -> str:
    return {"sacreBLEU": "BLEU (sacreBLEU)", "ROUGE_2": "ROUGE-2", "ROUGE_L": "ROUGE-L", "ROUGE_1": "ROUGE-1"}.get(
        metric, metric)


def metric_label(task: str, metric: str) -> str:
    if metric == "sacreBLEU":
        return "BLEU (sacreBLEU, lowercased, grouped references)"
    return {"BLEU": "BLEU (official-equal script)", "ROUGE_2": "ROUGE-2"}.get(metric, metric)


def headline(task: str, lines: list[dict], evaluation: str = "test") -> tuple[str, str]:
    """The metric a task's tables show (its headline metric, or the sacreBLEU fallback) and its label."""
    metric = primary_metric(task, lines, evaluation)
    return metric, metric_label(task, metric)


def per_task(run):
    """(task, its finished lines, its context, headline metric, the metric's label) for each task of a run."""
    for task, lines in run.lines.items():
        metric, label = headline(task, lines)
        yield task, lines, run.contexts[task], metric, label


def assemble(run, title: str, doc: str, verdicts: list[Verdict], sections: list[str],
             metric_names: dict[str, dict[str, str]] | None = None, notes: dict[str, list[str]] | None = None) -> Path:
    """The report: command, claims with verdicts, the study's sections, scale, and every cell.

    `metric_names`: task -> evaluation -> metric shown in the cells table (default: each task's headline metric).
    """
    if metric_names is None:
        metric_names = {task: {"test": headline(task, lines)[0]} for task, lines in run.lines.items()}
    parts = [header(title, run.command, doc)]
    finished = sum(len(v) for v in run.lines.values())
    planned = sum(run.planned.values())
    if finished < planned:
        parts.append(f"> **Incomplete:** {finished} of {planned} cells have finished; the numbers below use "
                     f"those. Re-run the command to finish the rest.\n")
    parts.append("## The paper's claims and our numbers\n")
    parts.append(verdict_table(verdicts) if verdicts else "No claims could be checked (no finished cells).")
    parts.append("\n" + VERDICT_RULE + "\n")
    reading = run.out_dir / READING
    if reading.is_file():  # the one hand-written part: what the numbers mean, kept across regenerations
        parts.append(f"## Reading\n\n*Written by hand from the tables of this report (`{READING}`); "
                     f"everything else is generated.*\n\n{reading.read_text().strip()}\n")
    parts += sections
    for task, rows in getattr(run, "sweeps", {}).items():
        from .sweep import SWEEP_HEADER

        parts.append(f"## Learning rates{f' ({task})' if len(run.lines) > 1 else ''}: chosen on dev loss\n\n"
                     "Each configuration's first sample was trained once per rate; the rate with the lowest "
                     "dev loss (its best evaluation) is used by every cell of that configuration. Every method "
                     "went through the same procedure. Test scores played no part in the choice.\n\n"
                     + md_table(SWEEP_HEADER, rows) + "\n")
    parts.append("## Scale\n")
    for task, ctx in run.contexts.items():
        lines = run.lines[task]
        hours = total_hours(lines)
        parts.append(f"**{task}** — {len(lines)} cells, {hours:.2f} h of compute in all "
                     f"({'%.0f' % (hours * 3600 / len(lines)) if lines else '–'} s per cell on average).\n")
        parts.append(scale_table(ctx.scale, ctx.model_name, (notes or {}).get(task, [])) + "\n")
    retried = getattr(run, "retried", {})
    if retried:  # Ray: a task whose worker or node died ran again (its numbers are those of the attempt that finished)
        parts.append(f"{len(retried)} cell(s) ran again after their Ray task died: "
                     + ", ".join(f"`{i}` ({n} attempts)" for i, n in sorted(retried.items())) + ".\n")
    parts.append("## Every cell\n")
    parts.append("Each row is one line of `cells.jsonl` (same `id`), which also holds the full configuration, "
                 "every metric, the dev losses and timings; `hypotheses/` holds each cell's generations.\n")
    for task, lines in run.lines.items():
        if len(run.lines) > 1:
            parts.append(f"### {task}\n")
        parts.append(cells_table(lines, metric_names.get(task, {"test": "sacreBLEU"})) + "\n")
    return write_report(run.out_dir, "\n".join(parts))


def read_hypotheses(out_dir: Path, line: dict, evaluation: str = "test") -> list[str]:
    path = Path(out_dir) / line["hypotheses"][evaluation]
    if not path.is_file():
        return []
    return path.read_text(encoding="utf-8").split("\n")
