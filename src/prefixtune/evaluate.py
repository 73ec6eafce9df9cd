"""Decode a split with a prefix and score it; hypotheses are written next to the scores."""
from __future__ import annotations

import json
from pathlib import Path

import sacrebleu

from .bank import PrefixBank
from .data import Record
from .generation import DecodingConfig
from .atomic import atomic_write_bytes


def grouped_bleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """sacreBLEU, lowercased, each hypothesis against its own group of references (any count)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups")
    width = max(len(r) for r in references)
    streams = [[group[i] if i < len(group) else None for group in references] for i in range(width)]
    return sacrebleu.corpus_bleu(hypotheses, streams, lowercase=True).score


def score_records(task: str, hypotheses: list[str], records: list[Record], full: bool = True,
                  skipped: list[str] | None = None) -> dict:
    """The task's metrics (the official-equal suite when available, else sacreBLEU).

    `skipped`: a list that receives a line per metric that cannot score this data, which is left out (None:
    such a metric raises). With a list, `MetricsError` is raised only when no metric could score it.
    """
    from .metrics import MetricsError
    from .metrics.errors import attempt

    references = [r.references for r in records]
    scores: dict = {}

    def sacre():
        try:
            return {"sacreBLEU": grouped_bleu(hypotheses, references)}
        except (ValueError, EOFError) as e:  # sacrebleu's own checks
            raise MetricsError(str(e)) from None

    attempt(scores, "sacreBLEU", sacre, skipped)
    if full:
        try:
            from .metrics import score as official_score
        except ImportError:
            return scores
        attempt(scores, "the official metrics", lambda: official_score(
            task, hypotheses, references, [r.meta for r in records], skipped=skipped), skipped)
    if not scores:
        raise MetricsError("no metric could score these hypotheses: " + "; ".join(skipped or []))
    return scores


def evaluate(bank: PrefixBank, records: list[Record], prefix_id: str | None, config: DecodingConfig,
             task: str = "e2e", out_dir: str | Path | None = None, batch_size: int = 32, raw_inputs=None,
             full_metrics: bool = True, progress=None, skipped: list[str] | None = None) -> tuple[dict, list[str]]:
    """Decode `records` and score them; with `out_dir`, the hypotheses are written before scoring, so a metric
    that fails never costs the decoding. `skipped`: as in `score_records`."""
    inputs = raw_inputs if raw_inputs is not None else [r.source for r in records]
    hypotheses = bank.generate(inputs, prefix_id, config, batch_size=batch_size, raw=raw_inputs is not None,
                               progress=progress)
    if out_dir is not None:
        write_hypotheses(out_dir, hypotheses)
    scores = score_records(task, hypotheses, records, full=full_metrics, skipped=skipped)
    if out_dir is not None:
        write_scores(out_dir, scores)
    return scores, hypotheses


def write_hypotheses(out_dir: str | Path, hypotheses: list[str]) -> Path:
    """OUT_DIR/hypotheses.txt: one per line, in input order (what `prefixtune score --hyp` reads)."""
    path = Path(out_dir) / "hypotheses.txt"
    atomic_write_bytes(path, ("\n".join(hypotheses) + "\n").encode())
    return path


def write_scores(out_dir: str | Path, scores: dict) -> Path:
    path = Path(out_dir) / "scores.json"
    atomic_write_bytes(path, json.dumps(scores, indent=2).encode())
    return path


def write_results(out_dir: str | Path, hypotheses: list[str], scores: dict):
    """OUT_DIR/hypotheses.txt and scores.json."""
    write_hypotheses(out_dir, hypotheses)
    write_scores(out_dir, scores)
