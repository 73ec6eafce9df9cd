"""`POST /v1/completions`: a request planned, its rows queued (`rows.Flight`), their tokens turned into text.

All stop handling is decided here, from the request: `Stops` says where each completion ends
(a newline, by token ids inside decoding; `max_tokens`, by the decoding length; stop strings, on
the text) and what `finish_reason` that gives. Decoding (generation.py) only applies what it is told.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine.request import MIN_TEMPERATURE, SEED_RANGE
from .jobs import Job, Result
from .errors import ServeError
from .logprobs import completion_logprobs
from .prometheus import Metrics
from .rows import Flight
from .schemas import CompletionRequest
from .settings import ServeSettings
from .store import PrefixStore


@dataclass
class Stops:
    """Where a completion ends: at a newline token (prefixtune's default), after `max_tokens` tokens, or at
    the first of `strings` in its text; the end of text always stops it."""

    max_tokens: int
    at_newline: bool = True
    strings: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, stop: str | list[str] | None, max_tokens: int) -> "Stops":
        """From the request's `stop`: absent or holding "\\n" stops at newlines; other strings cut the text."""
        stops = None if stop is None else [stop] if isinstance(stop, str) else list(stop)
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ServeError(400, "invalid_stop", "stop must be up to 4 non-empty strings", "stop")
        return cls(max_tokens, stops is None or "\n" in stops, [s for s in stops or [] if s != "\n"])

    def cut(self, text: str) -> tuple[str, bool]:
        """The text up to the first stop string, and whether one was found."""
        cuts = [text.find(s) for s in self.strings if s in text]
        return (text[: min(cuts)], True) if cuts else (text, False)

    def finish_reason(self, tokens: int, stopped: bool) -> str:
        return "stop" if stopped or tokens < self.max_tokens else "length"


class Finisher:
    """Token ids -> text for one prompt, as it grows (streaming) and at the end; applies the stop strings.

    While streaming, text that could still turn into a stop string, or that ends inside a multi-byte
    character, is held back; so the streamed pieces always add up to the non-streamed text.
    """

    def __init__(self, tokenizer, stops: Stops):
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops.strings), default=1) - 1
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False

    def text(self, final: bool) -> tuple[str, bool]:
        text, stopped = self.stops.cut(self.tokenizer.decode(self.tokens, skip_special_tokens=True))
        if stopped:
            return text, True
        if not final:
            text = text.rstrip("\ufffd")
            text = text[: max(0, len(text) - self.hold)]  # not text[:-hold]: a short text sends nothing yet
        return text, False

    def delta(self, final: bool = False) -> str:
        text, self.stopped = self.text(final)
        if not text.startswith(self.sent):  # a tokenizer that rewrites earlier text: send nothing more
            return ""
        out, self.sent = text[len(self.sent):], text
        return out

    def finish_reason(self) -> str:
        return self.stops.finish_reason(len(self.tokens), self.stopped)


@dataclass
class CompletionPlan:
    """A checked request: which prefix (None: the base model), which prompts, where they stop, and how
    each of its `n` choices decodes (`Job` fields)."""

    bank_id: str | None
    prompts: list[str]
    stops: Stops
    n: int = 1
    controls: dict = field(default_factory=dict)


def decoding_controls(req, logprobs: int | None) -> tuple[int, dict]:
    """(n, the `Job` fields of sampling) from a completions or chat request; refuses what decoding
    cannot honour."""
    if req.presence_penalty not in (None, 0) or req.frequency_penalty not in (None, 0):
        raise ServeError(400, "unsupported", "presence and frequency penalties are not supported")
    n = req.n or 1
    if getattr(req, "best_of", None) not in (None, n):
        raise ServeError(400, "unsupported", "best_of must equal n (no ranking of extra choices)", "best_of")
    temperature = req.temperature or 0.0
    controls = {"temperature": 0.0 if temperature < MIN_TEMPERATURE else temperature,  # the floor: greedy
                "top_p": 1.0 if req.top_p is None else req.top_p,
                "top_k": max(req.top_k or 0, 0), "seed": req.seed, "logprobs": logprobs}
    if getattr(req, "num_beams", 1) > 1 and (controls["temperature"] > 0 or n > 1 or logprobs is not None):
        raise ServeError(400, "unsupported", "num_beams (beam search) decodes greedily, one completion: it combines "
                                             "with neither temperature, n > 1 nor logprobs")
    return n, controls


