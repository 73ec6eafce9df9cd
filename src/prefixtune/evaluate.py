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


def score_records(task: str, hypotheses: list[str], records: list[Record], full: bool = True) -> dict:
    """The task's metrics (the official-equal suite when available, else sacreBLEU)."""
    references = [r.references for r in records]
    scores = {"sacreBLEU": grouped_bleu(hypotheses, references)}
    if full:
        try:
            from .metrics import score as official_score
        except ImportError:
            return scores
        scores.update(official_score(task, hypotheses, references, [r.meta for r in records]))
    return scores


def evaluate(bank: PrefixBank, records: list[Record], prefix_id: str | None, config: DecodingConfig,
             task: str = "e2e", out_dir: str | Path | None = None, batch_size: int = 32, raw_inputs=None,
             full_metrics: bool = True, progress=None) -> tuple[dict, list[str]]:
    inputs = raw_inputs if raw_inputs is not None else [r.source for r in records]
    hypotheses = bank.generate(inputs, prefix_id, config, batch_size=batch_size, raw=raw_inputs is not None,
                               progress=progress)
    scores = score_records(task, hypotheses, records, full=full_metrics)
    if out_dir is not None:
        write_results(out_dir, hypotheses, scores)
    return scores, hypotheses


def write_results(out_dir: str | Path, hypotheses: list[str], scores: dict):
    """OUT_DIR/hypotheses.txt (one per line, in input order; what `prefixtune score --hyp` reads) and scores.json."""
    out = Path(out_dir)
    atomic_write_bytes(out / "hypotheses.txt", ("\n".join(hypotheses) + "\n").encode())
    atomic_write_bytes(out / "scores.json", json.dumps(scores, indent=2).encode())
