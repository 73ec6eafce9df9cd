"""Decoding steps for any model prefixtune supports, through the HF forward and prefixtune's
attention function (`cache.prefix_attention`): slower than `llama_fast`, but exact everywhere.

* `HFDecoder` (GPT-2, Llama, any decoder-only model): the rows' paged entries, gathered, enter each
  forward as the rows' "prefix" (`PrefixKV` with a per-row mask), and the attention function
  captures the new tokens' keys/values, which are then written into the rows' blocks. No transformers cache is used.
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
from .kv import PagedKV


class HFDecoder:
    def __init__(self, model, kv: PagedKV, num_layers: int):
        self.model, self.kv, self.num_layers = model, kv, num_layers
        cache.install(model)

    def _run(self, input_ids, position_ids, prefix: PrefixKV, last=None):
        kw = {} if last is None else {"logits_to_keep": last}
        out = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), position_ids=position_ids,
                         prefix_kv=prefix, use_cache=False, **kw)
        return out.logits[:, -1].float()

    def prefill(self, batch: list[tuple[int, object, list[int]]], totals=None) -> torch.Tensor:
        """Prefill rows or chunks (slot, prefix P or None, tokens), one forward each; their last-position
        logits (rows, vocab)."""
        return torch.stack([self._prefill(*row) for row in batch])

    def _write(self, slots: list[int], positions: list[int], captured: dict, tokens: int):
        """The captured keys/values (rows, H, tokens, D) of every layer into the rows' blocks."""
        index = self.kv.write_index(slots, positions)
        for i in range(self.num_layers):
            k, v = captured[f"decoder.{i}"]
            # (rows * tokens, 2H, D): a token's key heads then value heads, as write_index orders them
            both = torch.cat([k, v], dim=1).transpose(1, 2).reshape(-1, self.kv.head_dim)
            self.kv.flat(i).index_copy_(0, index, both.to(self.kv.dtype))

    @torch.no_grad()
    def _prefill(self, slot: int, prefix: torch.Tensor | None, prompt: list[int]) -> torch.Tensor:
        kv = self.kv
        if prefix is not None:
            kv.attach_prefix(slot, prefix)
        p, n = kv.length(slot), len(prompt)
        keys, values = {}, {}
        if p:
            for i in range(self.num_layers):
                entries, _ = kv.gather(i, [slot])
                keys[f"decoder.{i}"], values[f"decoder.{i}"] = entries[0, None, :, :p], entries[1, None, :, :p]
        captured: dict = {}
        state = PrefixKV(keys, values, torch.ones(1, p, dtype=torch.bool), capture=captured)
        ids = torch.tensor([prompt])
        logits = self._run(ids, torch.arange(p, p + n)[None], state, torch.tensor([n - 1]))
        self._write([slot] * n, list(range(p, p + n)), captured, n)
        return logits[0]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kv = self.kv
        b = tokens.shape[0]
        slots, where = list(range(b)), positions.tolist()
        span = kv.span(max(where) + 1)
        keys, values = {}, {}
        blocks = kv.padded_index(slots, span)
        for i in range(self.num_layers):
            keys[f"decoder.{i}"], values[f"decoder.{i}"] = kv.padded(i, blocks, b, span)
        # the token sees its row's entries before it; itself it sees as the one "real" key
        mask = torch.arange(span)[None, :] < positions[:, None]
        captured: dict = {}
        logits = self._run(tokens[:, None], positions[:, None], PrefixKV(keys, values, mask, capture=captured))
        self._write(slots, where, captured, 1)
        return logits

    def move(self, src: int, dst: int, length: int):
        self.kv.move(src, dst, length)

    def release(self, slot: int):
        self.kv.release(slot)

    def fork(self, src: int, dst: int, length: int):
        self.kv.fork(src, dst, length)


class RowWise:
    def __init__(self, model, spec, dtype):
        self.model, self.spec, self.dtype = model, spec, dtype
        self.states: dict[int, _Decoder] = {}
        cache.install(model)

    def prefill(self, batch: list[tuple[int, object, list[int]]], totals=None) -> torch.Tensor:
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