def wants_usage(req) -> bool:
    """Whether a streamed completions or chat request asks for the usage chunk; refuses stream_options that
    would be ignored: without `stream: true` (as OpenAI and vLLM refuse them), or asking for what is not done."""
    options = req.stream_options
    if options is None:
        return False
    if not req.stream:
        raise ServeError(400, "invalid_request", "stream_options is only allowed with stream: true", "stream_options")
    if options.continuous_usage_stats:
        raise ServeError(400, "unsupported", "stream_options.continuous_usage_stats (usage in every chunk) is not "
                                             "supported: include_usage gives it once, at the end", "stream_options")
    return bool(options.include_usage)


def _choice_seed(seed: int, j: int) -> int:
    """Choice j's seed, back in the int64 range (engine.Request takes it; the engine seeds mod 2**64)."""
    return (seed + j - SEED_RANGE[0]) % 2**64 + SEED_RANGE[0]


def choice_jobs(bank_id, prompts: list, n: int, controls: dict, **fields) -> list[Job]:
    """One job per choice, prompt-major (choice k is prompt k // n); choice j of a seeded request samples
    with seed + j, so each choice is reproducible on its own."""
    jobs = []
    for prompt in prompts:
        for j in range(n):
            seed = controls.get("seed")
            job_controls = {**controls, "seed": None if seed is None else _choice_seed(seed, j)}
            text, ids = (prompt, None) if isinstance(prompt, str) else ("", prompt)
            jobs.append(Job(bank_id, text, prompt_ids=ids, **job_controls, **fields))
    return jobs


def plan(req: CompletionRequest, settings: ServeSettings, resolve) -> CompletionPlan:
    """Refuse what decoding cannot honour, check the limits; `resolve(model)` -> bank id or None."""
    n, controls = decoding_controls(req, req.logprobs)
    wants_usage(req)
    if req.suffix is not None:
        raise ServeError(400, "unsupported", "suffix is not supported", "suffix")
    if req.logit_bias is not None:  # as chat: refused, never ignored
        raise ServeError(400, "unsupported", "logit_bias is not supported", "logit_bias")
    if req.echo and req.logprobs is not None:
        raise ServeError(400, "unsupported", "echo with logprobs (the prompt's logprobs) is not supported", "echo")
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts or len(prompts) * n > settings.max_prompts_per_request:
        raise ServeError(400, "invalid_prompt", f"prompt must hold 1 to {settings.max_prompts_per_request} texts "
                                                f"(times n)", "prompt")
    if any(len(p) > settings.max_prompt_chars for p in prompts):
        raise ServeError(400, "invalid_prompt", f"a prompt is longer than {settings.max_prompt_chars} characters",
                         "prompt")
    max_tokens = req.max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_tokens_limit:
        raise ServeError(400, "invalid_max_tokens", f"max_tokens must be <= {settings.max_tokens_limit}",
                         "max_tokens")
    stops = Stops.of(req.stop, max_tokens)
    if (req.truncate_prompt_tokens or 0) > settings.max_prompt_tokens:
        raise ServeError(400, "invalid_truncate_prompt_tokens", f"truncate_prompt_tokens must be <= "
                         f"{settings.max_prompt_tokens} (the prompt limit)", "truncate_prompt_tokens")
    bank_id = resolve(req.model)
    return CompletionPlan(bank_id, prompts, stops, n, controls)


def _chunk(cid, created, model, index, text, reason, logprobs=None):
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}]}


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def sse_error(e: ServeError) -> str:
    return sse({"error": {"message": e.message, "type": "server_error", "code": e.code}})


