"""Decoding steps for any model prefixtune supports, through the HF forward and prefixtune's
attention function (`cache.prefix_attention`): slower than `llama_fast`, but exact everywhere.

* `HFDecoder` (GPT-2, Llama, any decoder-only model): the slot cache enters each forward as the
  rows' "prefix" (`PrefixKV` with a per-row mask), and the attention function captures the new
  tokens' keys/values, which are then written into the slots. No transformers cache is used.
* `RowWise` (BART, T5): each row keeps today's `generation._Decoder` state and steps alone. Correct,
  joins and leaves like any row (a beam forks a copy of another's state), but not batched: the
  encoder-decoder fast path is future work.
"""
from __future__ import annotations

import copy

import torch

from .. import cache
from ..cache import PrefixKV
from ..generation import _Decoder
from ..forward import prefix_kv_from_groups
from .kv import SlotKV


class HFDecoder:
    def __init__(self, model, kv: SlotKV, num_layers: int):
        self.model, self.kv, self.num_layers = model, kv, num_layers
        cache.install(model)

    def _run(self, input_ids, position_ids, prefix: PrefixKV, last=None):
        kw = {} if last is None else {"logits_to_keep": last}
        out = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), position_ids=position_ids,
                         prefix_kv=prefix, use_cache=False, **kw)
        return out.logits[:, -1].float()

    def prefill(self, batch: list[tuple[int, object, list[int]]]) -> torch.Tensor:
        """Admit rows (slot, prefix, prompt), one forward each; their last-position logits (rows, vocab)."""
        return torch.stack([self._prefill(*row) for row in batch])

    @torch.no_grad()
    def _prefill(self, slot: int, prefix: torch.Tensor | None, prompt: list[int]) -> torch.Tensor:
        kv = self.kv
        p = 0 if prefix is None else prefix.shape[3]
        keys, values = {}, {}
        if prefix is not None:
            kv.write_prefix(slot, prefix)
            keys = {f"decoder.{i}": kv.k[i, slot: slot + 1, :, :p] for i in range(self.num_layers)}
            values = {f"decoder.{i}": kv.v[i, slot: slot + 1, :, :p] for i in range(self.num_layers)}
        captured: dict = {}
        state = PrefixKV(keys, values, torch.ones(1, p, dtype=torch.bool), capture=captured)
        n = len(prompt)
        ids = torch.tensor([prompt])
        logits = self._run(ids, torch.arange(p, p + n)[None], state, torch.tensor([n - 1]))
        for i in range(self.num_layers):
            k, v = captured[f"decoder.{i}"]
            kv.k[i, slot, :, p: p + n] = k[0]
            kv.v[i, slot, :, p: p + n] = v[0]
        return logits[0]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kv = self.kv
        b = tokens.shape[0]
        span = kv.span(int(positions.max()) + 1)
        keys = {f"decoder.{i}": kv.k[i, :b, :, :span] for i in range(self.num_layers)}
        values = {f"decoder.{i}": kv.v[i, :b, :, :span] for i in range(self.num_layers)}
        # the token sees its row's entries before it; itself it sees as the one "real" key
        mask = torch.arange(span)[None, :] < positions[:, None]
        captured: dict = {}
        logits = self._run(tokens[:, None], positions[:, None], PrefixKV(keys, values, mask, capture=captured))
        rows = torch.arange(b)
        for i in range(self.num_layers):
            k, v = captured[f"decoder.{i}"]
            kv.k[i][rows, :, positions] = k[:, :, 0]
            kv.v[i][rows, :, positions] = v[:, :, 0]
        return logits

    def move(self, src: int, dst: int, length: int):
        self.kv.move(src, dst, length)

    def fork(self, src: int, dst: int, length: int):
        self.kv.fork(src, dst, length)


class RowWise:
    def __init__(self, model, spec, dtype):
        self.model, self.spec, self.dtype = model, spec, dtype
        self.states: dict[int, _Decoder] = {}
        cache.install(model)

    def prefill(self, batch: list[tuple[int, object, list[int]]]) -> torch.Tensor:
        return torch.stack([self._prefill(*row) for row in batch])

    @torch.no_grad()
    def _prefill(self, slot: int, prefix: dict | None, prompt: list[int]) -> torch.Tensor:
        prefix_kv = prefix_kv_from_groups([prefix], self.spec, dtype=self.dtype) if prefix is not None else None
        ids = torch.tensor([prompt])
        state = _Decoder(self.model, self.spec, ids, torch.ones_like(ids), prefix_kv)
        self.states[slot] = state
        return state.logits[0]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.states[i].step(tokens[i: i + 1]) for i in range(tokens.shape[0])])

    def move(self, src: int, dst: int, length: int):
        self.states[dst] = self.states.pop(src)

    def fork(self, src: int, dst: int, length: int):
        """Row `dst` continues row `src`: a copy of its cache; the encoder's output and the prefix are
        read only, so shared."""
        state = copy.copy(self.states[src])
        state.cache = copy.deepcopy(state.cache)
        self.states[dst] = state

    def release(self, slot: int):
        self.states.pop(slot, None)
