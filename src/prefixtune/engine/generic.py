"""Decoding steps for any model prefixtune supports, through the HF forward and prefixtune's
attention function (`cache.prefix_attention`): slower than `llama_fast`, but exact everywhere.

* `HFDecoder` (GPT-2, Llama, any decoder-only model): the rows' paged entries, gathered, enter each
  forward as the rows' "prefix" (`PrefixKV` with a per-row mask), and the attention function
  captures the new tokens' keys/values, which are then written into the rows' blocks. No transformers cache is used.
  It also takes the ablations' virtual tokens (`Virtual`): input embeddings prefilled before the
  prompt, and an infix that the prompt's tokens but its last do not see.
* `RowWise` (BART, T5): each row keeps its own `EncoderDecoderRow` (encoder output, a transformers
  cache) and steps alone. Correct, joins and leaves like any row (a beam forks a copy of another's
  state), but not batched: the encoder-decoder fast path is future work.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .. import cache
from ..cache import PrefixKV
from ..forward import prefix_kv_from_groups
from .kv import PagedKV


@dataclass
class Virtual:
    """A row's ablation virtual tokens, as a backend takes them in place of a plain prefix: `p` (the
    prefix or infix, as the backend takes a prefix, or None), `embeds` (k, hidden) read as input
    embeddings before the prompt, and for an infix the first cache position that sees it (`sees_from`:
    the prompt's last token; None: every position sees `p`)."""

    p: object = None
    embeds: torch.Tensor | None = None
    sees_from: int | None = None


class HFDecoder:
    def __init__(self, model, kv: PagedKV, num_layers: int):
        self.model, self.kv, self.num_layers = model, kv, num_layers
        self.infix: dict[int, tuple[int, int]] = {}  # slot being prefilled -> (infix entries, first position seeing them)
        cache.install(model)

    def _run(self, input_ids, position_ids, prefix: PrefixKV, last=None, embeds=None):
        kw = {} if last is None else {"logits_to_keep": last}
        if embeds is None:
            kw["input_ids"] = input_ids
        else:  # virtual tokens first, then the tokens' own embeddings
            table = self.model.get_input_embeddings()
            kw["inputs_embeds"] = torch.cat([embeds.to(table.weight.device, table.weight.dtype)[None],
                                             table(input_ids)], dim=1)
        out = self.model(attention_mask=torch.ones_like(position_ids), position_ids=position_ids,
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
    def _prefill(self, slot: int, prefix, prompt: list[int]) -> torch.Tensor:
        """A prompt, or a chunk of it after the first (`prefix` None), into the slot's blocks."""
        kv, embeds = self.kv, None
        if isinstance(prefix, Virtual):
            embeds = prefix.embeds
            if prefix.sees_from is not None:  # the infix's entries, and who sees them (later chunks too)
                self.infix[slot] = (prefix.p.shape[0], prefix.sees_from)
            prefix = prefix.p
        if prefix is not None:
            kv.attach_prefix(slot, prefix)
        p, n = kv.length(slot), len(prompt) + (0 if embeds is None else embeds.shape[0])
        keys, values = {}, {}
        if p:
            for i in range(self.num_layers):
                entries, _ = kv.gather(i, [slot])
                keys[f"decoder.{i}"], values[f"decoder.{i}"] = entries[0, None, :, :p], entries[1, None, :, :p]
        positions = torch.arange(p, p + n)
        seen = torch.ones(1, p, dtype=torch.bool)
        if slot in self.infix:  # (1, n, p): a token before the prompt's last sees the entries after the infix
            infix_len, sees_from = self.infix[slot]
            seen = (torch.arange(p)[None, :] >= infix_len) | (positions[:, None] >= sees_from)
            seen = seen[None]
        captured: dict = {}
        state = PrefixKV(keys, values, seen, capture=captured)
        logits = self._run(torch.tensor([prompt]), positions[None], state, torch.tensor([n - 1]), embeds)
        self._write([slot] * n, positions.tolist(), captured, n)
        return logits[0]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, slots: list[int] | None = None) -> torch.Tensor:
        kv = self.kv
        b = tokens.shape[0]
        slots, where = list(range(b)) if slots is None else slots, positions.tolist()
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
        self.infix.pop(src, None)  # its prompt is in: decode steps see every entry
        self.kv.move(src, dst, length)

    def release(self, slot: int):
        self.infix.pop(slot, None)
        self.kv.release(slot)

    def fork(self, src: int, dst: int, length: int):
        self.kv.fork(src, dst, length)


class EncoderDecoderRow:
    """One encoder-decoder row's decoding state: the encoder's output (read only) and the decoder's cache.

    `prefix_kv` (one row) enters every layer's attention; `embeds` (1, k, hidden) are read before
    the encoder's input (the embedding-only ablation: [v; x], as in training)."""

    def __init__(self, model, input_ids, prefix_kv: PrefixKV | None, embeds: torch.Tensor | None = None):
        self.model, self.prefix_kv = model, prefix_kv
        self.cache = cache.new_cache(model)
        self.attention_mask = torch.ones(1, input_ids.shape[1] + (0 if embeds is None else embeds.shape[1]),
                                         dtype=torch.long, device=input_ids.device)
        if embeds is None:
            inputs = {"input_ids": input_ids}
        else:
            table = model.get_input_embeddings()
            inputs = {"inputs_embeds": torch.cat([embeds.to(table.weight.dtype), table(input_ids)], dim=1)}
        self.encoder_outputs = model.get_encoder()(**inputs, attention_mask=self.attention_mask, prefix_kv=prefix_kv)
        start = torch.full((1,), model.config.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
        self.logits = self.step(start)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token; returns the next-token logits (1, vocab)."""
        out = self.model(encoder_outputs=self.encoder_outputs, attention_mask=self.attention_mask,
                         decoder_input_ids=tokens[:, None], cache=self.cache, use_cache=True, prefix_kv=self.prefix_kv)
        return out.logits[:, -1].float()


class RowWise:
    def __init__(self, model, spec, dtype):
        self.model, self.spec, self.dtype = model, spec, dtype
        self.states: dict[int, EncoderDecoderRow] = {}
        cache.install(model)

    def prefill(self, batch: list[tuple[int, object, list[int]]], totals=None) -> torch.Tensor:
        return torch.stack([self._prefill(*row) for row in batch])

    @torch.no_grad()
    def _prefill(self, slot: int, prefix, prompt: list[int]) -> torch.Tensor:
        """`prefix`: P per group, a `Virtual` (its `p` P per group: an infix has the "decoder" group only), or None."""
        embeds = None
        if isinstance(prefix, Virtual):
            embeds = None if prefix.embeds is None else prefix.embeds[None].to(self.model.device)
            prefix = prefix.p
        prefix_kv = prefix_kv_from_groups([prefix], self.spec, dtype=self.dtype) if prefix is not None else None
        state = EncoderDecoderRow(self.model, torch.tensor([prompt], device=self.model.device), prefix_kv, embeds)
        self.states[slot] = state
        return state.logits[0]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, slots: list[int] | None = None) -> torch.Tensor:
        slots = range(tokens.shape[0]) if slots is None else slots
        return torch.cat([self.states[s].step(tokens[i: i + 1]) for i, s in enumerate(slots)])

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
