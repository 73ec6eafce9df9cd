"""Continuous batching for the server: one worker thread steps `prefixtune.engine`.

Handlers `submit` jobs (one per choice) and await their futures or streams. At the start of each cycle the worker
takes the new jobs (while rows run, as many as it encodes within ADMIT_BUDGET_S): it encodes each prompt, takes
the row's prefix from the bank (`bank.get`) and adds a `Request` to the engine. That is the row's
admission: a PUT replacing a prefix affects only rows admitted after it, since the engine keys a
prefix's KV blocks by the prefix tensor and a running row keeps the blocks it started with. Then it steps the engine while the engine has work
(a request arriving during a long batch joins at the next step), maps each `TokenEvent` to its job
(stream callback, then the future) and waits on a condition when idle. A job whose request gave
up (client gone, timed out) is cancelled in the engine: its row leaves at the next step.

Beam search (`num_beams`: k rows of the engine, the answer whole when the search ends),
`no_repeat_ngram_size` and `repetition_penalty` are engine features like sampling: such a row
decodes beside every other, and no row waits for it.

With `replicas` > 1 (`--replicas`, by default `--threads`) the engine is `Replicas`: that many engines
over one copy of the weights, stepped together, one core each (engine/replicas.py); this worker
still steps them as one.

An error in a step fails the rows that were running (500) and the engine is rebuilt, since its
state may be half a step; the worker keeps running.
"""
from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..bank import PrefixBank, PrefixUnavailable
from ..engine import Engine, Replicas, Request, make_engine
from ..generation import stop_ids
from .errors import QueueFull, ServeError, ShuttingDown
from .jobs import Job, Result, WorkerHealth, engine_rows, resolve
from .prometheus import Metrics
from .settings import ServeSettings

log = logging.getLogger("prefixtune.serve")
# While rows run, new prompts are encoded for at most this long between two steps (the others wait for the next
# cycle): 31 prompts of 32,768 characters take seconds to tokenize, which would pause every running row.
ADMIT_BUDGET_S = 0.05


@dataclass(eq=False)
class _Live:
    """A job whose row is in the engine: what it has produced so far."""

    job: Job
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    cancel_sent: bool = False


def engine_max_len(model, settings: ServeSettings) -> int:
    """KV entries per slot: the longest prefix + prompt + completion the limits allow, capped by the
    model's positions (a prefix takes positions 0..P-1)."""
    longest = settings.max_prefix_len + settings.max_prompt_tokens + settings.max_tokens_limit
    cfg = model.config
    positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return min(longest, positions) if positions else longest


