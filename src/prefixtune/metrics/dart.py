"""DART metrics as the DART repository's ``evaluation/run_eval_on_dart.sh`` computes them.

* text: DART's reference files are lowercased and split at every non-word
  character (``' '.join(re.split('(\\W)', s))``, spaces collapsed, no unidecode);
  hypotheses are normalised the same way here (the script expects hypotheses
  already in that form; for such files the normalisation changes nothing);
* BLEU: ``multi-bleu.perl`` (case-sensitive, but everything is lowercased)
  against the first 3 annotations (fewer -> empty reference lines);
* METEOR: METEOR 1.5 ``-l en -norm`` against the *first* annotation only
  (``prepare_files.py`` writes only reference0, padded with empty lines);
* TER: tercom 0.7.25 against the first annotation only (same file);
* BERTScore (``bert-score --lang en``: roberta-large F1, max over the 3
  references), MoverScore (``moverscore_v2``, first reference) and BLEURT
  (first reference) run only when their packages and weights are present
  locally; otherwise a note says why they were skipped (see ``optional.py``).

Scales: BLEU, METEOR and TER x100; BERTScore, MoverScore, BLEURT raw.
"""
from __future__ import annotations

import re

from .errors import MetricsError, attempt
from .java import java_executable, meteor_session
from .multibleu import multi_bleu
from .optional import model_based_scores
from .ter import ter

MAX_REFS = 3
_NONWORD = re.compile(r"(\W)")


def normalize(text: str) -> str:
    return " ".join(" ".join(_NONWORD.split(text)).split()).lower()


def score_dart(hypotheses: list[str], references: list[list[str]], notes: list[str] | None = None,
               model_metrics: bool = True, skipped: list[str] | None = None) -> dict[str, float]:
    """`skipped`: a list that receives a line per metric that cannot score the data (None: raise instead)."""
    if len(hypotheses) != len(references):  # bad input for every metric: never skipped, never truncated
        raise MetricsError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups")
    if skipped is None:
        java_executable()
    hyps = [normalize(h) for h in hypotheses]
    refs = [[normalize(r) for r in group[:MAX_REFS]] or [""] for group in references]
    first = [[r[0]] for r in refs]

    def meteor():
        with meteor_session() as session:
            return {"METEOR": 100.0 * session.corpus_score(hyps, first)[0]}

    scores: dict[str, float] = {}
    attempt(scores, "BLEU", lambda: {"BLEU": multi_bleu(hyps, [r + [""] * (MAX_REFS - len(r)) for r in refs])},
            skipped)
    attempt(scores, "METEOR", meteor, skipped)
    attempt(scores, "TER", lambda: {"TER": ter(hyps, first)}, skipped)
    if model_metrics:
        extra, extra_notes = model_based_scores(list(hypotheses), [list(g) for g in references])
        scores.update(extra)
        if notes is not None:
            notes.extend(extra_notes)
    return scores
