"""The engine: continuous batching of rows that each carry their own prefix.

    engine = Engine(model, tokenizer, max_batch=32, max_len=1024)
    rid = engine.add_request(Request(prompt_ids, prefix=bank.get("p1"), max_tokens=40))
    while engine.has_work():
        for event in engine.step():      # TokenEvent: request_id, index, token, text, finish_reason
            ...
    engine.cancel(rid)                   # the row leaves at the next step

or `engine.generate([Request(...), ...])`, which runs them to completion. `step` must be called
from one thread (a server's worker); `add_request`, `cancel` and `has_work` from any thread.

A step first ends cancelled and timed-out rows, then decodes one token for every running row in
one batched forward (each row at its own position, over its own KV blocks; a tenant's rows beyond
its step share, while other tenants run, wait their turn: scheduler.py), then preempts rows of
a tenant over its share of the slots if another tenant waits for one (scheduler.py), then prefills
at most `max_prefill_tokens` prompt tokens: chunks of long prompts begun earlier, then the rows
admitted this step. A row whose prompt is all in gets its first token from that prefill and joins
the batch at the next step. Finished rows leave at once and give their blocks back (kv.py).

A row's repetition controls change its logits before its token is chosen (sampling.py). A beam
request (`beams=k`) is a group of k rows that rank their candidates together and fork each other's
caches (beam.py, `backend.fork`); its output comes whole when the search ends.

The ablations' virtual tokens (`Request.prefix_embeds`, `Request.infix`) decode on the HF forward
(generic.py: `Virtual`); the lean Llama step declines them.
"""
from __future__ import annotations

import copy
import numbers
import threading
import time

import torch

from ..models import learned_positions, model_spec
from ..prefix import group_width, groups_of
from . import llama_fast, sampling
from .beam import BeamGroup
from .generic import HFDecoder, RowWise, Virtual
from .kv import PagedKV
from .request import Choice, Request, RequestOutput, TokenEvent
from .scheduler import Row, Scheduler
from .stops import StopState, eos_ids


