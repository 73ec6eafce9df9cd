"""Dynamic batching: one worker thread decodes whatever arrived together, whatever the prefixes.

Request handlers `submit` jobs (one per prompt) and await their futures. The worker takes the
first waiting job, waits until `batch_window_ms` after that job arrived (or until `max_batch_size`
rows wait), and decodes them in one `PrefixBank.generate_ids` call: every row with its own
prefix. The queue is bounded: a submit beyond `max_queue` rows raises `QueueFull` at once (429).

The model is not thread-safe, so only this thread touches it. Nothing a single request does can
stop the worker: errors are caught per batch, and a failing batch is retried row by row so that
only the row at fault fails. A row whose request gave up (client gone, timed out) leaves its batch
at the next decoding step. The worker beats a heartbeat at every step and every idle wait, so
/health can tell a stuck worker from a busy one.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable

from ..bank import PrefixBank, PrefixUnavailable
from ..generation import DecodingConfig
from .errors import QueueFull, ServeError, ShuttingDown
from .prometheus import Metrics
from .settings import ServeSettings

log = logging.getLogger("prefixtune.serve")


@dataclass
class Result:
    tokens: list[int]
    prompt_tokens: int
    logprobs: list[float] | None = None                          # the engine, when the job asks for them
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass(eq=False)
class Job:
    bank_id: str | None                 # None: the base model alone
    text: str
    max_new_tokens: int
    num_beams: int = 1
    stop_at_newline: bool = True
    raw: bool = False
    ignore_eos: bool = False
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    on_token: Callable[[int], None] | None = None   # called from the worker thread, one token at a time
    timeout_s: float = float("inf")
    truncate_to: int | None = None      # cut the prompt to this many tokens (else: too long is a 400)
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    outcome: str | None = None          # how it was counted in prefixtune_completions_total (once)
    # Sampling and logprobs: only the engine scheduler decodes them (the handler refuses them otherwise).
    temperature: float = 0.0            # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: int | None = None         # None: off; k: each token's logprob and the k most likely
    stop_strings: tuple[str, ...] = ()  # the engine ends a row at one (the handler cuts the text in any case)
    prompt_ids: list[int] | None = None  # a prompt already tokenized (chat): fed as it is, no template
    prompt_tokens: int = 0              # set once the prompt is encoded (usage)
    tenant: str | None = None           # whose: the engine scheduler shares slots and prefill among tenants

    @property
    def needs_decode_path(self) -> bool:
        """Beam search and the repetition controls are generation.decode's, not the engine's."""
        return self.num_beams > 1 or self.no_repeat_ngram_size > 0 or self.repetition_penalty != 1.0

    @property
    def deadline(self) -> float:
        return self.enqueued + self.timeout_s

    def cancel(self):
        self.future.cancel()


def _resolve(job: Job, result=None, error: Exception | None = None) -> bool:
    try:
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)
        return True
    except InvalidStateError:  # cancelled by its request (timeout, disconnect) or resolved already
        return False


class WorkerHealth:
    """A decoding worker thread's signs of life, which /health reads: both schedulers have them.

    A heartbeat only says that the worker thread moves; a worker that beats at every step of one long
    beam search still starves every other row. So the stall is measured as a waiting row lives it
    (`stall_s`): the age of the oldest row that has had no token yet, or the time since the running
    rows last advanced, whichever is longer."""

    clock = staticmethod(time.monotonic)  # a test sets a fake one

    def _init_health(self):
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._beat = self.clock()       # the worker's last sign of life: a decoding step or an idle wait
        self._busy = False              # holding work (from taking it to its last row's answer)
        self._longest_stall = 0.0

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def heartbeat_age(self) -> float:
        return self.clock() - self._beat

    def stall_s(self) -> float:
        """How long the most starved row has waited: for its first token, or for its next one."""
        return 0.0

    @property
    def longest_stall_s(self) -> float:
        """The longest stall seen so far, the present one included."""
        self._longest_stall = max(self._longest_stall, self.stall_s())
        return self._longest_stall

    def stalled(self, limit_s: float) -> str | None:
        """Why the worker counts as stalled (for /health), or None."""
        age, stall = self.heartbeat_age(), self.stall_s()
        if self.pending() and age > limit_s:
            return f"the decoding worker has not finished a step for {age:.1f} s (limit {limit_s:g} s) while work " \
                   "is pending"
        if stall > limit_s:
            return f"a row has waited {stall:.1f} s for a token (limit {limit_s:g} s)"
        return None

    def _heartbeat(self):
        now = self.clock()
        if self._busy:
            self._longest_stall = max(self._longest_stall, now - self._beat)
        self._beat = now


class Batcher(WorkerHealth):
    def __init__(self, bank: PrefixBank, settings: ServeSettings, metrics: Metrics | None = None):
        self.bank, self.settings = bank, settings
        self.metrics = metrics or Metrics()
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._init_health()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self):
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="prefixtune-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0):
        with self._cond:
            self._stopping = True
            pending = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
        for job in pending:
            _resolve(job, error=ShuttingDown())
        if self._thread is not None:
            self._thread.join(timeout)

    def depth(self) -> int:
        return len(self._jobs)

    def stall_s(self) -> float:
        """The oldest queued row's wait, or the time since the worker's last step while it holds work."""
        now = self.clock()
        with self._cond:
            oldest = self._jobs[0].enqueued if self._jobs else now
        return max(now - oldest, now - self._beat if self._busy else 0.0)

    def pending(self) -> bool:
        """Work waits or is being decoded: a stale heartbeat then means a stuck worker."""
        return self._busy or bool(self._jobs)

    def _count(self, job: Job, outcome: str):
        if job.outcome is None:
            job.outcome = outcome
            self.metrics.inc("prefixtune_completions_total", outcome=outcome)

    # -- submitting --------------------------------------------------------------------------
    def submit(self, jobs: list[Job]):
        """Queue all of `jobs` or none of them."""
        with self._cond:
            if not self.alive():
                raise ShuttingDown()
            if len(self._jobs) + len(jobs) > self.settings.max_queue:
                raise QueueFull(len(self._jobs))
            now = self.clock()
            for job in jobs:
                job.enqueued = now
                self._jobs.append(job)
            self._cond.notify_all()

    # -- the worker --------------------------------------------------------------------------
    def _collect(self) -> list[Job]:
        window = self.settings.batch_window_ms / 1000
        limit = self.settings.max_batch_size
        with self._cond:
            while not self._jobs and not self._stopping:
                self._heartbeat()
                self._cond.wait(0.5)
            self._heartbeat()
            if self._stopping:
                return []
            window_end = self._jobs[0].enqueued + window
            while len(self._jobs) < limit and not self._stopping:
                remaining = window_end - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._busy = True
            return [self._jobs.popleft() for _ in range(min(limit, len(self._jobs)))]

    def _run(self):
        log.info("decoding worker started")
        while not self._stopping:
            batch: list[Job] = []
            try:
                batch = self._collect()
                if batch:
                    self._process(batch)
            except Exception as e:  # never let the worker die; fail what it held instead
                log.exception("decoding worker error")
                for job in batch:
                    _resolve(job, error=ServeError(
                        500, "server_error", f"internal error while decoding ({type(e).__name__})"))
            finally:
                self._heartbeat()
                self._busy = False
        log.info("decoding worker stopped")

    def _prepare(self, job: Job) -> list[int] | None:
        self._heartbeat()
        if job.future.done():  # the request gave up (timeout, disconnect): skip it
            self._count(job, "cancelled")
            return None
        if self.clock() > job.deadline:
            _resolve(job, error=ServeError(503, "timeout", "request timed out in the queue"))
            self._count(job, "timeout")
            return None
        if job.bank_id is not None and job.bank_id not in self.bank:
            _resolve(job, error=ServeError(404, "model_not_found", "the prefix was deleted before decoding"))
            return None
        limit = self.settings.max_prompt_tokens
        try:  # encoded whole unless truncation was asked for, so that too long is refused, not cut
            if job.prompt_ids is not None:
                seq = list(job.prompt_ids)[-(job.truncate_to or len(job.prompt_ids)):]
            else:
                seq = self.bank.encode(job.text, job.bank_id, job.raw, max_len=job.truncate_to or sys.maxsize)
        except PrefixUnavailable as e:  # a stored file that no longer loads: the server's fault, not the prompt's
            _resolve(job, error=ServeError(500, "prefix_unavailable", str(e)))
            self._count(job, "error")
            return None
        except Exception as e:
            _resolve(job, error=ServeError(400, "invalid_prompt", f"could not encode the prompt ({type(e).__name__})"))
            return None
        job.prompt_tokens = len(seq)
        if not seq:
            _resolve(job, error=ServeError(400, "invalid_prompt", "the prompt encodes to no tokens"))
            return None
        if len(seq) > limit:
            _resolve(job, error=ServeError(400, "prompt_too_long", f"the prompt is {len(seq)} tokens (with its template); "
                                f"the limit is {limit}. Shorten it, or send truncate_prompt_tokens to cut it"))
            return None
        return seq

    def _process(self, batch: list[Job]):
        groups: dict[tuple, list[tuple[Job, list[int]]]] = {}
        for job in batch:
            seq = self._prepare(job)
            if seq is not None:
                # Greedy rows of any length decode together (a row's tokens do not depend on the batch's
                # length limit); beam search results do, so beam rows group by their limit.
                key = (job.num_beams, job.stop_at_newline, job.ignore_eos, job.no_repeat_ngram_size,
                       job.repetition_penalty, job.max_new_tokens if job.num_beams > 1 else 0)
                groups.setdefault(key, []).append((job, seq))
        for items in groups.values():
            for chunk in self._chunks(items):
                self._decode(chunk)

    def _chunks(self, items: list[tuple[Job, list[int]]]):
        """Runs of at most `max_batch_size` rows and `max_batch_tokens` prompt tokens (a longer row goes
        alone): the prefill, one step that nothing interrupts, stays short (32 prompts of 500 tokens
        in one step held a CPU worker for 100 s)."""
        chunk, tokens = [], 0
        for job, seq in items:
            if chunk and (len(chunk) == self.settings.max_batch_size
                          or tokens + len(seq) > self.settings.max_batch_tokens):
                yield chunk
                chunk, tokens = [], 0
            chunk.append((job, seq))
            tokens += len(seq)
        if chunk:
            yield chunk

    def _decode(self, items: list[tuple[Job, list[int]]], retry: bool = True):
        for job, _ in items:  # a request that gave up while earlier chunks decoded: not even a prefill
            if job.future.cancelled():
                self._count(job, "cancelled")
        items = [(job, seq) for job, seq in items if not job.future.done()]
        if not items:
            return
        jobs = [job for job, _ in items]
        config = DecodingConfig(max_new_tokens=max(j.max_new_tokens for j in jobs), num_beams=jobs[0].num_beams,
                                stop_at_newline=jobs[0].stop_at_newline, ignore_eos=jobs[0].ignore_eos,
                                no_repeat_ngram_size=jobs[0].no_repeat_ngram_size,
                                repetition_penalty=jobs[0].repetition_penalty)
        emitted: list[list[int]] = [[] for _ in jobs]

        def on_token(row: int, token: int):
            job, got = jobs[row], emitted[row]
            if len(got) >= job.max_new_tokens:
                return
            got.append(token)
            if job.on_token is not None:
                try:
                    job.on_token(token)
                except Exception:  # a broken consumer loses its stream, nothing else
                    log.debug("stream consumer failed", exc_info=True)
            if len(got) == job.max_new_tokens:  # done: answer now, the batch may run longer
                self._finish(job, got, len(items[row][1]))

        def cancelled(row: int) -> bool:  # asked at every step: a row answered or given up leaves the batch
            self._heartbeat()
            job = jobs[row]
            if job.future.cancelled():
                self._count(job, "cancelled")
            return job.future.done()

        started = time.monotonic()
        try:
            out = self.bank.generate_ids([seq for _, seq in items], [j.bank_id for j in jobs], config,
                                         on_token=on_token if config.num_beams == 1 else None, cancelled=cancelled)
        except Exception as e:
            log.exception("decoding a batch of %d rows failed", len(items))
            if len(items) == 1 or not retry:
                for job in jobs:
                    _resolve(job, error=ServeError(500, "decode_error", f"decoding failed ({type(e).__name__})"))
                    self._count(job, "error")
                return
            for (job, seq), got in zip(items, emitted):  # isolate the row at fault
                if got:  # a stream already carries tokens of this try; it cannot restart cleanly
                    _resolve(job, error=ServeError(500, "decode_error", f"decoding failed ({type(e).__name__})"))
                    self._count(job, "error")
                else:
                    self._decode([(job, seq)], retry=False)
            return
        self.metrics.batch(len(items), len({j.bank_id for j in jobs}), time.monotonic() - started)
        for (job, seq), tokens in zip(items, out):
            self._finish(job, tokens[: job.max_new_tokens], len(seq))

    def _finish(self, job: Job, tokens: list[int], prompt_tokens: int):
        if job.future.done() or not _resolve(job, Result(list(tokens), prompt_tokens)):
            if job.future.cancelled():  # its request gave up before it was answered
                self._count(job, "cancelled")
            return
        self.metrics.inc("prefixtune_generated_tokens_total", len(tokens))
        self.metrics.inc("prefixtune_prompt_tokens_total", prompt_tokens)
        self._count(job, "ok")
