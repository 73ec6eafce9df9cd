"""Batched decoding with per-row prefixes: greedy and beam search (the loop before the engine).

The engine (engine/) decodes every decoder-only model; this loop remains for encoder-decoders, the
ablations whose virtual tokens are inputs (`embeds_prefix`), and as the reference the engine's
greedy and beam outputs are tested against. `DecodingConfig`, `stop_ids` and
`apply_repetition_controls` are shared by both.

transformers' `generate` assumes everything in the cache came from the input ids,
which a prefix breaks (PEFT's left-padded rows decode into garbage for that
reason). This loop owns positions and masks, so a row decodes the same tokens
alone or in any batch, next to any other prefix. The cache of the prefix and the
source is kept across steps; finished rows leave the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from . import cache
from .cache import PrefixKV
from .models import ModelSpec, model_spec
from .forward import position_ids, prefix_offsets


DTYPES = ("model", "auto", "bf16", "fp32")


@dataclass
class DecodingConfig:
    max_new_tokens: int = 64
    num_beams: int = 1
    length_penalty: float = 1.0
    stop_at_newline: bool = True
    ignore_eos: bool = False  # decode exactly max_new_tokens unless a newline stops it (benchmarks)
    # HF's controls against loops ("fictional fictional ..."), off by default. Both look at the generated
    # tokens only, not the source: a data-to-text output must be free to copy its input's names.
    no_repeat_ngram_size: int = 0     # n > 0: an n-gram never occurs twice in one output
    repetition_penalty: float = 1.0   # > 1: a generated token's logit is divided (if > 0) or multiplied by it
    # the engine's dtype (engine.offline: greedy and beam search of decoder-only models): "model" (the model's
    # own), "auto" (bf16 where the CPU computes it natively), "bf16" or "fp32". `decode` below runs in the model's.
    dtype: str = "model"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.num_beams < 1:
            raise ValueError("num_beams must be >= 1")
        if self.no_repeat_ngram_size < 0:
            raise ValueError("no_repeat_ngram_size must be >= 0 (0: off)")
        if not self.repetition_penalty > 0:
            raise ValueError("repetition_penalty must be > 0 (1: off)")

    @property
    def penalises(self) -> bool:
        return self.no_repeat_ngram_size > 0 or self.repetition_penalty != 1.0


def apply_repetition_controls(logits: torch.Tensor, histories: list[list[int]], config: DecodingConfig) -> torch.Tensor:
    """Row i's next-token logits after `config`'s repetition penalty and n-gram ban, given the tokens row i
    has generated (`histories[i]`). Returns `logits` itself when both controls are off."""
    if not config.penalises:
        return logits
    logits = logits.clone()
    n, penalty = config.no_repeat_ngram_size, config.repetition_penalty
    for row, history in enumerate(histories):
        if penalty != 1.0 and history:
            seen = torch.tensor(sorted(set(history)), device=logits.device)
            scores = logits[row, seen]
            logits[row, seen] = torch.where(scores > 0, scores / penalty, scores * penalty)
        if n and len(history) >= n - 1:
            tail = tuple(history[len(history) - n + 1:]) if n > 1 else ()
            banned = [history[i + n - 1] for i in range(len(history) - n + 1) if tuple(history[i:i + n - 1]) == tail]
            if banned:
                logits[row, banned] = float("-inf")
    return logits


@lru_cache(maxsize=8)
def _newline_ids(tokenizer) -> frozenset[int]:
    vocab = tokenizer.get_vocab()
    return frozenset(i for i in vocab.values() if "\n" in tokenizer.decode([i]))


def stop_ids(tokenizer, stop_at_newline: bool, ignore_eos: bool = False) -> set[int]:
    ids = set()
    eos = None if ignore_eos else tokenizer.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if stop_at_newline:
        ids |= _newline_ids(tokenizer)
    return ids


class _Decoder:
    """Incremental decoding state for a batch: cache, masks, positions and prefixes, all row-selectable."""

    def __init__(self, model, spec: ModelSpec, input_ids, attention_mask, prefix_kv: PrefixKV | None,
                 embeds_prefix: torch.Tensor | None = None):
        self.model, self.spec, self.prefix_kv = model, spec, prefix_kv
        self.cache = cache.new_cache(model)
        self.encoder_outputs = None
        inputs = {"input_ids": input_ids}
        if embeds_prefix is not None:  # virtual tokens (embedding-only): [v; x], as in training
            inputs, attention_mask = _with_embeds_prefix(model, spec, input_ids, attention_mask, embeds_prefix)
        self.attention_mask = attention_mask
        if spec.family == "encoder-decoder":
            self.encoder_outputs = model.get_encoder()(**inputs, attention_mask=attention_mask,
                                                       prefix_kv=prefix_kv)
            start = model.config.decoder_start_token_id
            first = torch.full((input_ids.shape[0], 1), start, dtype=torch.long, device=input_ids.device)
            self.logits = self._decoder_step(first)
        else:
            offsets = prefix_offsets(prefix_kv, input_ids.shape[0], input_ids.device)
            pos = position_ids(attention_mask, offsets)
            if prefix_kv is not None and prefix_kv.query_visible is None and prefix_kv.capture is None:
                # The prefix enters the cache once: each step then appends to one cache, as without a
                # prefix, instead of prepending the prefix in every attention at every step.
                dtype = model.dtype
                in_cache = PrefixKV({k: t.to(dtype) for k, t in prefix_kv.keys.items()},
                                    {k: t.to(dtype) for k, t in prefix_kv.values.items()}, prefix_kv.mask)
                self.cache = cache.prefilled_cache(in_cache, spec.num_layers)
                attention_mask = torch.cat([prefix_kv.mask.to(attention_mask.dtype), attention_mask], dim=-1)
                self.attention_mask, self.prefix_kv, prefix_kv = attention_mask, None, None
            # the last position as an index (a copy), not `1` (a strided view that the LM head runs as a
            # batched matmul over a broadcast weight: ~8x slower at batch 32)
            last = torch.tensor([pos.shape[1] - 1], device=pos.device)
            out = model(**inputs, attention_mask=attention_mask, position_ids=pos, cache=self.cache,
                        use_cache=True, prefix_kv=prefix_kv, logits_to_keep=last)
            self.next_position = pos[:, -1:] + 1
            self.logits = out.logits[:, -1].float()

    def _decoder_step(self, tokens):
        out = self.model(encoder_outputs=self.encoder_outputs, attention_mask=self.attention_mask,
                         decoder_input_ids=tokens, cache=self.cache, use_cache=True, prefix_kv=self.prefix_kv)
        return out.logits[:, -1].float()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; returns next-token logits (batch, vocab)."""
        if self.encoder_outputs is not None:
            return self._decoder_step(tokens[:, None])
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(tokens[:, None])], dim=-1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.attention_mask,
                         position_ids=self.next_position, cache=self.cache, use_cache=True, prefix_kv=self.prefix_kv)
        self.next_position = self.next_position + 1
        return out.logits[:, -1].float()

    def select(self, rows: torch.Tensor):
        """Keep/reorder rows (finished rows leave, beams are reordered)."""
        cache.reorder_cache(self.cache, rows)
        self.attention_mask = self.attention_mask.index_select(0, rows)
        if self.prefix_kv is not None:
            self.prefix_kv = self.prefix_kv.select(rows)
        if self.encoder_outputs is not None:
            self.encoder_outputs.last_hidden_state = self.encoder_outputs.last_hidden_state.index_select(0, rows)
        else:
            self.next_position = self.next_position.index_select(0, rows)


