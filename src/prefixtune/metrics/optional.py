"""Model-based DART metrics that need downloaded weights: BERTScore, MoverScore, BLEURT.

Each runs only when its package is installed *and* its weights are already on
this machine (nothing is downloaded: the Hugging Face hub is forced offline
while they run). Otherwise it is skipped with one note saying why. Settings
follow the DART evaluation script:

* BERTScore: ``bert_score.score(cands, refs, lang="en")`` (roberta-large, layer
  17, no idf, no baseline rescaling), F1 averaged, max over up to 3 references;
* MoverScore: ``moverscore_v2.word_mover_score`` (distilbert-base-uncased,
  unigram, uniform idf, subwords removed) against the first reference, averaged;
* BLEURT: ``bleurt.score.BleurtScorer(checkpoint)`` against the first
  reference, averaged; the checkpoint directory comes from
  ``$PREFIXTUNE_BLEURT_CHECKPOINT``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from collections import defaultdict
from pathlib import Path

BLEURT_ENV = "PREFIXTUNE_BLEURT_CHECKPOINT"
BERTSCORE_MODEL = "roberta-large"
MOVERSCORE_MODEL = "distilbert-base-uncased"


@contextlib.contextmanager
def _offline():
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _hf_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    if not isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return False
    return any(isinstance(try_to_load_from_cache(repo_id, f), str)
               for f in ("model.safetensors", "pytorch_model.bin"))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _bertscore(hyps, refs):
    if not _installed("bert_score"):
        return None, "BERTScore skipped: the bert-score package is not installed (pip install bert-score)"
    if not _hf_cached(BERTSCORE_MODEL):
        return None, f"BERTScore skipped: {BERTSCORE_MODEL} weights are not in the local Hugging Face cache"
    with _offline():
        from bert_score import score
        _, _, f1 = score(hyps, [r[:3] for r in refs], lang="en", verbose=False)
    return float(f1.mean()), None


def _moverscore(hyps, refs):
    if not _installed("moverscore_v2"):
        return None, "MoverScore skipped: the moverscore package (moverscore_v2) is not installed"
    if not _hf_cached(MOVERSCORE_MODEL):
        return None, f"MoverScore skipped: {MOVERSCORE_MODEL} weights are not in the local Hugging Face cache"
    with _offline():
        from moverscore_v2 import word_mover_score
        idf = defaultdict(lambda: 1.0)
        scores = word_mover_score([r[0] for r in refs], hyps, idf, idf, stop_words=[], n_gram=1, remove_subwords=True)
    return float(sum(scores) / len(scores)), None


def _bleurt(hyps, refs):
    checkpoint = os.environ.get(BLEURT_ENV)
    if not _installed("bleurt"):
        return None, "BLEURT skipped: the bleurt package is not installed"
    if not checkpoint or not Path(checkpoint).is_dir():
        return None, f"BLEURT skipped: set {BLEURT_ENV} to a local BLEURT checkpoint directory"
    from bleurt import score as bleurt_score
    scores = bleurt_score.BleurtScorer(checkpoint).score(references=[r[0] for r in refs], candidates=hyps)
    return float(sum(scores) / len(scores)), None


def model_based_scores(hypotheses: list[str], references: list[list[str]]) -> tuple[dict[str, float], list[str]]:
    """({"BERTScore": .., "MoverScore": .., "BLEURT": ..} for those that ran, notes for those skipped)."""
    refs = [r if r else [""] for r in references]
    scores, notes = {}, []
    for name, fn in (("BERTScore", _bertscore), ("MoverScore", _moverscore), ("BLEURT", _bleurt)):
        try:
            value, note = fn(hypotheses, refs)
        except Exception as exc:  # a broken optional install must not sink the required metrics
            value, note = None, f"{name} skipped: it failed to run ({type(exc).__name__}: {exc})"
        if value is not None:
            scores[name] = value
        if note:
            notes.append(note)
    return scores, notes
