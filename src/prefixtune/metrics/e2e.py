"""E2E NLG Challenge metrics, as the official ``measure_scores.py`` (tuetschek/e2e-metrics) reports them.

BLEU and NIST: mteval-v13a (see ``mteval.py``; pymteval by default, as the
paper ran the script with ``-p``). METEOR, ROUGE-L, CIDEr: the MS-COCO caption
evaluator after PTB tokenisation (see ``coco.py``). Paper scales: BLEU, METEOR,
ROUGE-L x100; NIST and CIDEr raw. SER (``e2e_ser.py``, in percent) when each
item's MR is known.
"""
from __future__ import annotations

from .coco import coco_scores
from .e2e_ser import slot_error_rate
from .errors import attempt
from .java import java_executable
from .mteval import bleu_nist

def item_mrs(meta: list[dict] | None) -> list[str] | None:
    """Each item's raw MR (the E2E loader's ``meta["mr"]``), or None when any item lacks one."""
    if not meta or not all(isinstance(m, dict) and m.get("mr") for m in meta):
        return None
    return [m["mr"] for m in meta]


def score_e2e(hypotheses: list[str], references: list[list[str]], mteval_variant: str = "perl",
              meta: list[dict] | None = None, skipped: list[str] | None = None) -> dict[str, float]:
    """`skipped`: a list that receives a line per metric that cannot score the data (None: raise instead)."""
    if skipped is None:
        java_executable()  # fail fast, before the pure-Python half
    scores: dict[str, float] = {}

    def bleu():
        bleu, nist = bleu_nist(hypotheses, references, variant=mteval_variant)
        return {"BLEU": 100.0 * bleu, "NIST": nist}

    def coco():
        coco = coco_scores(hypotheses, references)
        return {"METEOR": 100.0 * coco["METEOR"], "ROUGE_L": 100.0 * coco["ROUGE_L"], "CIDEr": coco["CIDEr"]}

    attempt(scores, "BLEU, NIST", bleu, skipped)
    attempt(scores, "METEOR, ROUGE_L, CIDEr", coco, skipped)
    mrs = item_mrs(meta)
    if mrs is not None:  # SER checks each output against its own MR
        attempt(scores, "SER", lambda: {"SER": slot_error_rate(hypotheses, mrs).ser}, skipped)
    return scores
