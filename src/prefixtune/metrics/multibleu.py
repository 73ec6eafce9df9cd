"""Corpus BLEU exactly as Moses ``multi-bleu.perl`` (the WebNLG 2017 and DART evaluation scripts use it).

Whitespace tokens only (the caller normalises text first), optional ASCII
lowercasing (``-lc``), clipped n-gram counts against the maximum over the
references, brevity penalty against the closest reference length (ties go to
the shorter one; an empty reference line counts as length 0, as in the script),
no smoothing: a zero n-gram precision gives BLEU 0. Returns BLEU x100 at full
precision (the script prints it rounded to 2 decimals).
"""
from __future__ import annotations

import math
import re
from collections import Counter

from .errors import MetricsError

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_WS = re.compile(r"[ \t\n\r\f\v]+")


def _words(text: str, lowercase: bool) -> list[str]:
    if lowercase:
        text = text.translate(_ASCII_LOWER)
    return [w for w in _WS.split(text) if w]


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def multi_bleu(hypotheses: list[str], references: list[list[str]], lowercase: bool = False) -> float:
    """BLEU x100 of ``hypotheses`` against per-item reference lists (pad with "" to mimic short ref files)."""
    if len(hypotheses) != len(references):
        raise MetricsError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups")
    correct = [0] * 5
    total = [0] * 5
    len_trans = len_ref = 0
    for hyp, refs in zip(hypotheses, references):
        words = _words(hyp, lowercase)
        ref_max: dict = {}
        closest_diff, closest_len = 9999, 9999
        for ref in refs:
            ref_words = _words(ref, lowercase)
            diff = abs(len(words) - len(ref_words))
            if diff < closest_diff:
                closest_diff, closest_len = diff, len(ref_words)
            elif diff == closest_diff and len(ref_words) < closest_len:
                closest_len = len(ref_words)
            for n in range(1, 5):
                for gram, cnt in _ngrams(ref_words, n).items():
                    if cnt > ref_max.get(gram, 0):
                        ref_max[gram] = cnt
        len_trans += len(words)
        len_ref += closest_len
        for n in range(1, 5):
            for gram, cnt in _ngrams(words, n).items():
                total[n] += cnt
                if gram in ref_max:
                    correct[n] += min(cnt, ref_max[gram])
    if len_ref == 0 or len_trans == 0:
        return 0.0
    precisions = [correct[n] / total[n] if total[n] else 0.0 for n in range(1, 5)]
    brevity = math.exp(1 - len_ref / len_trans) if len_trans < len_ref else 1.0
    log_sum = sum(math.log(p) if p else -9999999999 for p in precisions)
    return 100.0 * brevity * math.exp(log_sum / 4)
