"""Beam search as engine rows: a request with `beams=k` decodes as k rows, one per beam.

The group ranks its candidates exactly as `generation.decode`'s beam search did (the paper's
decoding): every live beam's score plus its next-token log-probabilities form a (k, vocab) table
(a dead beam's row is -inf), the best 2k candidates are read in order; a stop token among the
first k ends that hypothesis (its score normalised by length ** length_penalty, the stop token
counted), other candidates continue until k are chosen. A group is done when k hypotheses have
finished and the best running one, normalised, cannot beat the worst of them; or when no candidate
continues; or after max_tokens steps, where the running beams compete with the finished ones.

Rows are re-seated after each ranking (`reseat`): the first new beam that continues an old beam
keeps that beam's row (its cache is already right); any other new beam takes a row whose
hypothesis was dropped, and that row's cache is forked from its source beam's row
(`backend.fork`). After the first step a group always holds k rows (it reserved k slots at
admission); a dead beam's row idles until a later step needs it again.
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


class BeamGroup:
    """One beam request's hypotheses, finished and running; `rows[j]` decodes beam j."""

    def __init__(self, request, stop_ids: set[int]):
        self.request = request
        self.k, self.length_penalty = request.beams, request.length_penalty
        self.max_steps = request.max_tokens
        self.stop_ids = stop_ids
        self.rows: list = []                            # set by the engine: the leader, then k rows
        self.scores: list[float] = [0.0]                # beam j's summed log-probability (-inf: dead)
        self.sequences: list[list[int]] = [[]]          # beam j's tokens so far
        self.finished: list[tuple[float, list[int], bool]] = []   # (normalised score, tokens, stopped)
        self.steps = 0
        self.done = False

    def normalised(self, score: float, length: int) -> float:
        return score / (max(length, 1) ** self.length_penalty)

    def history(self, row) -> list[int]:
        """The tokens that `row`'s beam has generated (what the repetition controls look at)."""
        return self.sequences[self.rows.index(row)] if self.rows else self.sequences[0]

    def rank(self, logprobs: torch.Tensor) -> list[tuple[float, int, int]]:
        """Take one step: `logprobs` (rows, vocab), row j for beam j. Returns the new beams as
        (score, source beam, token), best first; empty when the group is done."""
        step, k = self.steps, self.k
        self.steps += 1
        vocab = logprobs.shape[-1]
        table = torch.full((k, vocab), NEG_INF, dtype=logprobs.dtype, device=logprobs.device)
        live = [j for j, s in enumerate(self.scores) if s > NEG_INF]
        if live:
            scores = torch.tensor([self.scores[j] for j in live], dtype=logprobs.dtype, device=logprobs.device)
            table[live] = scores[:, None] + logprobs[live]
        top_scores, top_ids = table.view(-1).topk(2 * k)
        chosen = []
        for rank, (score, flat) in enumerate(zip(top_scores.tolist(), top_ids.tolist())):
            beam, token = divmod(flat, vocab)
            if score == NEG_INF:
                break
            if token in self.stop_ids:
                if rank < k:
                    seq = self.sequences[beam]
                    self.finished.append((self.normalised(score, len(seq) + 1), list(seq), True))
                continue
            chosen.append((score, beam, token))
            if len(chosen) == k:
                break
        self.finished.sort(key=lambda x: -x[0])
        del self.finished[k:]
        if len(self.finished) == k and chosen:
            self.done = self.normalised(chosen[0][0], step + 1) <= self.finished[-1][0]
        elif not chosen:
            self.done = True
        if self.done:
            return []
        self.sequences = [self.sequences[beam] + [token] for _, beam, token in chosen]
        self.scores = [score for score, _, _ in chosen]
        if self.steps == self.max_steps:  # out of length: the running beams compete with the finished ones
            self.finished += [(self.normalised(s, len(seq)), seq, False) for s, seq in zip(self.scores, self.sequences)]
            self.finished.sort(key=lambda x: -x[0])
            self.done = True
            return []
        # beams beyond the chosen ones are dead (score -inf) until a later step needs their rows again
        self.scores += [NEG_INF] * (k - len(chosen))
        self.sequences += [[] for _ in range(k - len(chosen))]
        return chosen

    def best(self) -> tuple[list[int], bool]:
        """The output (tokens, whether it ended at a stop token) once done."""
        if not self.finished:
            return [], True
        _, tokens, stopped = self.finished[0]
        return tokens, stopped

    def reseat(self, chosen: list[tuple[float, int, int]]) -> list[tuple[object, object]]:
        """Give each new beam a row (`rows` holds k rows, old beam j in rows[j]); returns the forks to make,
        (row, source row): the first new beam from each old beam keeps that beam's row, the others take
        rows whose beam was dropped. The rows left over idle as dead beams."""
        old = self.rows
        new = [None] * len(chosen)
        for j, (_, beam, _) in enumerate(chosen):
            if old[beam] not in new:
                new[j] = old[beam]
        spare = [row for row in old if row not in new]
        forks = []
        for j, (_, beam, _) in enumerate(chosen):
            if new[j] is None:
                new[j] = spare.pop(0)
                forks.append((new[j], old[beam]))
        self.rows = new + spare
        return forks
