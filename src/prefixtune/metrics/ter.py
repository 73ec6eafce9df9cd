"""TER as tercom 0.7.25 computes it in the WebNLG/DART scripts, via sacrebleu's tercom port.

tercom is run there without ``-s`` (so case-insensitive) and without ``-N``
(no normalisation); with several references it takes, per segment, the fewest
edits over the references and divides the summed edits by the summed *average*
reference lengths. ``sacrebleu.metrics.TER(case_sensitive=False)`` (defaults
otherwise) implements exactly that. Returned x100 (tercom prints a fraction).
"""
from __future__ import annotations

from .errors import MetricsError


def ter(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus TER x100 with a variable number of references per item."""
    if len(hypotheses) != len(references):
        raise MetricsError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups")
    if not hypotheses:
        raise MetricsError("nothing to score: no hypotheses")
    from sacrebleu.metrics import TER

    width = max(len(refs) for refs in references)
    if width == 0:
        raise MetricsError("TER needs at least one reference per item")
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    return float(TER(case_sensitive=False).corpus_score(hypotheses, streams).score)