def _with_embeds_prefix(model, spec, input_ids, attention_mask, embeds_prefix):
    """Prepend per-row input embeddings (batch, k, hidden) to the padded input: [v; pad; x] for a
    decoder (positions count real tokens only, so x starts at k as in training) and [v; x; pad] for an
    encoder (its input is right-padded, as in training)."""
    embeds = model.get_input_embeddings()(input_ids)
    ones = torch.ones(embeds_prefix.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
    embeds = torch.cat([embeds_prefix.to(device=embeds.device, dtype=embeds.dtype), embeds], dim=1)
    return {"inputs_embeds": embeds}, torch.cat([ones, attention_mask], dim=-1)


def pad_batch(sequences: list[list[int]], pad_id: int, device, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask, padded on `side`: left for a decoder (new tokens follow the input),
    right for an encoder (BART's absolute positions then match training's right padding)."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            where = slice(longest - len(s), longest) if side == "left" else slice(0, len(s))
            ids[i, where] = torch.tensor(s)
            mask[i, where] = 1
    return ids.to(device), mask.to(device)


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_batch(sequences, pad_id, device, "left")


@torch.no_grad()
def decode(model, tokenizer, sequences: list[list[int]], prefix_kv: PrefixKV | None = None,
           config: DecodingConfig | None = None, spec: ModelSpec | None = None,
           embeds_prefix: torch.Tensor | None = None, on_token=None, cancelled=None) -> list[list[int]]:
    """Generated token ids (stop token excluded) for each input sequence; row i uses prefix row i.

    `embeds_prefix` (batch, k, hidden): input embeddings read before each row's tokens (embedding-only).
    `on_token(row, token)`, if given, is called for every token as greedy decoding emits it (streaming).
    `cancelled(row)`, if given, is asked for every live row at every step; a row it answers True for
    leaves the batch there (greedy: no more compute for it; beam search: its beams stop expanding).
    """
    config = config or DecodingConfig()
    spec = spec or model_spec(model)
    cache.install(model)
    if not sequences:
        return []
    if any(len(s) == 0 for s in sequences):
        raise ValueError("cannot decode an empty input")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    side = "right" if spec.family == "encoder-decoder" else "left"
    input_ids, attention_mask = pad_batch(sequences, pad, model.device, side)
    stops = stop_ids(tokenizer, config.stop_at_newline, config.ignore_eos)
    if config.num_beams == 1:
        return _greedy(model, spec, input_ids, attention_mask, prefix_kv, config, stops, embeds_prefix, on_token,
                       cancelled)
    return _beam(model, spec, input_ids, attention_mask, prefix_kv, config, stops, embeds_prefix, cancelled)


def _greedy(model, spec, input_ids, attention_mask, prefix_kv, config, stops, embeds_prefix=None, on_token=None,
            cancelled=None):
    batch = input_ids.shape[0]
    state = _Decoder(model, spec, input_ids, attention_mask, prefix_kv, embeds_prefix)
    results: list[list[int]] = [[] for _ in range(batch)]
    active = torch.arange(batch, device=input_ids.device)  # original row of each live row
    stop_tensor = torch.tensor(sorted(stops), dtype=torch.long, device=input_ids.device)
    logits = state.logits
    for _ in range(config.max_new_tokens):
        if config.penalises:
            logits = apply_repetition_controls(logits, [results[row] for row in active.tolist()], config)
        tokens = logits.argmax(-1)
        done = torch.isin(tokens, stop_tensor)
        if cancelled is not None:
            done |= torch.tensor([cancelled(row) for row in active.tolist()], device=done.device)
        for row, token, is_done in zip(active.tolist(), tokens.tolist(), done.tolist()):
            if not is_done:
                results[row].append(token)
                if on_token is not None:
                    on_token(row, token)
        if done.all():
            break
        if done.any():
            keep = (~done).nonzero().squeeze(-1)
            state.select(keep)
            active, tokens = active[keep], tokens[keep]
        if _ == config.max_new_tokens - 1:
            break
        logits = state.step(tokens)
    return results


def _beam(model, spec, input_ids, attention_mask, prefix_kv, config, stops, embeds_prefix=None, cancelled=None):
    batch, beams = input_ids.shape[0], config.num_beams
    device = input_ids.device
    state = _Decoder(model, spec, input_ids, attention_mask, prefix_kv, embeds_prefix)
    expand = torch.arange(batch, device=device).repeat_interleave(beams)
    state.select(expand)
    logprobs = torch.log_softmax(state.logits.index_select(0, expand), -1)  # no history yet: nothing to penalise
    vocab = logprobs.shape[-1]
    scores = torch.full((batch, beams), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: only the first may expand at step one
    sequences: list[list[list[int]]] = [[[] for _ in range(beams)] for _ in range(batch)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch
    pad = 0

    def normalised(score, length):
        return score / (max(length, 1) ** config.length_penalty)

    for step in range(config.max_new_tokens):
        if cancelled is not None:
            done = [d or cancelled(b) for b, d in enumerate(done)]
            if all(done):
                break
        candidates = (scores[:, :, None] + logprobs.view(batch, beams, vocab)).view(batch, -1)
        top_scores, top_ids = candidates.topk(2 * beams, dim=-1)
        next_tokens, next_rows, next_scores = [], [], []
        for b in range(batch):
            chosen = []
            if not done[b]:
                for rank, (score, flat) in enumerate(zip(top_scores[b].tolist(), top_ids[b].tolist())):
                    beam, token = divmod(flat, vocab)
                    if score == float("-inf"):
                        break
                    if token in stops:
                        if rank < beams:
                            seq = sequences[b][beam]
                            finished[b].append((normalised(score, len(seq) + 1), list(seq)))
                        continue
                    chosen.append((score, beam, token))
                    if len(chosen) == beams:
                        break
                finished[b].sort(key=lambda x: -x[0])
                del finished[b][beams:]
                if len(finished[b]) == beams and chosen:
                    best_running = normalised(chosen[0][0], step + 1)
                    done[b] = best_running <= finished[b][-1][0]
                elif not chosen:
                    done[b] = True
            if done[b] or not chosen:
                chosen = [(float("-inf"), 0, pad)] * beams
            while len(chosen) < beams:
                chosen.append((float("-inf"), chosen[0][1], chosen[0][2]))
            new_seqs = []
            for score, beam, token in chosen:
                next_scores.append(score)
                next_rows.append(b * beams + beam)
                next_tokens.append(token)
                new_seqs.append(sequences[b][beam] + [token])
            sequences[b] = new_seqs
        if all(done):
            break
        scores = torch.tensor(next_scores, device=device).view(batch, beams)
        if step == config.max_new_tokens - 1:
            break
        state.select(torch.tensor(next_rows, device=device))
        logits = state.step(torch.tensor(next_tokens, device=device))
        if config.penalises:
            logits = apply_repetition_controls(logits, [seq for row in sequences for seq in row], config)
        logprobs = torch.log_softmax(logits, -1)
    results = []
    for b in range(batch):
        if not done[b]:  # ran out of length: running beams compete with finished ones
            for beam in range(beams):
                if scores[b, beam] > float("-inf"):
                    finished[b].append((normalised(scores[b, beam].item(), len(sequences[b][beam])),
                                        sequences[b][beam]))
        finished[b].sort(key=lambda x: -x[0])
        results.append(finished[b][0][1] if finished[b] else [])
    return results
