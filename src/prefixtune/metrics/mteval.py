"""BLEU and NIST as the E2E challenge's ``measure_scores.py`` computes them (mteval-v13a).

The official script (github.com/tuetschek/e2e-metrics) offers two equal-in-spirit
implementations, and both are ported here line by line:

* ``variant="python"``: ``metrics/pymteval.py``, selected by
  ``measure_scores.py -p``; this is what Li & Liang ran (``measure_scores.py
  gold pred -p -t -H`` in ``gpt2/run_generation.py``).
* ``variant="perl"`` (default, as the issue asks for mteval-v13a): ``mteval/mteval-v13a-sig.pl`` as driven by
  ``measure_scores.py`` without ``-p`` (references padded with empty segments
  up to the largest reference count, BLEU "closest" brevity penalty that skips
  the empty padding, smoothed BLEU, ASCII-only lowercasing).

Both tokenise with mteval's basic (non-international) rules and are
case-insensitive. BLEU agrees between the two to many decimals on real data.
NIST differs in one place: pymteval divides by the per-segment *average*
reference length, while the Perl script divides the total reference length by
the largest reference count, so on E2E (up to 45 references per MR) the Perl
length penalty practically never fires while pymteval's fires for systems
whose outputs are shorter than the average reference.

Scores are returned on the scripts' own scales: BLEU in [0, 1], NIST raw.
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

from .errors import MetricsError

VARIANTS = ("python", "perl")

_PUNCT = re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])")
_NONDIGIT_PERIOD = re.compile(r"([^0-9])([\.,])")
_PERIOD_NONDIGIT = re.compile(r"([\.,])([^0-9])")
_DIGIT_DASH = re.compile(r"([0-9])(-)")
_SPACES = re.compile(r"\s+")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2
BLEU_TINY = 1e-15
BLEU_SMALL = 1e-9


def mteval_normalize(sent: str, ascii_lowercase: bool = False) -> str:
    """mteval-v13a's default ("western") tokenisation, as in pymteval ``NGramScore.tokenize``."""
    sent = sent.replace("<skipped>", "")
    sent = sent.replace("-\n", "")
    sent = sent.replace("\n", " ")
    sent = sent.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    sent = " " + sent + " "
    if ascii_lowercase:  # mteval-v13a.pl: tr/[A-Z]/[a-z]/ before the punctuation rules
        sent = sent.translate(_ASCII_LOWER)
    sent = _PUNCT.sub(r" \1 ", sent)
    sent = _NONDIGIT_PERIOD.sub(r"\1 \2 ", sent)
    sent = _PERIOD_NONDIGIT.sub(r" \1 \2", sent)
    sent = _DIGIT_DASH.sub(r"\1 \2 ", sent)
    sent = _SPACES.sub(" ", sent)
    return sent.strip()


def tokenize_python(sent: str) -> list[str]:
    """pymteval tokens, lowercased as its ``ngrams`` does (an empty sentence is one empty token)."""
    return [tok.lower() for tok in mteval_normalize(sent).split(" ")]


def tokenize_perl(sent: str) -> list[str]:
    """mteval-v13a-sig.pl tokens: whitespace runs collapse first (SGML reading), ASCII-only lowercasing."""
    return mteval_normalize(_SPACES.sub(" ", sent), ascii_lowercase=True).split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _merged_ref_counts(refs: list[list[str]], n: int) -> dict:
    merged: dict = {}
    for ref in refs:
        for gram, cnt in _ngrams(ref, n).items():
            if cnt > merged.get(gram, 0):
                merged[gram] = cnt
    return merged


def _check(hypotheses, references) -> None:
    if len(hypotheses) != len(references):
        raise MetricsError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups")
    if not hypotheses:
        raise MetricsError("nothing to score: no hypotheses")
    for i, refs in enumerate(references):
        if not refs:
            raise MetricsError(f"hypothesis {i + 1} has no reference")


# --------------------------------------------------------------------------- pymteval (measure_scores.py -p)

def _bleu_nist_python(hypotheses: list[str], references: list[list[str]]) -> tuple[float, float]:
    max_bleu, max_nist = 4, 5
    bleu_hits = [0] * max_bleu
    bleu_cand = [0] * max_bleu
    bleu_ref_len = 0
    nist_ref_ngrams = [defaultdict(int) for _ in range(max_nist + 1)]
    nist_hits: list[list[dict]] = [[] for _ in range(max_nist)]
    nist_cand = [0] * max_nist
    avg_ref_len = 0.0
    for hyp, refs in zip(hypotheses, references):
        pred = tokenize_python(hyp)
        toks = [tokenize_python(r) for r in refs]
        for n in range(max_nist):
            merged = _merged_ref_counts(toks, n + 1)
            pred_counts = _ngrams(pred, n + 1)
            if n < max_bleu:  # BLEUScore.append
                bleu_hits[n] += sum(min(merged.get(g, 0), c) for g, c in pred_counts.items())
                bleu_cand[n] += len(pred) - n
            nist_cand[n] += len(pred) - n  # NISTScore.append
            nist_hits[n].append({g: h for g, c in pred_counts.items() if (h := min(c, merged.get(g, 0)))})
            for ref in toks:
                for g, c in _ngrams(ref, n + 1).items():
                    nist_ref_ngrams[n + 1][g] += c
        bleu_ref_len += len(min(toks, key=lambda r: (abs(len(r) - len(pred)), len(r))))
        ref_len_sum = sum(len(r) for r in toks)
        nist_ref_ngrams[0][()] += ref_len_sum
        avg_ref_len += ref_len_sum / float(len(toks))

    # BLEUScore.bleu
    bp = 1.0
    if bleu_cand[0] <= bleu_ref_len:
        bp = math.exp(1.0 - bleu_ref_len / (float(bleu_cand[0]) if bleu_cand[0] else 1e-5))
    log_sum = 0.0
    for hits, length in zip(bleu_hits, bleu_cand):
        log_sum += math.log(max(hits, BLEU_TINY) / max(length, BLEU_SMALL))
    bleu = bp * math.exp(log_sum / max_bleu)

    # NISTScore.nist
    def info(gram):
        if gram not in nist_ref_ngrams[len(gram)]:
            return 0.0
        return math.log(nist_ref_ngrams[len(gram) - 1][gram[:-1]] / float(nist_ref_ngrams[len(gram)][gram]), 2)

    nist_sum = 0.0
    for n in range(max_nist):
        hit_info = sum(sum(info(g) * h for g, h in seg.items()) for seg in nist_hits[n])
        total = nist_cand[n] or 1
        nist_sum += hit_info / total
    nist = _nist_length_penalty(nist_cand[0], avg_ref_len) * nist_sum
    return bleu, nist


