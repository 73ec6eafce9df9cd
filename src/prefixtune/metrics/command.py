"""``prefixtune score TASK --hyp FILE [--refs FILE] [--split test] [--json]``: the command body.

``score_command`` returns the exit code: 0 on success; 2 with one ``error: ...``
line on stderr (no traceback) for bad input, a missing file or data directory,
an unknown task or a missing Java runtime. Scores go to stdout as a table or as
one JSON object; notes (skipped optional metrics) go to stderr.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from . import TASKS, MetricsError, read_lines, read_references, score
from .refs import check_plain_text, read_reference_mrs

# How many decimals each metric is shown with in the table (JSON keeps full precision).
DECIMALS = {"NIST": 4, "CIDEr": 4, "BERTScore": 4, "MoverScore": 4, "BLEURT": 4}


def format_scores(scores: dict[str, float]) -> list[tuple[str, str]]:
    """(metric, formatted value) rows in the order the scorer returned them."""
    return [(name, f"{value:.{DECIMALS.get(name.split('_seen')[0].split('_unseen')[0], 2)}f}")
            for name, value in scores.items()]


def print_scores(scores: dict[str, float], title: str, file=None) -> None:
    """A rich table of ``scores`` (falls back to plain text when rich is unavailable)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a dependency
        print(title, file=file or sys.stdout)
        for name, value in format_scores(scores):
            print(f"{name}\t{value}", file=file or sys.stdout)
        return
    table = Table()
    table.add_column("metric")
    table.add_column("score", justify="right")
    for name, value in format_scores(scores):
        table.add_row(name, value)
    console = Console(file=file or sys.stdout)
    console.print(title, markup=False, highlight=False)
    console.print(table)


def _load_gold(task: str, split: str, data_dir, loader_options: dict):
    from ..data import load_task

    records = load_task(task, split, data_dir=data_dir, **loader_options)
    return [r.references for r in records], [r.meta for r in records]


def score_command(task: str, hyp: Path, refs: Path | None, split: str, data_dir: str | None, as_json: bool,
                  *, loader_options: dict | None = None, mteval_variant: str = "perl",
                  limit: int | None = None) -> int:
    """Score the hypothesis file ``hyp`` (one output per line) for ``task``; returns the exit code.

    References: ``refs`` (E2E blank-line groups, one per line, or an E2E CSV) or,
    when None, the loader's ``split`` (data directory from ``data_dir`` or
    $PREFIXTUNE_DATA). For WebNLG with ``refs`` the seen/unseen breakdown still
    comes from the loader when its test split is available and the sizes match.
    E2E's SER needs each item's MR: from the split or an E2E CSV ``refs``, else
    it is skipped with a note. ``loader_options`` go to the loader (e.g.
    ``{"scheme": "within-news"}`` for XSum, ``{"train_from": "dev"}`` for DART).
    ``limit``: the hypotheses are for the split's first ``limit`` items (``eval
    --limit``); a note on stderr says so.
    """
    loader_options = dict(loader_options or {})
    notes: list[str] = []
    try:
        if task not in TASKS:
            raise MetricsError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        hypotheses = read_lines(hyp)
        check_plain_text(hyp, hypotheses, "hypothesis file")
        meta = None
        if limit is not None and (limit < 1 or refs is not None):
            raise MetricsError("--limit must be >= 1" if limit < 1 else
                               "--limit selects the split's first items; it does not apply to --refs")
        if refs is not None:
            references = read_references(refs, len(hypotheses))
            if task == "e2e":  # SER needs each item's MR: only an E2E CSV/TSV carries them
                mrs = read_reference_mrs(refs)
                meta = [{"mr": mr} for mr in mrs] if mrs else None
                if meta is None:
                    notes.append(f"note: SER skipped: {refs} has no MRs (give an E2E CSV, or omit --refs)")
            if task == "webnlg":
                try:
                    _, gold_meta = _load_gold(task, split, data_dir, loader_options)
                    if len(gold_meta) == len(hypotheses):
                        meta = gold_meta
                except (OSError, ValueError):
                    meta = None
        else:
            references, meta = _load_gold(task, split, data_dir, loader_options)
            total = len(references)
            if limit is not None:
                references, meta = references[:limit], meta[:limit]
            if len(references) != len(hypotheses) and limit is not None:
                raise MetricsError(f"{hyp} has {len(hypotheses)} lines but --limit {limit} selects "
                                   f"{len(references)} items of the {task} {split} split")
            if len(references) != len(hypotheses):
                hint = (f"; if they are for its first {len(hypotheses)} items (eval --limit), add "
                        f"--limit {len(hypotheses)}" if len(hypotheses) < total else "")
                raise MetricsError(f"{hyp} has {len(hypotheses)} lines but the {task} {split} split has "
                                   f"{len(references)} items (one hypothesis per line, in loader order){hint}")
            if len(references) < total:
                notes.append(f"note: scoring the first {len(references)} of the {total} items of the {task} "
                             f"{split} split (--limit): not comparable with full-split scores")
        scores = score(task, hypotheses, references, meta, notes=notes, mteval_variant=mteval_variant)
    except (MetricsError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(note, file=sys.stderr)
    if as_json:
        print(json.dumps(scores))
    else:
        source = f"{split} split" if refs is None else f"references {refs}"
        if refs is None and limit is not None:
            source = f"first {len(hypotheses)} items of the {split} split"
        print_scores(scores, f"{task}: {len(hypotheses)} hypotheses in {hyp}, {source}")
    return 0
