"""Decoding a list of prompts to completion through the engine: what `PrefixBank.generate`, the CLI
(`generate`, `eval`), evaluation, the experiments and every method's `generate` call. The server
steps an engine of its own.

Every decoding runs here: greedy, beam search (the paper's beam 5: `num_beams` rows per input,
engine/beam.py) and HF's repetition controls, for decoder-only models (batched) and encoder-decoders
(row by row: generic.RowWise), with a prefix per row or the ablations' virtual tokens
(`prefix_embeds`, `infix`: methods/embedding.py, infix.py), which decode on the HF forward.

`dtype` of a `DecodingConfig`: "model" decodes in the model's own dtype (the library's default, as
`generate` in transformers); "auto" in bf16 where the CPU computes it natively (the CLI's default);
"bf16"/"fp32" as named; beam search as greedy decoding.
"""
from __future__ import annotations

import threading

import torch

from ..generation import DecodingConfig, stop_ids
from . import llama_fast
from .engine import Engine, resolve_dtype
from .replicas import Replicas, make_engine
from .request import Request

MAX_ENGINE_BATCH = 32  # rows per decode step at which a row's bf16 bits equal the row alone (engine.md)
REPLICA_ROWS = 16  # rows a replica needs to pay: 2 x 16 rows beat one engine of 32 rows on 2 threads (engine.md)


def decode_dtype(config: DecodingConfig, model) -> torch.dtype:
    dtype = getattr(config, "dtype", "model")
    return model.dtype if dtype in (None, "model") else resolve_dtype(dtype, model.device)


class EngineCache:
    """One engine per (dtype, fast) for a model, rebuilt only when a call needs longer or more slots:
    building one copies and packs the weights (about a second for SmolLM2). With torch on several threads
    and enough rows, the engine is `Replicas` (replicas.py), one per thread, over one copy of the weights."""

    def __init__(self, model, tokenizer, fast: bool = True):
        self.model, self.tokenizer, self.fast = model, tokenizer, fast
        self._engine: Engine | None = None
        self._key = None
        self.lock = threading.Lock()  # one caller steps the engine at a time (two would take each other's events)

    def get(self, dtype: torch.dtype, max_batch: int, max_len: int, beams: int = 1) -> Engine | Replicas:
        replicas = self.replicas(dtype, max_batch, beams)
        e = self._engine
        if (e is None or self._key != (dtype, replicas) or e.max_batch < max_batch or e.max_len < max_len
                or e.has_work()):
            self.clear()
            max_len = -(-max_len // 64) * 64  # round up: a few more tokens next time need no rebuild
            self._engine = make_engine(self.model, self.tokenizer, replicas=replicas, max_batch=max_batch,
                                       max_len=max_len, dtype=dtype, fast=self.fast)
            self._key = (dtype, replicas)
        return self._engine

    def replicas(self, dtype: torch.dtype, rows: int, beams: int) -> int:
        """One replica per torch thread (replicas.py) where each still gets REPLICA_ROWS rows and a beam
        group, and a row's tokens do not depend on its batch (bf16 on the lean step); else one engine."""
        threads = torch.get_num_threads()
        if threads < 2 or dtype != torch.bfloat16 or not self.fast or not llama_fast.supports(self.model):
            return 1  # the HF path's bf16 rows may depend on their batch: one engine, whatever the threads
        return max(1, min(threads, rows // max(REPLICA_ROWS, beams)))

    def clear(self):
        if isinstance(self._engine, Replicas):
            self._engine.close()
        self._engine, self._key = None, None


def decode_ids(model, tokenizer, sequences: list[list[int]], prefixes: list, config: DecodingConfig | None = None,
               *, prefix_embeds: torch.Tensor | None = None, infix: bool = False, batch_size: int = MAX_ENGINE_BATCH,
               engines: EngineCache | None = None, fast: bool = True, progress=None) -> list[list[int]]:
    """Token ids for each sequence (its stop token not included), row i with prefix `prefixes[i]`
    (an `ExportedPrefix`, its groups `{"decoder": P}`, or None), decoded as `config` says (greedy or
    beam search, repetition controls). Rows run continuously batched: a row (or a beam group) that
    finishes frees its slots for the next one at once. `progress(1)` after each finished input.

    The ablations: `prefix_embeds` (k, hidden), input embeddings every row reads before its prompt;
    `infix=True`, the prefixes are infixes (engine.Request). Both decode on the HF forward."""
    config = config or DecodingConfig()
    if len(sequences) != len(prefixes):
        raise ValueError(f"{len(sequences)} inputs but {len(prefixes)} prefixes")
    if not sequences:
        return []
    stops = sorted(stop_ids(tokenizer, config.stop_at_newline, ignore_eos=True))
    virtual = 0 if prefix_embeds is None else prefix_embeds.shape[0]
    longest_prefix = max((_prefix_len(p) for p in prefixes), default=0) + virtual
    max_len = longest_prefix + max(len(s) for s in sequences) + config.max_new_tokens
    if engines is None:  # the lean Llama step decodes plain prefixes only
        engines = EngineCache(model, tokenizer, fast and prefix_embeds is None and not infix)
    with engines.lock:
        return _run(engines, model, tokenizer, sequences, prefixes, config, batch_size, max_len, stops, progress,
                    prefix_embeds, infix)


def _run(engines, model, tokenizer, sequences, prefixes, config, batch_size, max_len, stops, progress, prefix_embeds,
         infix):
    beams = config.num_beams  # a beam input takes one slot per beam
    rows = max(beams, min(batch_size * beams, MAX_ENGINE_BATCH, len(sequences) * beams))
    engine = engines.get(decode_dtype(config, model), rows, max_len, beams)
    requests = [Request(seq, prefix=prefix, max_tokens=config.max_new_tokens, stop_token_ids=stops,
                        ignore_eos=config.ignore_eos, beams=beams, length_penalty=config.length_penalty,
                        no_repeat_ngram_size=config.no_repeat_ngram_size,
                        repetition_penalty=config.repetition_penalty, prefix_embeds=prefix_embeds, infix=infix)
                for seq, prefix in zip(sequences, prefixes)]
    row_of = {r.request_id: i for i, r in enumerate(requests)}
    outputs: list[list[int]] = [[] for _ in requests]
    for r in requests:
        engine.add_request(r)
    open_rows = len(requests)
    try:
        while open_rows:
            for event in engine.step():
                i = row_of[event.request_id]
                if event.token is not None:
                    outputs[i].append(event.token)
                if event.finished:
                    open_rows -= 1
                    if progress is not None:
                        progress(1)
    except BaseException:
        engines.clear()  # rows of this call may still hold slots: the next call starts a fresh engine
        raise
    return outputs


def _prefix_len(prefix) -> int:
    if prefix is None:
        return 0
    groups = getattr(prefix, "p", prefix)
    return next(iter(groups.values())).shape[0]
