"""Official-equal metrics for the paper's four tasks.

``score(task, hypotheses, references, meta=None)`` returns a dict keyed by the
metric names as the paper writes them, on the paper's scales (BLEU, METEOR,
ROUGE and TER x100; NIST and CIDEr raw):

* ``e2e``: BLEU, NIST, METEOR, ROUGE_L, CIDEr (the E2E ``measure_scores.py``),
  plus SER (slot error rate, %) when ``meta`` carries each item's ``mr``;
* ``webnlg``: BLEU, METEOR, TER, plus ``*_seen`` / ``*_unseen`` when ``meta``
  carries ``seen`` (or ``category``) for every item (the WebNLG 2017 scripts);
* ``dart``: BLEU, METEOR, TER, and BERTScore / MoverScore / BLEURT when their
  weights are present locally (the DART scripts);
* ``xsum``: ROUGE_1, ROUGE_2, ROUGE_L (``rouge-score`` with stemming).

Bad input, a missing Java runtime or an unknown task raise ``MetricsError``.
See docs/data_and_metrics.md for how each number matches the official script.
"""
from __future__ import annotations

import sys

from .errors import MetricsError, attempt
from .refs import read_lines, read_references

TASKS = ("e2e", "webnlg", "dart", "xsum")
# Which metrics each task reports, in display order (webnlg adds _seen/_unseen variants; e2e's SER needs MRs).
TASK_METRICS = {
    "e2e": ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "SER"),
    "webnlg": ("BLEU", "METEOR", "TER"),
    "dart": ("BLEU", "METEOR", "TER", "BERTScore", "MoverScore", "BLEURT"),
    "xsum": ("ROUGE_1", "ROUGE_2", "ROUGE_L"),
}


def _clean_hypothesis(text) -> str:
    if not isinstance(text, str):
        raise MetricsError(f"hypotheses must be strings, got {type(text).__name__}")
    return " ".join(text.splitlines()).strip()


def _check_inputs(task, hypotheses, references, meta):
    if task not in TASKS:
        raise MetricsError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    hypotheses = list(hypotheses)
    references = list(references)
    if len(hypotheses) != len(references):
        raise MetricsError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups: "
                           f"they must match one to one")
    if not hypotheses:
        raise MetricsError("nothing to score: no hypotheses")
    if meta is not None and len(meta) != len(hypotheses):
        raise MetricsError(f"{len(meta)} meta entries for {len(hypotheses)} hypotheses")
    refs = []
    for i, group in enumerate(references):
        if isinstance(group, str):
            group = [group]
        group = [" ".join(str(r).splitlines()).strip() for r in group]
        if task != "dart" and not any(group):
            raise MetricsError(f"item {i + 1} has no reference")
        refs.append([r for r in group if r])
    return [_clean_hypothesis(h) for h in hypotheses], refs


def score(task: str, hypotheses: list[str], references: list[list[str]], meta: list[dict] | None = None,
          *, notes: list[str] | None = None, mteval_variant: str = "perl",
          model_metrics: bool = True, skipped: list[str] | None = None) -> dict[str, float]:
    """Corpus scores of ``hypotheses`` (one per item) against grouped ``references`` for ``task``.

    ``notes``: a list that receives one line per skipped optional metric (DART);
    when None those lines go to stderr. ``mteval_variant``: "perl" (default: mteval-v13a-sig.pl, what
    ``measure_scores.py`` runs without flags) or "python" (pymteval, ``measure_scores.py -p``,
    the paper's setting) for E2E BLEU/NIST; BLEU is the same, NIST's length penalty differs. ``model_metrics``: try DART's
    BERTScore/MoverScore/BLEURT. ``skipped``: a list that receives one line per metric that cannot score
    this data (no Java, an MR that SER does not know, ...), which is then left out; None (the default):
    such a metric raises ``MetricsError``.
    """
    hyps, refs = _check_inputs(task, hypotheses, references, meta)
    if task == "e2e":
        from .e2e import score_e2e
        return score_e2e(hyps, refs, mteval_variant=mteval_variant, meta=meta, skipped=skipped)
    if task == "webnlg":
        from .webnlg import score_webnlg
        return score_webnlg(hyps, refs, meta, skipped=skipped)
    if task == "dart":
        from .dart import score_dart
        sink = notes if notes is not None else []
        result = score_dart(hyps, refs, notes=sink, model_metrics=model_metrics, skipped=skipped)
        if notes is None:
            for line in sink:
                print(line, file=sys.stderr)
        return result
    from .xsum import score_xsum
    scores: dict[str, float] = {}
    attempt(scores, "ROUGE", lambda: score_xsum(hyps, refs), skipped)
    return scores


__all__ = ["MetricsError", "TASKS", "TASK_METRICS", "read_lines", "read_references", "score"]
