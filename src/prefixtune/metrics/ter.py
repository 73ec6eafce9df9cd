"""TER as tercom 0.7.25 computes it in the WebNLG/DART scripts, via sacrebleu's tercom port.

tercom is run there without ``-s`` (so case-insensitive) and without ``-N``
(no normalisation); with several references it takes, per segment, the fewest
edits over the references and divides the summed edits by the summed *average*
reference lengths. ``sacrebleu.metrics.TER(case_sensitive=False)`` implements
that; we reuse its tokenisation and statistics with a faster, result-identical
copy of its shift search (``_ter_fast.py``). Big inputs are split over worker
processes (``python -m prefixtune.metrics._ter_fast``; fresh interpreters, so
callers need no ``__main__`` guard). Returned x100 (tercom prints a fraction).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ._ter_fast import segment_statistics
from .errors import MetricsError

PARALLEL_MIN_ITEMS = 400
MAX_WORKERS = 8
WORKERS_ENV = "PREFIXTUNE_TER_WORKERS"


def _tokenize(text: str) -> list[str]:
    # sacrebleu TER._preprocess_segment: TercomTokenizer(case_sensitive=False, normalized=False)(sent.rstrip())
    return text.rstrip().lower().split()


def _default_workers(n_items: int) -> int:
    if n_items < PARALLEL_MIN_ITEMS:
        return 1
    env = os.environ.get(WORKERS_ENV)
    if env and env.isdigit():
        return max(1, int(env))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


def _run_workers(items, workers: int):
    chunks = [items[i::workers] for i in range(workers)]
    env = dict(os.environ)  # make this very package importable in the workers, installed or not
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    procs = []
    try:
        for chunk in chunks:
            proc = subprocess.Popen([sys.executable, "-m", "prefixtune.metrics._ter_fast"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                                    env=env)
            procs.append(proc)
            proc.stdin.write(json.dumps(chunk))
            proc.stdin.close()
        results = []
        for proc in procs:
            out = proc.stdout.read()
            err = proc.stderr.read()
            if proc.wait() != 0:
                raise MetricsError(f"TER worker failed: {err.strip()[-300:]}")
            results.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    merged: list = [None] * len(items)
    for k, chunk in enumerate(results):
        merged[k::workers] = chunk
    return merged


def ter_statistics(hypotheses: list[str], references: list[list[str]], workers: int | None = None) -> list:
    """Per-segment [edits, average reference length]; sum over any subset for its corpus TER."""
    if len(hypotheses) != len(references):
        raise MetricsError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups")
    if any(not refs for refs in references):
        raise MetricsError("TER needs at least one reference per item")
    items = [(_tokenize(h), [_tokenize(r) for r in refs]) for h, refs in zip(hypotheses, references)]
    workers = _default_workers(len(items)) if workers is None else max(1, workers)
    if workers == 1:
        return segment_statistics(items)
    return _run_workers(items, workers)


def ter_from_statistics(stats) -> float:
    """Corpus TER x100 from segment statistics (sacrebleu ``_compute_score_from_stats``)."""
    edits = sum(s[0] for s in stats)
    ref_len = sum(s[1] for s in stats)
    if ref_len > 0:
        return 100.0 * edits / ref_len
    return 100.0 if edits > 0 else 0.0


def ter(hypotheses: list[str], references: list[list[str]], workers: int | None = None) -> float:
    """Corpus TER x100 with a variable number of references per item."""
    if not hypotheses:
        raise MetricsError("nothing to score: no hypotheses")
    return ter_from_statistics(ter_statistics(hypotheses, references, workers))
