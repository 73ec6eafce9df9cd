"""Choosing each row's next token: greedy without a softmax, or seeded sampling; and logprobs.
Before the choice, a row's repetition controls (if its request asks) change its logits.

A sampled row draws from its own `torch.Generator`, one uniform number per token, and picks the
token by inverse CDF over its filtered distribution. Its tokens therefore depend only on its own
logits and its own seed, never on which rows share the batch.
"""
from __future__ import annotations

import torch

from ..generation import apply_repetition_controls


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> int:
    """One token from fp32 logits (vocab,): temperature, then top-k, then top-p (nucleus)."""
    x = logits / temperature
    if top_k and top_k < x.shape[-1]:
        values, ids = x.topk(top_k)          # sorted, highest first
    elif top_p < 1.0:
        values, ids = x.sort(descending=True)
    else:
        values, ids = x, None
    probs = torch.softmax(values, -1)
    if top_p < 1.0:
        # keep the smallest head whose mass reaches top_p (at least one token)
        before = probs.cumsum(-1) - probs
        probs = torch.where(before < top_p, probs, torch.zeros_like(probs))
    cdf = probs.cumsum(-1)
    u = torch.rand((), generator=generator, dtype=torch.float64).item() * float(cdf[-1])
    pick = min(int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype), right=True)), cdf.shape[-1] - 1)
    while probs[pick] == 0 and pick > 0:  # u landed on the edge of a removed token
        pick -= 1
    return int(ids[pick]) if ids is not None else pick


def repetition_controls(logits: torch.Tensor, rows, histories: list[list[int]]) -> torch.Tensor:
    """Each row's logits after its request's `repetition_penalty` and `no_repeat_ngram_size`, over the
    tokens it has generated (`histories[i]`), exactly as `generation.apply_repetition_controls`.
    Returns `logits` itself when no row asks for them."""
    which = [i for i, row in enumerate(rows) if row.request.penalises]
    if not which:
        return logits
    logits = logits.clone()
    for i in which:
        logits[i: i + 1] = apply_repetition_controls(logits[i: i + 1], [histories[i]], rows[i].request)
    return logits


def choose(logits: torch.Tensor, rows, raw: torch.Tensor | None = None) -> list[tuple[int, float | None, list | None]]:
    """(token, logprob, top_logprobs) for each row of fp32 logits (batch, vocab).

    `rows[i]` has `.request` (temperature, top_k, top_p, logprobs, top_logprobs) and `.generator`.
    Logprobs are those of the model's distribution (log-softmax of the `raw` logits, before the
    repetition controls; `logits` when not given), as vLLM reports them by default.
    """
    raw = logits if raw is None else raw
    greedy = logits.argmax(-1).tolist()
    want = [i for i, r in enumerate(rows) if r.request.logprobs or r.request.top_logprobs]
    logprobs = torch.log_softmax(raw[want], -1) if want else None
    out = []
    for i, row in enumerate(rows):
        req = row.request
        token = greedy[i] if req.greedy else sample_row(logits[i], req.temperature, req.top_k, req.top_p,
                                                        row.generator)
        lp, top = None, None
        if i in want:
            lp_row = logprobs[want.index(i)]
            lp = float(lp_row[token])
            if req.top_logprobs:
                values, ids = lp_row.topk(req.top_logprobs)
                top = list(zip(ids.tolist(), values.tolist()))
        out.append((token, lp, top))
    return out