def resolve_dtype(dtype, device) -> torch.dtype:
    """"auto": bf16 where the device computes it natively (CPUs with AVX512-BF16/AMX), else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        from ..precision import bf16_available

        return torch.bfloat16 if bf16_available(torch.device(device)) else torch.float32
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    if dtype not in names:
        raise ValueError(f"dtype must be auto, bf16 or fp32, got {dtype!r}")
    return names[dtype]


class Engine:
    """`max_batch` running rows of at most `max_len` entries (KV blocks of `block_size` entries, taken
    as rows need them: nothing is preallocated); `dtype` "auto" (bf16 where the CPU computes it
    natively, else fp32), "bf16" or "fp32"; `fast` uses the lean Llama step where it applies (else the
    HF forward); `exact` keeps an fp32 prefill to one matmul per prompt (in bf16 every row is bit-exact
    to the row alone either way: llama_fast's docstring); `max_prefill_tokens` caps the prompt tokens
    prefilled in one step (a longer prompt is prefilled in chunks, decode steps in between); while other
    tenants run, a tenant decodes at most max(`tenant_step_rows`, the busiest other tenant's rows, one
    request's rows) per step, its other rows taking turns (scheduler.py), so that one tenant's many rows
    (beams) do not slow another's steps. `shares`: an engine over the same model and settings whose
    weights this one reads instead of copying and packing its own (replicas.py)."""

    def __init__(self, model, tokenizer=None, *, max_batch: int = 32, max_len: int = 1024, dtype="auto",
                 fast: bool = True, exact: bool = True, max_prefill_tokens: int = 2048, block_size: int = 16,
                 tenant_step_rows: int = 4, shares: Engine | None = None):
        # max_prefill_tokens 0 admitted nothing, ever (generate never returned); others raised in a step
        sizes = (("max_batch", max_batch, 1), ("max_len", max_len, 1), ("max_prefill_tokens", max_prefill_tokens, 1),
                 ("block_size", block_size, 1), ("tenant_step_rows", tenant_step_rows, 0))
        for name, value, least in sizes:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        self.shares = shares  # an engine over the same model whose weights this one reads (replicas.py)
        self.spec = model_spec(model)
        self.tokenizer = tokenizer
        self.device = model.device
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_batch, self.max_len = max_batch, max_len
        self.eos = eos_ids(tokenizer)
        self.embeddings = model.get_input_embeddings().num_embeddings  # a prompt's ids index this table
        self.positions = learned_positions(model)  # a row past them would raise in the step (RoPE has no table)
        self.kv = None
        if self.spec.family == "encoder-decoder":
            self.backend, self.path = RowWise(self._in_dtype(model), self.spec, self.dtype), "rowwise"
        else:
            self.kv = PagedKV(self.spec.num_layers, max_batch, self.spec.num_kv_heads, self.spec.head_dim, max_len,
                              self.dtype, self.device, block_size)
            if shares is not None and shares.path == "llama_fast" and fast:
                self.backend, self.path = shares.backend.sharing(self.kv), "llama_fast"
            elif fast and llama_fast.supports(model):
                self.backend, self.path = llama_fast.LlamaFast(model, self.kv, self.dtype, exact), "llama_fast"
            else:
                self.backend, self.path = HFDecoder(self._in_dtype(model), self.kv, self.spec.num_layers), "hf"
        # paged backends rebuild a preempted row's cache by prefilling it again, and prefill in chunks;
        # RowWise keeps per-row states
        paged = self.kv is not None
        self.scheduler = Scheduler(max_batch, max_prefill_tokens, preemptive=paged, chunked=paged,
                                   tenant_step_rows=tenant_step_rows)
        # request id -> its choices not finished: an id names one live request (its events, cancel)
        self._live: dict[str, int] = {}
        self._live_lock = threading.Lock()
        self.stats = {"steps": 0, "decode_tokens": 0, "prefill_tokens": 0, "max_running": 0,
                      "max_step_prefill_tokens": 0}

    def _in_dtype(self, model):
        if self.shares is not None and self.shares.dtype == self.dtype and hasattr(self.shares.backend, "model"):
            return self.shares.backend.model  # the replica's model in this dtype, converted once
        return model if model.dtype == self.dtype else copy.deepcopy(model).to(self.dtype)

    # -- requests (any thread) -----------------------------------------------------------------
    def _prefix(self, request: Request):
        """A request's prefix as the backend wants it, and the cache entries it takes before the prompt."""
        prefix, embeds = request.prefix, request.prefix_embeds
        p, length = None, 0
        if prefix is not None:
            groups = getattr(prefix, "p", prefix)
            if not isinstance(groups, dict):
                raise ValueError(f"a prefix is an ExportedPrefix or its P per group ({{'decoder': P}}), got "
                                 f"{type(groups).__name__}")
            expected = {g: group_width(self.spec, n) for g, n in groups_of(self.spec).items()
                        if not request.infix or g == "decoder"}  # an infix is a decoder self-attention prefix
            kind = "infix" if request.infix else "prefix"
            shapes = {g: tuple(t.shape) for g, t in groups.items()}  # else the step raises, ending every row
            if any(len(shape) != 2 for shape in shapes.values()) or len({s[0] for s in shapes.values()}) > 1:
                raise ValueError(f"a {kind} is (length, width) per group, one length for all: got shapes {shapes}")
            got = {g: t.shape[-1] for g, t in groups.items()}
            if got != expected:
                raise ValueError(f"{kind} widths {got} do not fit this model ({expected})")
            length = next(iter(groups.values())).shape[0]
            # paged: the KV writes the decoder group into blocks once, shared by every row using it
            p = groups["decoder"] if self.kv is not None else {g: t.to(self.device) for g, t in groups.items()}
        if embeds is None and not request.infix:
            return p, length
        if self.path == "llama_fast":
            raise ValueError("the lean Llama step decodes plain prefixes only: decode virtual tokens (prefix_embeds, "
                             "infix) on an engine built with fast=False")
        if embeds is not None and embeds.shape[1] != self.spec.hidden_size:
            raise ValueError(f"prefix_embeds are {embeds.shape[1]} wide, this model's embeddings {self.spec.hidden_size}")
        if embeds is not None and self.kv is not None:
            length += embeds.shape[0]  # prefilled with the prompt: positions 0..k-1, the prompt from k
        # a decoder-only model's infix is seen from the prompt's last token on
        sees_from = length + len(request.prompt) - 1 if request.infix and self.kv is not None else None
        return Virtual(p, embeds, sees_from), length

    def add_request(self, request: Request) -> str:
        prefix, length = self._prefix(request)
        total = length + len(request.prompt) + request.max_tokens
        for limit, what in ((self.max_len, f"the engine's max_len {self.max_len}"),
                            (self.positions, f"the model's {self.positions} positions")):
            if self.kv is not None and limit is not None and total > limit:
                raise ValueError(f"prefix ({length}) + prompt ({len(request.prompt)}) + max_tokens "
                                 f"({request.max_tokens}) exceeds {what}")
        # an encoder-decoder's encoder reads the prompt (after any virtual tokens), its decoder takes max_tokens
        encoded = len(request.prompt) + (0 if request.prefix_embeds is None else len(request.prefix_embeds))
        if self.kv is None and self.positions and max(encoded, request.max_tokens) > self.positions:
            raise ValueError(f"prompt ({encoded}) or max_tokens ({request.max_tokens}) exceeds the model's "
                             f"{self.positions} positions")
        # checked here, not in the step: a step that raises ends every row of the batch, not just this one
        outside = [t for t in request.prompt if not 0 <= t < self.embeddings]  # -1 would read the last row
        if outside:
            raise ValueError(f"prompt token ids must lie in [0, {self.embeddings}), got {outside[:5]}")
        if request.top_logprobs > self.spec.vocab_size:
            raise ValueError(f"top_logprobs ({request.top_logprobs}) exceeds the vocabulary ({self.spec.vocab_size})")
        if request.beams > self.max_batch:
            raise ValueError(f"beams ({request.beams}) exceeds the engine's max_batch {self.max_batch}")
        deadline = None if request.timeout_s is None else time.monotonic() + request.timeout_s
        rows = []
        for i in range(request.n):
            generator = None
            if not request.greedy:
                generator = sampling.make_generator(None if request.seed is None else (request.seed + i) % 2**64)
            stop = StopState(request, self.tokenizer, self.eos)
            group = BeamGroup(request, stop.stop_ids) if request.beams > 1 else None
            rows.append(Row(request, i, stop, prefix, length, generator, deadline, beam=group))
        with self._live_lock:
            if request.request_id in self._live:  # two would share events and cancels: vLLM refuses it too
                raise ValueError(f"request_id {request.request_id!r} is in use by a request not finished")
            self._live[request.request_id] = request.n
        self.scheduler.submit(rows)
        return request.request_id

    def cancel(self, request_id: str):
        """The request's rows leave at the next step (waiting or running), each with a 'cancelled' event."""
        self.scheduler.cancel(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- stepping (one thread) -----------------------------------------------------------------
    def _leave(self, row: Row):
        self.backend.release(row.slot)  # its blocks go back (shared ones when their last row leaves)
        moved = self.scheduler.remove(row)
        if moved is not None:
            last, src, dst = moved
            self.backend.move(src, dst, last.length)

    def _emit(self, rows: list[Row], logits: torch.Tensor, events: list[TokenEvent]):
        histories = [r.stop.tokens if r.beam is None else r.beam.history(r) for r in rows]
        controlled = sampling.repetition_controls(logits, rows, histories)
        plain = [i for i, r in enumerate(rows) if r.beam is None]
        if len(plain) < len(rows):
            self._advance_beams(rows, controlled, events)
            rows, logits, controlled = [rows[i] for i in plain], logits[plain], controlled[plain]
        for row, (token, logprob, top) in zip(rows, sampling.choose(controlled, rows, logits)):
            is_output, text, reason = row.stop.add(token)
            events.append(TokenEvent(row.request_id, row.index, token if is_output else None, text,
                                     logprob if is_output else None, top if is_output else None, reason))
            if reason is not None:
                self._leave(row)
            else:
                row.last_token = token

    def _advance_beams(self, rows: list[Row], logits: torch.Tensor, events: list[TokenEvent]):
        """One ranking step for each beam group among `rows`; then its rows are re-seated (forks) or,
        when the search ends, leave with the best hypothesis as the output."""
        where = {id(r): i for i, r in enumerate(rows)}
        for group in {id(r.beam): r.beam for r in rows if r.beam is not None}.values():
            if not group.rows:  # the first step, from the leader's prefill: k rows holding the leader's cache
                leader = next(r for r in rows if r.beam is group)
                group.rows = [leader] + [self._fork_row(leader) for _ in range(group.k - 1)]
            first = where[id(group.rows[0])]  # a dead beam's row has no logits of its own: any row's will do
            picked = [where.get(id(r), first) for r in group.rows]
            chosen = group.rank(torch.log_softmax(logits[picked], -1))
            if group.done:
                self._beam_output(group, events)
                for row in group.rows:
                    self._leave(row)
                continue
            for row, src in group.reseat(chosen):
                self.backend.fork(src.slot, row.slot, src.length)
                row.length = src.length
            for row, (_, _, token) in zip(group.rows, chosen):
                row.last_token = token

    def _fork_row(self, leader: Row) -> Row:
        # token 0 until a beam takes the row: a dead beam's row decodes something valid, and nothing reads it
        row = Row(leader.request, leader.index, leader.stop, leader.prefix, leader.prefix_len, None, leader.deadline,
                  beam=leader.beam, length=leader.length, last_token=0)
        self.scheduler.place(row)  # admission reserved the group's slots
        self.backend.fork(leader.slot, row.slot, leader.length)
        return row

    @staticmethod
    def _beam_output(group: BeamGroup, events: list[TokenEvent]):
        tokens, stopped = group.best()
        stop, rid, reason = group.rows[0].stop, group.request.request_id, None
        for token in tokens:
            _, text, reason = stop.add(token)
            events.append(TokenEvent(rid, 0, token, text, finish_reason=reason))
            if reason is not None:
                return
        events.append(TokenEvent(rid, 0, None, stop.finish(), finish_reason="stop" if stopped else "length"))

    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        for row, reason in self.scheduler.leaving(time.monotonic()):
            if row.beam is None or not row.beam.rows or row is row.beam.rows[0]:  # a beam group ends once
                events.append(TokenEvent(row.request_id, row.index, None, row.stop.finish(), finish_reason=reason))
            if row.slot >= 0:
                self._leave(row)
        decoding = self.scheduler.decode_rows()  # all running rows but a busy tenant's beyond its step share
        if decoding:
            tokens = torch.tensor([r.last_token for r in decoding], device=self.device)
            positions = torch.tensor([r.length for r in decoding], device=self.device)
            logits = self.backend.decode(tokens, positions, [r.slot for r in decoding])
            for r in decoding:
                r.length += 1
            self.stats["decode_tokens"] += len(decoding)
            self._emit(decoding, logits, events)
        preempted = self.scheduler.preempt()  # a tenant under its share waits and no slot is free
        for row in preempted:
            self._leave(row)
        self.scheduler.requeue(preempted)
        work = self.scheduler.prefill_work()  # whole prompts, or chunks of long ones, within the budget
        if work:
            logits = self.backend.prefill([(r.slot, r.prefix if first else None, ids) for r, ids, first in work],
                                          [r.prefix_len + len(r.prefill_ids()) for r, _, _ in work])
            fresh = []
            for i, (r, ids, _) in enumerate(work):
                self.stats["prefill_tokens"] += len(ids)
                if r.prefilled < len(r.prefill_ids()):
                    continue  # more chunks at the next steps
                src = r.slot
                self.backend.move(src, self.scheduler.place(r), r.prefilled)
                r.length = r.prefix_len + r.prefilled
                if r.preempted:  # its next token is sampled already (last_token): the cache is whole again
                    r.preempted = False
                else:
                    fresh.append(i)
            if fresh:
                self._emit([work[i][0] for i in fresh], logits[fresh], events)
            self.stats["max_step_prefill_tokens"] = max(self.stats["max_step_prefill_tokens"],
                                                        sum(len(ids) for _, ids, _ in work))
        self.stats["steps"] += 1
        self.stats["max_running"] = max(self.stats["max_running"], len(self.scheduler.running))
        with self._live_lock:
            for event in events:
                if event.finished and event.request_id in self._live:  # each choice ends once (a beam group: once)
                    self._live[event.request_id] -= 1
                    if not self._live[event.request_id]:
                        del self._live[event.request_id]
        return events

    def generate(self, requests: list[Request]) -> list[RequestOutput]:
        """Run `requests` to completion (with whatever else is queued); outputs in request order.

        Not for an engine that a server is stepping: this call steps it itself.
        """
        ids = [r.request_id for r in requests]
        if len(set(ids)) < len(ids):  # refused before any is queued
            raise ValueError(f"request ids must be unique, got {ids}")
        outputs = {}
        for r in requests:
            self.add_request(r)
            outputs[r.request_id] = RequestOutput(r.request_id, len(r.prompt), [Choice(i) for i in range(r.n)])
        open_choices = sum(r.n for r in requests)
        while open_choices and self.has_work():
            for event in self.step():
                out = outputs.get(event.request_id)
                if out is not None:
                    out.add(event)
                    open_choices -= event.finished
        return [outputs[r.request_id] for r in requests]
