"""E2E NLG Challenge metrics, as the official ``measure_scores.py`` (tuetschek/e2e-metrics) reports them.

BLEU and NIST: mteval-v13a (see ``mteval.py``; pymteval by default, as the
paper ran the script with ``-p``). METEOR, ROUGE-L, CIDEr: the MS-COCO caption
evaluator after PTB tokenisation (see ``coco.py``). Paper scales: BLEU, METEOR,
ROUGE-L x100; NIST and CIDEr raw.
"""
from __future__ import annotations

from .coco import coco_scores
from .java import java_executable
from .mteval import bleu_nist

E2E_METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")


def score_e2e(hypotheses: list[str], references: list[list[str]], mteval_variant: str = "perl") -> dict[str, float]:
    java_executable()  # fail fast, before the pure-Python half
    bleu, nist = bleu_nist(hypotheses, references, variant=mteval_variant)
    coco = coco_scores(hypotheses, references)
    return {"BLEU": 100.0 * bleu, "NIST": nist, "METEOR": 100.0 * coco["METEOR"],
            "ROUGE_L": 100.0 * coco["ROUGE_L"], "CIDEr": coco["CIDEr"]}
