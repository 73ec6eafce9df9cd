"""METEOR, ROUGE-L and CIDEr(-D) as the MS-COCO caption evaluator computes them.

This is the half of the E2E ``measure_scores.py`` that runs ``COCOEvalCap``:
references and hypotheses are PTB-tokenised and lowercased by the Stanford
tokenizer jar (punctuation tokens dropped), then scored by pycocoevalcap's
METEOR 1.5 jar, ``Rouge`` (ROUGE-L, beta 1.2, max precision/recall over the
references) and ``Cider`` (CIDEr-D: n=4, sigma=6, clipping, x10, document
frequencies from this corpus' references). Scores on pycocoevalcap's scales:
METEOR and ROUGE-L in [0, 1], CIDEr raw.
"""
from __future__ import annotations

from .errors import MetricsError
from .java import java_executable, meteor_session, ptb_tokenize

COCO_METRICS = ("METEOR", "ROUGE_L", "CIDEr")


def coco_scores(hypotheses: list[str], references: list[list[str]], metrics=COCO_METRICS) -> dict[str, float]:
    if len(hypotheses) != len(references):
        raise MetricsError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups")
    if any(not refs for refs in references):
        raise MetricsError("every hypothesis needs at least one reference")
    java_executable()
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    # COCOEvalCap.evaluate tokenises the references and the results in two tokenizer runs.
    flat_refs = ptb_tokenize([r for refs in references for r in refs])
    tok_hyps = ptb_tokenize(list(hypotheses))
    gts, res, pos = {}, {}, 0
    for i, refs in enumerate(references):
        gts[i] = flat_refs[pos:pos + len(refs)]
        pos += len(refs)
        res[i] = [tok_hyps[i]]

    scores: dict[str, float] = {}
    if "METEOR" in metrics:
        with meteor_session() as meteor:
            scores["METEOR"] = meteor.corpus_score([res[i][0] for i in res], [gts[i] for i in gts])[0]
    if "ROUGE_L" in metrics:
        scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in metrics:
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores
