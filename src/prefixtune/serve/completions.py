"""`POST /v1/completions`: a request planned, its rows queued, their tokens turned into text.

All stop handling is decided here, from the request: `Stops` says where each completion ends
(a newline, by token ids inside decoding; `max_tokens`, by the decoding length; stop strings, on
the text) and what `finish_reason` that gives. Decoding (generation.py) only applies what it is told.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import StreamingResponse

from .batcher import Batcher, Job, Result
from .connection import unless_disconnected
from .errors import ServeError
from .prometheus import Metrics
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
    """A checked request: which prefix (None: the base model), which prompts, where they stop."""

    bank_id: str | None
    prompts: list[str]
    stops: Stops


def plan(req: CompletionRequest, settings: ServeSettings, resolve) -> CompletionPlan:
    """Refuse what greedy decoding cannot honour, check the limits; `resolve(model)` -> bank id or None."""
    if req.n not in (None, 1) or req.best_of not in (None, 1):
        raise ServeError(400, "unsupported", "n and best_of must be 1: decoding is greedy, one completion per "
                                             "prompt (use num_beams for beam search)", "n")
    if req.temperature not in (None, 0):
        raise ServeError(400, "unsupported", "only greedy decoding is supported: use temperature 0 or leave it out",
                         "temperature")
    if req.top_p not in (None, 1):
        raise ServeError(400, "unsupported", "top_p must be 1 (decoding is greedy)", "top_p")
    if req.logprobs is not None or req.suffix is not None:
        raise ServeError(400, "unsupported", "logprobs and suffix are not supported")
    if req.presence_penalty not in (None, 0) or req.frequency_penalty not in (None, 0):
        raise ServeError(400, "unsupported", "presence and frequency penalties are not supported")
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts or len(prompts) > settings.max_prompts_per_request:
        raise ServeError(400, "invalid_prompt", f"prompt must hold 1 to {settings.max_prompts_per_request} texts",
                         "prompt")
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
    return CompletionPlan(bank_id, prompts, stops)


def _chunk(cid, created, model, index, text, reason):
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class Completions:
    """The completions endpoint's work, over the server's batcher, store and limits."""

    def __init__(self, tokenizer, settings: ServeSettings, store: PrefixStore, batcher: Batcher, metrics: Metrics,
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
        settings, metrics = self.settings, self.metrics
        p = plan(req, settings, self.resolver(tenant))
        jobs = [Job(p.bank_id, text, p.stops.max_tokens, req.num_beams, p.stops.at_newline, req.raw, req.ignore_eos,
                    req.no_repeat_ngram_size, req.repetition_penalty, timeout_s=settings.request_timeout_s,
                    truncate_to=req.truncate_prompt_tokens)
                for text in p.prompts]
        finishers = [Finisher(self.tokenizer, p.stops) for _ in p.prompts]
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        t0 = time.monotonic()
        events: asyncio.Queue | None = None
        if req.stream:
            loop, events = asyncio.get_running_loop(), asyncio.Queue()

            def post(item):
                try:
                    loop.call_soon_threadsafe(events.put_nowait, item)
                except RuntimeError:  # the loop is gone (shutdown): nobody listens
                    pass

            for i, job in enumerate(jobs):
                job.on_token = lambda token, i=i: post((i, token))
                job.future.add_done_callback(lambda _, i=i: post((i, None)))
        try:
            self.batcher.submit(jobs)
        except ServeError as e:
            metrics.inc("prefixtune_rejected_total", reason=e.code)
            raise
        # Wait for the answer (a stream: its first event), unless the client leaves or time runs out; then its
        # rows are cancelled and leave the decoding batch at the next step.
        try:
            if req.stream:
                first = await unless_disconnected(events.get(), request.receive, settings.request_timeout_s)
                failed = jobs[first[0]].future
                if first[1] is None and not failed.cancelled() and failed.exception() is not None:
                    raise failed.exception()  # refused before decoding (a prompt too long, ...): a status code
            else:
                results: list[Result] = await unless_disconnected(
                    asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs)), request.receive,
                    settings.request_timeout_s)
        except asyncio.TimeoutError:
            for job in jobs:
                job.cancel()
            metrics.inc("prefixtune_rejected_total", reason="timeout")
            raise ServeError(503, "timeout", f"request timed out after {settings.request_timeout_s:g} s") from None
        except BaseException:  # failed, client gone (499), or cancelled
            for job in jobs:
                job.cancel()  # no-op when done; frees the rows of the others
            raise
        if not req.stream:
            metrics.observe("prefixtune_request_seconds", time.monotonic() - t0)
            return self._answer(req, p, results, finishers, cid, created)
        stream = self._stream(req, p, jobs, finishers, events, first, cid, created, t0)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @staticmethod
    def _answer(req, p: CompletionPlan, results: list[Result], finishers: list[Finisher], cid, created) -> dict:
        choices = []
        for i, (result, fin) in enumerate(zip(results, finishers)):
            fin.tokens = result.tokens
            text = fin.delta(final=True)
            choices.append({"index": i, "text": (p.prompts[i] if req.echo else "") + text, "logprobs": None,
                            "finish_reason": fin.finish_reason()})
        usage = {"prompt_tokens": sum(r.prompt_tokens for r in results),
                 "completion_tokens": sum(len(r.tokens) for r in results)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                "choices": choices, "usage": usage}

    async def _stream(self, req, p: CompletionPlan, jobs, finishers, events, first, cid, created, t0):
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        open_rows = set(range(len(jobs)))
        deadline = t0 + self.settings.request_timeout_s
        prompt_tokens = 0
        peeked = [first]
        try:
            if req.echo:
                for i, text in enumerate(p.prompts):
                    yield _sse(_chunk(cid, created, req.model, i, text, None))
            while open_rows:
                try:
                    i, token = peeked.pop() if peeked else await asyncio.wait_for(
                        events.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    yield _sse({"error": {"message": "request timed out", "type": "server_error", "code": "timeout"}})
                    return
                if i not in open_rows:
                    continue
                fin = finishers[i]
                if token is not None:
                    fin.tokens.append(token)
                    text = fin.delta()
                    if text:
                        yield _sse(_chunk(cid, created, req.model, i, text, None))
                    if fin.stopped:
                        open_rows.discard(i)
                        jobs[i].cancel()
                        yield _sse(_chunk(cid, created, req.model, i, "", "stop"))
                    continue
                future = jobs[i].future
                open_rows.discard(i)
                error = None if not future.done() or future.cancelled() else future.exception()
                if future.cancelled() or error is not None:
                    e = error if isinstance(error, ServeError) else ServeError(500, "server_error", "decoding failed")
                    yield _sse({"error": {"message": e.message, "type": "server_error", "code": e.code}})
                    continue
                result = future.result()
                prompt_tokens += result.prompt_tokens
                fin.tokens = result.tokens
                yield _sse(_chunk(cid, created, req.model, i, fin.delta(final=True), fin.finish_reason()))
            self.metrics.observe("prefixtune_request_seconds", time.monotonic() - t0)
            if include_usage:
                completion = sum(len(f.tokens) for f in finishers)
                yield _sse({"id": cid, "object": "text_completion", "created": created, "model": req.model,
                            "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                                     "total_tokens": prompt_tokens + completion}})
            yield "data: [DONE]\n\n"
        finally:
            for job in jobs:
                job.cancel()