async def sse_stream(flight, head: list[str], chunk_of, usage_chunk):
    """A flight as server-sent events: `head`, then `chunk_of(piece)` for every piece (an error piece as an
    error event; a timed-out request ends without [DONE]), then `usage_chunk(usage)` unless it is None,
    then [DONE]. The flight is cancelled whenever the stream ends (a client that goes away included)."""
    try:
        for line in head:
            yield line
        async for piece in flight.pieces():
            if piece.error is not None:
                yield sse_error(piece.error)
                if piece.index < 0:  # the request timed out: no [DONE]
                    return
                continue
            yield chunk_of(piece)
        flight.done()
        if usage_chunk is not None:
            yield usage_chunk(flight.usage())
        yield "data: [DONE]\n\n"
    finally:
        flight.cancel()


class Completions:
    """The completions endpoint's work, over the server's scheduler, store and limits."""

    def __init__(self, tokenizer, settings: ServeSettings, store: PrefixStore, batcher, metrics: Metrics,
                 base_name: str):
        self.tokenizer, self.settings, self.store = tokenizer, settings, store
        self.batcher, self.metrics, self.base_name = batcher, metrics, base_name

    def resolver(self, tenant: str):
        def resolve(model: str) -> str | None:
            if model == self.base_name:
                return None
            bank_id = self.store.resolve(tenant, model)
            if bank_id is None:
                raise ServeError(404, "model_not_found", f"the model {model!r} does not exist", "model")
            return bank_id
        return resolve

    async def __call__(self, req: CompletionRequest, request: Request, tenant: str):
        settings = self.settings
        p = plan(req, settings, self.resolver(tenant))
        jobs = choice_jobs(p.bank_id, p.prompts, p.n, p.controls, max_new_tokens=p.stops.max_tokens,
                           num_beams=req.num_beams, stop_at_newline=p.stops.at_newline, raw=req.raw,
                           ignore_eos=req.ignore_eos, no_repeat_ngram_size=req.no_repeat_ngram_size,
                           repetition_penalty=req.repetition_penalty, timeout_s=settings.request_timeout_s,
                           truncate_to=req.truncate_prompt_tokens, stop_strings=tuple(p.stops.strings),
                           tenant=tenant)
        finishers = [Finisher(self.tokenizer, p.stops) for _ in jobs]
        flight = Flight(jobs, finishers, self.batcher, self.metrics, settings.request_timeout_s, req.stream, p.n)
        results = await flight.start(request)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            flight.done()
            return self._answer(req, p, results, flight, cid, created)
        return StreamingResponse(self._stream(req, p, flight, cid, created), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _echo(self, req, p: CompletionPlan, k: int) -> str:
        return p.prompts[k // p.n] if req.echo else ""

    def _answer(self, req, p: CompletionPlan, results: list[Result], flight: Flight, cid, created) -> dict:
        choices = []
        for k, (result, fin) in enumerate(zip(results, flight.finishers)):
            fin.tokens = result.tokens
            text, echo = fin.delta(final=True), self._echo(req, p, k)
            logprobs = None
            if req.logprobs is not None:
                items = zip(result.tokens, result.logprobs or [], result.top_logprobs or [])
                logprobs, _ = completion_logprobs(self.tokenizer, items, len(echo))
            choices.append({"index": k, "text": echo + text, "logprobs": logprobs,
                            "finish_reason": fin.finish_reason()})
        return {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                "choices": choices, "usage": flight.usage()}

    def _stream(self, req, p: CompletionPlan, flight: Flight, cid, created):
        offsets = [len(self._echo(req, p, k)) for k in range(len(flight.jobs))]
        head = [sse(_chunk(cid, created, req.model, k, self._echo(req, p, k), None))
                for k in range(len(flight.jobs))] if req.echo else []

        def chunk_of(piece):
            logprobs = None
            if req.logprobs is not None:
                logprobs, offsets[piece.index] = completion_logprobs(self.tokenizer, piece.tokens, offsets[piece.index])
            return sse(_chunk(cid, created, req.model, piece.index, piece.text, piece.finish_reason, logprobs))

        def usage_chunk(usage):
            return sse({"id": cid, "object": "text_completion", "created": created, "model": req.model,
                        "choices": [], "usage": usage})

        return sse_stream(flight, head, chunk_of,
                          usage_chunk if wants_usage(req) else None)
