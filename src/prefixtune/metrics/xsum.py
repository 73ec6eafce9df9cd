"""XSum metrics: ROUGE-1, ROUGE-2 and ROUGE-L F-measure with Google's ``rouge-score`` (stemmer on).

As the paper's summarisation code (``calculate_rouge`` of the transformers
seq2seq examples: rouge1/rouge2/rougeL, ``use_stemmer=True``, F-measure x100),
except that the corpus score is the plain mean of the per-summary F-measures
instead of the middle of a randomly resampled ``BootstrapAggregator`` (the two
agree to about 0.05 and the mean is deterministic). Several references per
item: the best-scoring one (``score_multi``).
"""
from __future__ import annotations

from .errors import MetricsError

ROUGE_TYPES = {"rouge1": "ROUGE_1", "rouge2": "ROUGE_2", "rougeL": "ROUGE_L"}


def score_xsum(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    if not hypotheses:
        raise MetricsError("nothing to score: no hypotheses")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, refs in zip(hypotheses, references):
        result = scorer.score(refs[0], hyp) if len(refs) == 1 else scorer.score_multi(refs, hyp)
        for key in ROUGE_TYPES:
            totals[key] += result[key].fmeasure
    return {name: 100.0 * totals[key] / len(hypotheses) for key, name in ROUGE_TYPES.items()}