class EngineWorker(WorkerHealth):
    """submit, start/stop, alive, depth, heartbeat_age, pending, metrics: what the app and /health use."""

    def __init__(self, bank: PrefixBank, settings: ServeSettings, metrics: Metrics | None = None):
        self.bank, self.settings = bank, settings
        self.metrics = metrics or Metrics()
        self.engine = self._new_engine()
        self._inbox: deque[Job] = deque()
        self._queued = 0                # the inbox's rows, counted as jobs come and go: `submit` never sums the queue
        self._live: dict[str, _Live] = {}
        self._unstarted = 0             # admitted to the engine, no token yet: still queued, for `depth`
        # depth() by tenant (queued + unstarted; tenants with rows waiting only), changed under the lock: fair shares
        self._waiting: dict[str | None, int] = {}
        self._cond = threading.Condition()
        self._init_health()
        self._newlines: set[int] | None = None
        self._advanced = self.clock()   # when the engine's running rows last took a step

    def _new_engine(self) -> Engine | Replicas:
        s = self.settings
        return make_engine(self.bank.model, self.bank.tokenizer, replicas=s.replicas, max_batch=s.max_batch_size,
                           max_len=engine_max_len(self.bank.model, s), dtype=s.dtype,
                           max_prefill_tokens=s.max_batch_tokens)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self):
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="prefixtune-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0):
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            pending = list(self._inbox) + [live.job for live in self._live.values()]
            self._inbox.clear()
            self._queued = 0
            self._waiting.clear()
        for job in pending:
            resolve(job, error=ShuttingDown())

    def depth(self) -> int:
        """Engine rows waiting: not yet taken by the worker, or in the engine without a token yet (a beam
        search's rows until its text comes). A job is `engine_rows(job)` rows. Two counts, kept as jobs come
        and go: reading them needs no lock."""
        return self._queued + self._unstarted

    def waiting(self, tenant: str | None) -> int:
        """The tenant's share of `depth`: its engine rows queued or admitted without a token yet."""
        return self._waiting.get(tenant, 0)

    def pending(self) -> bool:
        return self._busy or bool(self._inbox)

    def stall_s(self) -> float:
        """The age of the oldest row without a token yet (queued, or admitted to the engine), or the time
        since the engine's running rows last advanced, whichever is longer. (A beam row outputs its tokens
        at the end: it counts from its last step.)"""
        now = self.clock()
        with self._cond:
            waiting = [job.enqueued for job in self._inbox]
        waiting += [live.job.enqueued for live in list(self._live.values()) if not live.tokens and live.job.num_beams == 1]
        oldest = now - min(waiting) if waiting else 0.0
        running = now - self._advanced if self.engine.num_running else 0.0
        return max(oldest, running)

    # -- submitting (any thread) -------------------------------------------------------------
    def submit(self, jobs: list[Job]):
        """Queue all of `jobs` or none of them. The queue limit counts engine rows (prompts x max(n, num_beams)):
        32 prompts of 8 beams are 256 rows of work, not one request. The jobs are one tenant's (one request)."""
        rows, limit = sum(engine_rows(job) for job in jobs), self.settings.max_queue
        if rows > limit:  # it would never fit: a 429 would be retried in vain
            raise ServeError(400, "too_many_rows", f"this request decodes {rows} engine rows (prompts x max(n, "
                                                   f"num_beams)); the server queues at most {limit} (--max-queue): "
                                                   f"send fewer prompts, choices or beams")
        with self._cond:
            if not self.alive():
                raise ShuttingDown()
            self._check_room(jobs[0].tenant if jobs else None, rows, limit)
            now = self.clock()
            for job in jobs:
                job.enqueued = now
                self._inbox.append(job)
                self._count_waiting(job, +1)
            self._queued += rows
            self._cond.notify_all()

    def _check_room(self, tenant: str | None, rows: int, limit: int):
        """Under the lock. A full queue refuses only the tenants over their fair share of it: a tenant whose rows
        fill the queue would otherwise lock every other tenant out with 429s, though the engine would give a
        newcomer its first token at the next step. The share is --max-queue over the tenants with rows waiting
        (this one counted); tenants within their share may take the queue to at most twice --max-queue."""
        depth = self.depth()
        if depth + rows <= limit:
            return
        own, tenants = self.waiting(tenant), len(self._waiting) + (tenant not in self._waiting)
        share = limit // tenants
        if own + rows <= share and depth + rows <= 2 * limit:
            return
        raise QueueFull(depth, rows, limit, own=own, share=share, tenants=tenants)

    def _count_waiting(self, job: Job, sign: int):
        """Under the lock: the job's rows start (+1) or stop (-1) waiting, in its tenant's count."""
        left = self._waiting.get(job.tenant, 0) + sign * engine_rows(job)
        if left > 0:
            self._waiting[job.tenant] = left
        else:  # only tenants with rows waiting are counted: they divide the queue
            self._waiting.pop(job.tenant, None)

    def _stop_waiting(self, job: Job):
        """The job's rows, admitted to the engine, got their first token or left without one."""
        self._unstarted -= engine_rows(job)
        with self._cond:
            self._count_waiting(job, -1)

    # -- the worker --------------------------------------------------------------------------
    def _run(self):
        log.info("engine worker started (%s, %s, %d rows of up to %d entries, KV blocks by traffic, %d replica(s))",
                 self.engine.path, self.engine.dtype, self.engine.max_batch, self.engine.max_len,
                 self.settings.replicas)
        while not self._stopping:
            self._cycle_or_recover()
        self._busy = False
        log.info("engine worker stopped")

    def _cycle_or_recover(self):
        try:
            self._cycle()
        except Exception as e:  # never let the worker die: fail the running rows, start a clean engine
            log.exception("engine worker error")
            if isinstance(self.engine, Replicas):
                self.engine.close()
            self.engine = self._new_engine()  # first, so a client told of the failure finds a clean engine
            self._fail_running(e)
        finally:
            self._heartbeat()

    def _cycle(self):
        with self._cond:
            while not self._inbox and not self._stopping and not self.engine.has_work():
                self._busy = False
                self._heartbeat()
                self._cond.wait(0.5)
            if self._stopping:
                return
            self._busy = True
        started = self.clock()
        while True:  # FIFO; while rows run, within ADMIT_BUDGET_S (one prompt at least)
            with self._cond:
                if not self._inbox:
                    break
                job = self._inbox.popleft()
                self._queued -= engine_rows(job)
            if not self._admit(job):  # answered without decoding: its rows wait no more
                with self._cond:
                    self._count_waiting(job, -1)
            if self.engine.num_running and self.clock() - started > ADMIT_BUDGET_S:
                break
        self._cancel_given_up()
        if self.engine.has_work():
            self._step()

    def _admit(self, job: Job) -> bool:
        """Add the job's row to the engine; False when it was answered instead."""
        try:
            seq = self._prepare(job)
            if seq is None:  # answered already (gave up, timed out, deleted prefix, bad prompt)
                return False
            try:
                prefix = None if job.bank_id is None else self.bank.get(job.bank_id)
            except KeyError:
                resolve(job, error=ServeError(404, "model_not_found", "the prefix was deleted before decoding"))
                return False
            except PrefixUnavailable as e:
                resolve(job, error=ServeError(500, "prefix_unavailable", str(e)))
                self._count(job, "error")
                return False
            left = job.deadline - self.clock()
            request = Request(seq, prefix=prefix, max_tokens=job.max_new_tokens, temperature=job.temperature,
                              top_p=job.top_p, top_k=job.top_k, seed=job.seed, stop=list(job.stop_strings),
                              stop_token_ids=sorted(self._newline_ids()) if job.stop_at_newline else (),
                              ignore_eos=job.ignore_eos, logprobs=job.logprobs is not None, tenant=job.tenant,
                              top_logprobs=job.logprobs or 0, timeout_s=max(left, 0.0) if math.isfinite(left) else None,
                              beams=job.num_beams, no_repeat_ngram_size=job.no_repeat_ngram_size,
                              repetition_penalty=job.repetition_penalty)
            self.engine.add_request(request)
        except ValueError as e:  # the engine's own checks: prompt + prefix + max_tokens over its slots, ...
            resolve(job, error=ServeError(400, "invalid_request", str(e)))
            return False
        except Exception as e:
            log.exception("admitting a row failed")
            resolve(job, error=ServeError(500, "server_error", f"could not start decoding ({type(e).__name__})"))
            self._count(job, "error")
            return False
        self._live[request.request_id] = _Live(job)
        self._unstarted += engine_rows(job)
        return True

    def _count(self, job: Job, outcome: str):
        if job.outcome is None:
            job.outcome = outcome
            self.metrics.inc("prefixtune_completions_total", outcome=outcome)

    def _prepare(self, job: Job) -> list[int] | None:
        """The job's prompt ids, or None when it is answered already (gave up, timed out, prefix deleted,
        a prompt that does not encode or is over the limit)."""
        if job.future.done():  # the request gave up (timeout, disconnect): skip it
            self._count(job, "cancelled")
            return None
        if self.clock() > job.deadline:
            resolve(job, error=ServeError(503, "timeout", "request timed out in the queue"))
            self._count(job, "timeout")
            return None
        if job.bank_id is not None and job.bank_id not in self.bank:
            resolve(job, error=ServeError(404, "model_not_found", "the prefix was deleted before decoding"))
            return None
        limit = self.settings.max_prompt_tokens
        try:  # encoded whole unless truncation was asked for, so that too long is refused, not cut
            if job.prompt_ids is not None:
                seq = list(job.prompt_ids)[-(job.truncate_to or len(job.prompt_ids)):]
            else:
                seq = self.bank.encode(job.text, job.bank_id, job.raw, max_len=job.truncate_to or sys.maxsize)
        except PrefixUnavailable as e:  # a stored file that no longer loads: the server's fault, not the prompt's
            resolve(job, error=ServeError(500, "prefix_unavailable", str(e)))
            self._count(job, "error")
            return None
        except Exception as e:
            resolve(job, error=ServeError(400, "invalid_prompt", f"could not encode the prompt ({type(e).__name__})"))
            return None
        job.prompt_tokens = len(seq)
        if not seq:
            resolve(job, error=ServeError(400, "invalid_prompt", "the prompt encodes to no tokens"))
            return None
        if len(seq) > limit:
            fix = "Shorten the messages" if job.prompt_ids is not None else \
                "Shorten it, or send truncate_prompt_tokens to cut it"  # chat requests have no truncate_prompt_tokens
            resolve(job, error=ServeError(400, "prompt_too_long", f"the prompt is {len(seq)} tokens (with its template); "
                               f"the limit is {limit}. {fix}"))
            return None
        return seq

    def _newline_ids(self) -> set[int]:
        if self._newlines is None:  # every token whose text holds a newline: today's stop_at_newline
            self._newlines = stop_ids(self.bank.tokenizer, stop_at_newline=True, ignore_eos=True)
        return self._newlines

    def _cancel_given_up(self):
        for request_id, live in self._live.items():
            if not live.cancel_sent and live.job.future.done():  # cancelled by its handler: leaves at the next step
                self.engine.cancel(request_id)
                live.cancel_sent = True

    def _step(self):
        started = time.monotonic()
        events = self.engine.step()
        self._heartbeat()
        self._advanced = self.clock()  # every running row took a step (a beam row's tokens come at its end)
        rows = {(e.request_id, e.index) for e in events if e.token is not None}
        if rows:
            prefixes = len({self._live[r].job.bank_id for r, _ in rows if r in self._live})
            self.metrics.batch(len(rows), prefixes, time.monotonic() - started)
        for event in events:
            live = self._live.get(event.request_id)
            if live is None:
                continue
            job = live.job
            if event.token is not None:
                if not live.tokens:
                    self._stop_waiting(job)
                live.tokens.append(event.token)
                if event.logprob is not None:
                    live.logprobs.append(event.logprob)
                    live.top_logprobs.append(event.top_logprobs or [])
                if job.on_token is not None and not job.future.done():
                    try:
                        job.on_token(event.token, event.logprob, event.top_logprobs)
                    except Exception:  # a broken consumer loses its stream, nothing else
                        log.debug("stream consumer failed", exc_info=True)
            if event.finish_reason is not None:
                del self._live[event.request_id]
                if not live.tokens:
                    self._stop_waiting(job)
                self._finish(live, event.finish_reason)

    def _finish(self, live: _Live, reason: str):
        job, count = live.job, self._count
        if reason == "cancelled":
            count(job, "cancelled")
        elif reason == "timeout":
            resolve(job, error=ServeError(503, "timeout", "request timed out"))
            count(job, "timeout")
        elif resolve(job, Result(live.tokens, job.prompt_tokens, live.logprobs if job.logprobs is not None else None,
                                  live.top_logprobs if job.logprobs is not None else None)):
            self.metrics.inc("prefixtune_generated_tokens_total", len(live.tokens))
            self.metrics.inc("prefixtune_prompt_tokens_total", job.prompt_tokens)
            count(job, "ok")
        elif job.future.cancelled():  # it gave up in the step that finished it
            count(job, "cancelled")

    def _fail_running(self, error: Exception):
        for live in self._live.values():
            if not live.tokens:
                self._stop_waiting(live.job)
            resolve(live.job, error=ServeError(500, "decode_error", f"decoding failed ({type(error).__name__})"))
            self._count(live.job, "error")
        self._live.clear()
