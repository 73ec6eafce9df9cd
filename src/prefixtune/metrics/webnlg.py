"""WebNLG 2017 metrics as the challenge's ``webnlg-automatic-evaluation`` scripts compute them.

The paper ran ``run_eval_on_webnlg.sh`` from the DART repository, which wraps
the WebNLG 2017 challenge evaluation (``evaluation.py``, ``bleu_eval_3ref.sh``,
``meteor_eval.sh``, ``ter_eval.sh``). Ported here:

* text: hypotheses ``unidecode(line.strip())``, then lowercased, every
  non-word character split off (``' '.join(re.split('(\\W)', s))``) and spaces
  collapsed; references get the same split, then lowercase + unidecode (in the
  script's order);
* references: the first 3 lexicalisations of each entry (entries with fewer get
  empty reference lines, which ``multi-bleu.perl`` counts as length 0);
* BLEU: ``multi-bleu.perl -lc`` over those 3 reference files;
* METEOR: METEOR 1.5 ``-l en -norm -r 3`` (system score from summed statistics);
* TER: tercom 0.7.25 with up to 3 references (see ``ter.py``);
* seen / unseen: the same three metrics recomputed on the entries of the 10
  training categories ("old-cat") and of the 5 new ones ("new-cat").

Scales: BLEU, METEOR and TER x100.
"""
from __future__ import annotations

import re
import unicodedata

from .errors import MetricsError, attempt
from .java import java_executable, meteor_session
from .multibleu import multi_bleu
from .ter import ter_from_statistics, ter_statistics

MAX_REFS = 3
_NONWORD = re.compile(r"(\W)")

try:  # the scripts use `unidecode`; a plain accent-stripping fallback keeps scoring possible without it
    from unidecode import unidecode as _unidecode
except ImportError:  # pragma: no cover - exercised only without the dependency
    def _unidecode(text: str) -> str:
        return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def normalize_hypothesis(text: str) -> str:
    """``read_participant`` + ``write_to_file`` of the challenge's evaluation.py."""
    text = _unidecode(text.strip())
    return " ".join(" ".join(_NONWORD.split(_unidecode(text.lower()))).split())


def normalize_reference(text: str) -> str:
    """``bleu_ref_files_gen`` / ``meteor_3ref_files_gen`` / ``ter_ref_files_gen`` of evaluation.py."""
    return _unidecode(" ".join(" ".join(_NONWORD.split(text)).split()).lower())


def _seen_flags(meta: list[dict] | None, n: int) -> list[bool] | None:
    if not meta or len(meta) != n:
        return None
    flags = []
    for m in meta:
        if "seen" in m:
            flags.append(bool(m["seen"]))
        elif "category" in m:
            from ..data.webnlg import UNSEEN_CATEGORIES
            flags.append(m["category"] not in UNSEEN_CATEGORIES)
        else:
            return None
    return flags


def score_webnlg(hypotheses: list[str], references: list[list[str]], meta: list[dict] | None = None,
                 skipped: list[str] | None = None) -> dict[str, float]:
    """`skipped`: a list that receives a line per metric that cannot score the data (None: raise instead)."""
    if len(hypotheses) != len(references):  # bad input for every metric: never skipped, never truncated
        raise MetricsError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups")
    if meta is not None and len(meta) != len(hypotheses):
        raise MetricsError(f"{len(meta)} meta entries for {len(hypotheses)} hypotheses")
    if skipped is None:
        java_executable()
    hyps = [normalize_hypothesis(h) for h in hypotheses]
    refs = [[normalize_reference(r) for r in group[:MAX_REFS]] for group in references]
    subsets = [("", list(range(len(hyps))))]
    flags = _seen_flags(meta, len(hyps))
    if flags is not None:
        for suffix, want in (("_seen", True), ("_unseen", False)):
            idx = [i for i, f in enumerate(flags) if f == want]
            if idx:
                subsets.append((suffix, idx))

    def bleu():
        return {"BLEU" + suffix: multi_bleu([hyps[i] for i in idx],
                                            [refs[i] + [""] * (MAX_REFS - len(refs[i])) for i in idx], lowercase=True)
                for suffix, idx in subsets}

    def meteor():
        with meteor_session() as session:
            stats = [session.stats(h, r) for h, r in zip(hyps, refs)]
            return {"METEOR" + suffix: 100.0 * session.aggregate([stats[i] for i in idx])[0] for suffix, idx in subsets}

    def ter():
        stats = ter_statistics(hyps, refs)
        return {"TER" + suffix: ter_from_statistics([stats[i] for i in idx]) for suffix, idx in subsets}

    scores: dict[str, float] = {}
    attempt(scores, "BLEU", bleu, skipped)
    attempt(scores, "METEOR", meteor, skipped)
    attempt(scores, "TER", ter, skipped)
    order = [m + s for s, _ in subsets for m in ("BLEU", "METEOR", "TER")]
    return {k: scores[k] for k in order if k in scores}
