"""One request's rows in flight, for /v1/completions and /v1/chat/completions alike.

`Flight` submits a request's jobs (one per choice), waits for their answers (a stream: its first
event) unless the client leaves or time runs out, in which case its rows are cancelled and leave
the decoding batch at the next step; and turns a stream's token events into `Piece`s of text,
held back while they could still become a stop string (`Finisher`), each with the tokens (and
logprobs) it came from. The endpoints only format what it gives.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from .jobs import Job, Result
from .connection import unless_disconnected
from .errors import ServeError


@dataclass
class Piece:
    """What a stream yields for choice `index`: text, the end of the choice, or an error."""

    index: int
    text: str = ""
    tokens: list[tuple[int, float | None, list | None]] = field(default_factory=list)  # (token, logprob, top)
    finish_reason: str | None = None
    error: ServeError | None = None


class Flight:
    def __init__(self, jobs: list[Job], finishers: list, batcher, metrics, timeout_s: float, stream: bool,
                 n: int = 1):
        self.jobs, self.finishers, self.batcher, self.metrics = jobs, finishers, batcher, metrics
        self.timeout_s, self.stream, self.n = timeout_s, stream, n  # jobs: n choices per prompt, prompt-major
        self.t0 = time.monotonic()
        self.events: asyncio.Queue | None = None
        self.first = None

    async def start(self, request) -> list[Result] | None:
        """Submit the jobs and wait: the results (not streaming) or None (the stream has begun)."""
        jobs = self.jobs
        if self.stream:
            loop, events = asyncio.get_running_loop(), asyncio.Queue()
            self.events = events

            def post(item):
                try:
                    loop.call_soon_threadsafe(events.put_nowait, item)
                except RuntimeError:  # the loop is gone (shutdown): nobody listens
                    pass

            for i, job in enumerate(jobs):
                job.on_token = lambda token, logprob=None, top=None, i=i: post((i, (token, logprob, top)))
                job.future.add_done_callback(lambda _, i=i: post((i, None)))
        try:
            self.batcher.submit(jobs)
        except ServeError as e:
            self.metrics.inc("prefixtune_rejected_total", reason=e.code)
            raise
        try:
            if self.stream:
                self.first = await unless_disconnected(self.events.get(), request.receive, self.timeout_s)
                failed = jobs[self.first[0]].future
                if self.first[1] is None and not failed.cancelled() and failed.exception() is not None:
                    raise failed.exception()  # refused before decoding (a prompt too long, ...): a status code
                return None
            return await unless_disconnected(asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs)),
                                             request.receive, self.timeout_s)
        except asyncio.TimeoutError:
            self.cancel()
            self.metrics.inc("prefixtune_rejected_total", reason="timeout")
            raise ServeError(503, "timeout", f"request timed out after {self.timeout_s:g} s") from None
        except BaseException:  # failed, client gone (499), or cancelled
            self.cancel()  # no-op for rows done; frees the rows of the others
            raise

    def cancel(self):
        for job in self.jobs:
            job.cancel()

    def done(self):
        self.metrics.observe("prefixtune_request_seconds", time.monotonic() - self.t0)

    async def pieces(self):
        """The stream's pieces, in order, until every choice has ended (or the request timed out)."""
        open_rows = set(range(len(self.jobs)))
        deadline = self.t0 + self.timeout_s
        pending: list[list] = [[] for _ in self.jobs]  # tokens not yet sent with a piece of text
        peeked = [self.first]
        while open_rows:
            try:
                i, token = peeked.pop() if peeked else await asyncio.wait_for(
                    self.events.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                yield Piece(-1, error=ServeError(503, "timeout", "request timed out"))
                return
            if i not in open_rows:
                continue
            fin = self.finishers[i]
            if token is not None:
                fin.tokens.append(token[0])
                pending[i].append(token)
                text = fin.delta()
                if text:
                    yield Piece(i, text, pending[i])
                    pending[i] = []
                if fin.stopped:  # a stop string: this choice is over, whatever decoding does next
                    open_rows.discard(i)
                    self.jobs[i].cancel()
                    yield Piece(i, "", pending[i], finish_reason="stop")
                continue
            future = self.jobs[i].future
            open_rows.discard(i)
            error = None if not future.done() or future.cancelled() else future.exception()
            if future.cancelled() or error is not None:
                yield Piece(i, error=error if isinstance(error, ServeError) else
                            ServeError(500, "server_error", "decoding failed"))
                continue
            result = future.result()
            if not fin.tokens and result.tokens:  # not streamed token by token (beam search): all at once
                pending[i] = list(zip(result.tokens, result.logprobs or [None] * len(result.tokens),
                                      result.top_logprobs or [None] * len(result.tokens)))
            fin.tokens = result.tokens
            yield Piece(i, fin.delta(final=True), pending[i], finish_reason=fin.finish_reason())

    def usage(self) -> dict:
        prompt = sum(job.prompt_tokens for job in self.jobs[:: self.n])  # a prompt counts once, whatever n
        completion = sum(len(f.tokens) for f in self.finishers)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
