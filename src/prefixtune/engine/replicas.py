"""Replicas: N engines in one process over one copy of the weights, each stepped by a thread of its own.

    engine = Replicas(model, tokenizer, replicas=2, max_batch=32)   # the Engine's interface
    engine.generate([Request(...), ...])

Why: at serve_mixed's 32 rows a decode step is many small ops (per-layer projections of 32 rows,
RoPE, a gather, SDPA) that do not split well over OpenMP threads; two engines each given one core,
each stepping half the rows, keep both cores busy (measured on this 2-core CPU, quiet, one process:
383-405 tokens/s against 350-355 for one engine on 2 torch threads; docs/engine.md "Both cores").
Torch releases the GIL inside its ops, so Python threads suffice.
This is vLLM's data parallelism, in one process and over one copy of the weights.

A request goes whole to the replica holding the fewest rows (a beam request's rows stay together:
they fork each other's caches). `step` steps every replica that has work, concurrently, and returns
their events in replica order. A row's tokens are the ones it gets from one engine: in bf16 a row's
bits do not depend on the rows beside it (llama_fast.py), so neither on its replica.

Each replica has its own slots (`max_batch / replicas`, rounded up), KV blocks and scheduler: the
tenant step share (`tenant_step_rows`, Scheduler.decode_rows) holds within a replica, not across.
The replicas' threads run torch with one thread each (torch.set_num_threads is per thread once
a thread has started; the caller's own setting is left as it was). Replicas only pay where each still
has a batch worth stepping: one replica (a plain `Engine`) is the default everywhere (`make_engine`).
"""
from __future__ import annotations

import queue
import threading

import torch

from .engine import Engine
from .request import Request, TokenEvent


def make_engine(model, tokenizer=None, *, replicas: int = 1, **engine_kw):
    """An `Engine`, or `Replicas` of it where `replicas` > 1."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    if replicas == 1:
        return Engine(model, tokenizer, **engine_kw)
    return Replicas(model, tokenizer, replicas=replicas, **engine_kw)


class _Stepper(threading.Thread):
    """Steps one replica when told to; torch runs on one thread here."""

    def __init__(self, engine: Engine, ready: threading.Barrier):
        super().__init__(daemon=True, name="prefixtune-replica")
        self.engine, self.ready = engine, ready
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()

    def run(self):
        torch.set_num_threads(1)
        self.ready.wait()
        while self.inbox.get():  # None: closed
            try:
                self.outbox.put(self.engine.step())
            except BaseException as e:  # handed to the caller of Replicas.step
                self.outbox.put(e)


class Replicas:
    def __init__(self, model, tokenizer=None, *, replicas: int = 2, max_batch: int = 32, **engine_kw):
        if replicas < 2:
            raise ValueError(f"Replicas needs replicas >= 2, got {replicas} (one: a plain Engine, make_engine)")
        per = -(-max_batch // replicas)
        first = Engine(model, tokenizer, max_batch=per, **engine_kw)
        self.engines = [first] + [Engine(model, tokenizer, max_batch=per, shares=first, **engine_kw)
                                  for _ in range(replicas - 1)]
        self.tokenizer, self.spec, self.device = first.tokenizer, first.spec, first.device
        self.dtype, self.path, self.max_len = first.dtype, first.path, first.max_len
        self.max_batch, self.per_replica = per * replicas, per
        self._lock = threading.Lock()
        self._rows = [0] * replicas                  # rows of each replica's unfinished requests
        self._where: dict[str, list[int]] = {}       # request id -> [replica, choices not finished, rows]
        threads = torch.get_num_threads()
        ready = threading.Barrier(replicas + 1)
        self._steppers = [_Stepper(e, ready) for e in self.engines]
        for s in self._steppers:
            s.start()
        ready.wait()
        torch.set_num_threads(threads)  # the default for threads started later, as it was

    # -- requests (any thread) -----------------------------------------------------------------
    def add_request(self, request: Request) -> str:
        rows = request.n * request.beams
        if request.beams > self.per_replica:
            raise ValueError(f"beams ({request.beams}) exceeds a replica's max_batch {self.per_replica} "
                             f"(max_batch {self.max_batch} over {len(self.engines)} replicas)")
        with self._lock:
            if request.request_id in self._where:  # each replica checks its own; this checks across them
                raise ValueError(f"request_id {request.request_id!r} is in use by a request not finished")
            i = min(range(len(self.engines)), key=lambda j: self._rows[j])
            self.engines[i].add_request(request)
            self._rows[i] += rows
            self._where[request.request_id] = [i, request.n, rows]
        return request.request_id

    def cancel(self, request_id: str):
        with self._lock:
            where = self._where.get(request_id)
        if where is not None:
            self.engines[where[0]].cancel(request_id)

    def has_work(self) -> bool:
        return any(e.has_work() for e in self.engines)

    @property
    def num_running(self) -> int:
        return sum(e.num_running for e in self.engines)

    @property
    def num_waiting(self) -> int:
        return sum(e.num_waiting for e in self.engines)

    @property
    def stats(self) -> dict:
        """The replicas' counters summed ("steps": the most any replica took; "max_*": the largest)."""
        out = {}
        for e in self.engines:
            for k, v in e.stats.items():
                out[k] = max(out.get(k, 0), v) if k == "steps" or k.startswith("max_") else out.get(k, 0) + v
        return out

    # -- stepping (one thread) -----------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        busy = [s for s in self._steppers if s.engine.has_work()]
        for s in busy:
            s.inbox.put(True)
        results = [s.outbox.get() for s in busy]  # every replica ends its step before any error is raised
        for r in results:
            if isinstance(r, BaseException):
                raise r
        events = [e for r in results for e in r]
        with self._lock:
            for e in events:
                where = self._where.get(e.request_id) if e.finished else None
                if where is not None:
                    where[1] -= 1
                    if where[1] == 0:
                        self._rows[where[0]] -= where[2]
                        del self._where[e.request_id]
        return events

    generate = Engine.generate  # add_request, has_work and step: Replicas' own

    def close(self):
        """Ends the replicas' threads (they are daemons: a process may also just exit)."""
        for s in self._steppers:
            s.inbox.put(None)
        for s in self._steppers:
            s.join()