def _nist_length_penalty(lsys: float, avg_lref: float) -> float:
    if avg_lref <= 0:
        return 0.0
    ratio = lsys / float(avg_lref)
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-NIST_BETA * math.log(ratio) ** 2)


# --------------------------------------------------------------------------- mteval-v13a-sig.pl (default of measure_scores.py)

def _bleu_nist_perl(hypotheses: list[str], references: list[list[str]]) -> tuple[float, float]:
    max_n = 5
    nsys = max(len(refs) for refs in references)  # measure_scores.py pads every item to this many refs
    hyp_toks = [tokenize_perl(h) for h in hypotheses]
    ref_toks = [[tokenize_perl(r) for r in refs] + [[] for _ in range(nsys - len(refs))] for refs in references]

    # compute_ngram_info over every reference segment
    ngram_count: Counter = Counter()
    tot_wrds = 0
    for refs in ref_toks:
        for ref in refs:
            tot_wrds += len(ref)
            for n in range(1, max_n + 1):
                ngram_count.update(_ngrams(ref, n))

    info_cache: dict = {}

    def info(gram):
        if gram not in info_cache:
            prefix = gram[:-1]
            # Perl tests the (n-1)-gram *string* for truth, so "" and "0" fall back to the word total.
            denom = tot_wrds if (not prefix or prefix == ("0",)) else ngram_count[prefix]
            info_cache[gram] = -math.log(ngram_count[gram] / denom) / math.log(2)
        return info_cache[gram]

    match = [0] * (max_n + 1)
    tst = [0] * (max_n + 1)
    ref_cnt = [0] * (max_n + 1)
    tst_info = [0.0] * (max_n + 1)
    cum_ref_length = 0
    for pred, refs in zip(hyp_toks, ref_toks):
        for j in range(1, max_n + 1):
            tst[j] += max(len(pred) - j + 1, 0)
        ref_max: dict = {}
        ref_length = None
        for ref in refs:
            for n in range(1, max_n + 1):
                for g, c in _ngrams(ref, n).items():
                    if c > ref_max.get(g, 0):
                        ref_max[g] = c
                ref_cnt[n] += max(len(ref) - n + 1, 0)
            if ref_length is None:
                ref_length = len(ref)
            elif len(ref):  # brevity_penalty_closest: empty (padding) references are skipped
                if abs(len(pred) - len(ref)) < abs(len(pred) - ref_length):
                    ref_length = len(ref)
                elif abs(len(pred) - len(ref)) == abs(len(pred) - ref_length) and ref_length > len(ref):
                    ref_length = len(ref)
        cum_ref_length += ref_length or 0
        for n in range(1, max_n + 1):
            for g, c in _ngrams(pred, n).items():
                if g in ref_max:
                    m = min(c, ref_max[g])
                    match[n] += m
                    tst_info[n] += info(g) * m

    # bleu_score (with the script's default smoothing)
    exp_len_score = math.exp(min(0.0, 1.0 - cum_ref_length / tst[1])) if tst[1] > 0 else 0.0
    score, smooth, bleu = 0.0, 1, 0.0
    for j in range(1, 5):
        if tst[j] == 0:
            iscore = 0.0
        elif match[j] == 0:
            smooth *= 2
            iscore = math.log(1.0 / (smooth * tst[j]))
        else:
            iscore = math.log(match[j] / tst[j])
        score += iscore
        bleu = math.exp(score / j) * exp_len_score

    # nist_score
    nist = sum(tst_info[n] / max(tst[n], 1) for n in range(1, max_n + 1))
    avg_ref = ref_cnt[1] / nsys
    nist *= _nist_length_penalty(tst[1], avg_ref) if avg_ref > 0 else 0.0
    return bleu, nist


def bleu_nist(hypotheses: list[str], references: list[list[str]], variant: str = "perl") -> tuple[float, float]:
    """Corpus (BLEU in [0, 1], NIST) of ``hypotheses`` against grouped ``references``."""
    _check(hypotheses, references)
    if variant == "python":
        return _bleu_nist_python(hypotheses, references)
    if variant == "perl":
        return _bleu_nist_perl(hypotheses, references)
    raise MetricsError(f"unknown mteval variant {variant!r}; choose one of {list(VARIANTS)}")
