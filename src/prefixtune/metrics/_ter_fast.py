"""A faster, result-identical copy of sacrebleu's TER core (``sacrebleu/metrics/lib_ter.py``, 2.x).

sacrebleu (Apache-2.0, Copyright 2020 Memsource) re-implements tercom's shift
search in pure Python; on WebNLG/DART (up to 70-token references) it needs
minutes. This module keeps its algorithm, limits, tie-breaking and caching
(so every segment gets the same number of edits; tests/test_metrics.py checks
that against sacrebleu) and only rewrites the edit-distance inner loop with
flat cost/op rows instead of tuples.
"""
from __future__ import annotations

import math

_MAX_SHIFT_SIZE = 10
_MAX_SHIFT_DIST = 50
_BEAM_WIDTH = 25
_MAX_CACHE_SIZE = 10000
_MAX_SHIFT_CANDIDATES = 1000
_INF = int(1e16)
_FLIP_OPS = str.maketrans("id", "di")


def translation_edit_rate(words_hyp: list[str], words_ref: list[str]) -> tuple[int, int]:
    """(number of edits, reference length), as ``sacrebleu.metrics.lib_ter.translation_edit_rate``."""
    n_ref = len(words_ref)
    if n_ref == 0:
        return len(words_hyp), 0
    cached_ed = _BeamEditDistance(words_ref)
    shifts = 0
    input_words = words_hyp
    checked = 0
    while True:
        delta, new_words, checked = _shift(input_words, words_ref, cached_ed, checked)
        if checked >= _MAX_SHIFT_CANDIDATES:
            break
        if delta <= 0:
            break
        shifts += 1
        input_words = new_words
    edit_distance, _ = cached_ed(input_words)
    return shifts + edit_distance, n_ref


def _shift(words_h, words_r, cached_ed, checked):
    pre_score, inv_trace = cached_ed(words_h)
    align, ref_err, hyp_err = _trace_to_alignment(inv_trace.translate(_FLIP_OPS))
    best = None
    for start_h, start_r, length in _find_shifted_pairs(words_h, words_r):
        if sum(hyp_err[start_h:start_h + length]) == 0:
            continue
        if sum(ref_err[start_r:start_r + length]) == 0:
            continue
        if start_h <= align[start_r] < start_h + length:
            continue
        prev_idx = -1
        for offset in range(-1, length):
            if start_r + offset == -1:
                idx = 0
            elif start_r + offset in align:
                idx = align[start_r + offset] + 1
            else:
                break
            if idx == prev_idx:
                continue
            prev_idx = idx
            shifted = _perform_shift(words_h, start_h, length, idx)
            candidate = (pre_score - cached_ed(shifted)[0], length, -start_h, -idx, shifted)
            checked += 1
            if not best or candidate > best:
                best = candidate
        if checked >= _MAX_SHIFT_CANDIDATES:
            break
    if not best:
        return 0, words_h, checked
    return best[0], best[4], checked


def _perform_shift(words, start, length, target):
    if target < start:
        return words[:target] + words[start:start + length] + words[target:start] + words[start + length:]
    if target > start + length:
        return words[:start] + words[start + length:target] + words[start:start + length] + words[target:]
    return words[:start] + words[start + length:length + target] + words[start:start + length] + words[length + target:]


def _find_shifted_pairs(words_h, words_r):
    n_h, n_r = len(words_h), len(words_r)
    for start_h in range(n_h):
        for start_r in range(n_r):
            if abs(start_r - start_h) > _MAX_SHIFT_DIST:
                continue
            length = 0
            while words_h[start_h + length] == words_r[start_r + length] and length < _MAX_SHIFT_SIZE:
                length += 1
                yield start_h, start_r, length
                if n_h == start_h + length or n_r == start_r + length:
                    break


def _trace_to_alignment(trace):
    pos_hyp = pos_ref = -1
    hyp_err, ref_err, align = [], [], {}
    for op in trace:
        if op == " " or op == "s":
            pos_hyp += 1
            pos_ref += 1
            align[pos_ref] = pos_hyp
            err = 0 if op == " " else 1
            hyp_err.append(err)
            ref_err.append(err)
        elif op == "i":
            pos_hyp += 1
            hyp_err.append(1)
        elif op == "d":
            pos_ref += 1
            align[pos_ref] = pos_hyp
            ref_err.append(1)
        else:
            raise ValueError(f"unknown operation {op!r}")
    return align, ref_err, hyp_err


class _BeamEditDistance:
    """sacrebleu ``BeamEditDistance`` with rows stored as (costs list, ops list) pairs."""

    def __init__(self, words_ref):
        self._ref = words_ref
        self._n_ref = len(words_ref)
        self._initial = (list(range(self._n_ref + 1)), ["i"] * (self._n_ref + 1))
        self._cache: dict = {}
        self._cache_size = 0

    def __call__(self, words_hyp):
        start, rows = self._find_cache(words_hyp)
        distance, new_rows, trace = self._edit_distance(words_hyp, start, rows)
        self._add_cache(words_hyp, new_rows)
        return distance, trace

    def _edit_distance(self, words_h, start_h, rows):
        n_h = len(words_h)
        n_ref = self._n_ref
        ref = self._ref
        inf = _INF
        ratio = n_ref / n_h if words_h else 1
        beam = math.ceil(ratio / 2 + _BEAM_WIDTH) if _BEAM_WIDTH < ratio / 2 else _BEAM_WIDTH
        costs = [r[0] for r in rows]
        ops = [r[1] for r in rows]
        for i in range(start_h + 1, n_h + 1):
            diag = math.floor(i * ratio)
            min_j = max(0, diag - beam)
            max_j = n_ref + 1 if i == n_h else min(n_ref + 1, diag + beam)
            prev = costs[i - 1]
            cur = [inf] * (n_ref + 1)
            cur_ops = ["x"] * (n_ref + 1)
            word = words_h[i - 1]
            j = min_j
            if j == 0:
                cur[0] = prev[0] + 1
                cur_ops[0] = "d"
                j = 1
            left = cur[j - 1] if j >= 1 else inf
            for j in range(j, max_j):
                if word == ref[j - 1]:
                    best, op = prev[j - 1], " "
                else:
                    best, op = prev[j - 1] + 1, "s"
                if best >= inf:  # the table cell starts at infinity and only strictly smaller costs replace it
                    best, op = inf, "x"
                cand = prev[j] + 1
                if best > cand:
                    best, op = cand, "d"
                cand = left + 1
                if best > cand:
                    best, op = cand, "i"
                cur[j] = best
                cur_ops[j] = op
                left = best
            costs.append(cur)
            ops.append(cur_ops)
        trace = []
        i, j = n_h, n_ref
        while i > 0 or j > 0:
            op = ops[i][j]
            trace.append(op)
            if op == " " or op == "s":
                i -= 1
                j -= 1
            elif op == "i":
                j -= 1
            elif op == "d":
                i -= 1
            else:
                raise ValueError(f"unknown operation {op!r}")
        return costs[n_h][n_ref], list(zip(costs[len(rows):], ops[len(rows):])), "".join(reversed(trace))

    def _add_cache(self, words_hyp, new_rows):
        if self._cache_size >= _MAX_CACHE_SIZE:
            return
        node = self._cache
        skip = len(words_hyp) - len(new_rows)
        for i in range(skip):
            node = node[words_hyp[i]][0]
        for word, row in zip(words_hyp[skip:], new_rows):
            if word not in node:
                node[word] = ({}, row)
                self._cache_size += 1
            node = node[word][0]

    def _find_cache(self, words_hyp):
        node = self._cache
        start = 0
        rows = [self._initial]
        for word in words_hyp:
            if word in node:
                start += 1
                node, row = node[word]
                rows.append(row)
            else:
                break
        return start, rows


def segment_statistics(items) -> list[list[float]]:
    """[fewest edits, average reference length] per (hypothesis words, [reference words, ...]) item."""
    out = []
    for words, refs in items:
        best, total = int(1e16), 0
        for ref in refs:
            edits, ref_len = translation_edit_rate(words, ref)
            total += ref_len
            best = min(best, edits)
        out.append([best, total / len(refs)])
    return out


if __name__ == "__main__":  # worker mode: JSON items on stdin, JSON statistics on stdout (see ter.py)
    import json
    import sys

    json.dump(segment_statistics(json.load(sys.stdin)), sys.stdout)
