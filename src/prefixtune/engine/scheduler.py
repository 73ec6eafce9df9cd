"""Continuous batching: who waits, who runs, who leaves, decided once per step.

Requests may arrive and be cancelled from any thread; they land in an inbox under a lock and the
stepping thread takes them at the start of its next step. Each step, rows that were cancelled or
ran past their deadline leave (waiting, being prefilled or running), and the step's prefill budget
(`max_prefill_tokens` prompt tokens) goes first to rows whose prompt is partly prefilled, then to
waiting rows admitted while a slot is free. Prefill is chunked (paged backends): a prompt longer
than what is left of the budget is prefilled in pieces over several steps, decode steps in between,
so no step prefills more than the budget whatever one request sends; one row is always admitted
when a slot is free and nothing else prefills, so a long prompt cannot starve. A row being
prefilled holds one of the max_batch places, under a slot number above max_batch, and takes the
next running slot when its last chunk is in.

Admission is fair across tenants (`Request.tenant`; LoRAX's fair scheduling across adapters is the
model). Each tenant with work (running or waiting) has a share of the slots, max_batch / tenants,
and of a step's prefill budget, max_prefill_tokens / tenants (beyond the one row always admitted).
Each admission goes to the waiting tenant that holds the fewest slots (ties: its oldest row first),
so tenants take turns in a step's prefill budget too, and a tenant beyond its share is admitted
only into slots that no tenant under its share waits for. When a tenant under its share waits and
no slot is free, the scheduler preempts (`preempt`) the newest rows of the tenant furthest over its
share: they go back to the front of their tenant's queue with what they have produced, and are
prefilled again (prompt + tokens so far) when readmitted, as vLLM's recompute preemption does.
Within a tenant, rows keep their arrival order.

Decoding is fair across tenants too (`decode_rows`). A step's time grows with its rows, so a tenant
with many rows (a beam request holds one per beam) would slow every other tenant's tokens, however
few rows those hold. While other tenants have running rows, a tenant decodes in one step at most
max(`tenant_step_rows`, the running rows of the busiest other tenant, its next request's rows); its
other rows wait for a later step, taking turns (least recently decoded first; a beam group's rows
decode together). Equal tenants are never held back; beside a small tenant, a big one adds to its
steps at most max(`tenant_step_rows`, the small one's rows, one beam group), unless a third tenant
is as big. Alone, a tenant decodes all its rows at every step.
"""
from __future__ import annotations

import math
import threading
from collections import Counter, deque
from dataclasses import dataclass, field

import torch

from .request import Request
from .stops import StopState


@dataclass(eq=False)
class Row:
    """One choice of one request: its prefix, its output so far, and where it sits in the cache."""

    request: Request
    index: int
    stop: StopState
    prefix: object = None          # backend-ready prefix (slot backends: (layers, 2, H, P, D))
    prefix_len: int = 0
    generator: torch.Generator | None = None
    deadline: float | None = None
    slot: int = -1                 # -1 while waiting
    length: int = 0                # cache entries filled: prefix + prompt + tokens fed back
    last_token: int = -1           # sampled, not yet fed back
    preempted: bool = False        # waiting again after running: its prefill recomputes its tokens so far
    prefilled: int = 0             # of prefill_ids(), the tokens already in the cache (chunked prefill)
    beam: object = None            # beam search: its BeamGroup (engine/beam.py)
    turn: int = -1                 # the decode step that last decoded it (its tenant's rows take turns)

    @property
    def slots(self) -> int:
        """Slots its admission takes: a beam request's first row reserves one for each beam."""
        return self.beam.k if self.beam is not None and not self.beam.rows else 1

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def tenant(self):
        return self.request.tenant

    def prefill_ids(self) -> list[int]:
        """What its admission prefills: the prompt, and after a preemption the tokens already fed back
        (all it produced but the last, which is fed at the next decode step as usual)."""
        return self.request.prompt + (self.stop.tokens[:-1] if self.preempted else [])


class Scheduler:
    def __init__(self, max_batch: int, max_prefill_tokens: int, preemptive: bool = False, chunked: bool = False,
                 tenant_step_rows: int = 4):
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        self.tenant_step_rows = tenant_step_rows
        self.preemptive = preemptive      # paged backends can rebuild a row's cache; per-row states cannot
        self.chunked = chunked            # paged backends can prefill a prompt in pieces
        self._lock = threading.Lock()
        self._inbox: deque[Row] = deque()
        self._cancelled: set[str] = set()
        self.waiting: deque[Row] = deque()
        self.running: list[Row] = []      # running[i].slot == i
        self.prefilling: list[Row] = []   # admitted, prompt partly in the cache; slots max_batch and up
        self.preemptions = 0
        self.decode_steps = 0
        self.held_back = 0                # row-steps a running row waited for its tenant's turn

    # -- any thread ----------------------------------------------------------------------------
    def submit(self, rows: list[Row]):
        with self._lock:
            self._inbox.extend(rows)

    def cancel(self, request_id: str):
        with self._lock:
            self._cancelled.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._inbox or self.waiting or self.running or self.prefilling)

    # -- the stepping thread -------------------------------------------------------------------
    def leaving(self, now: float) -> list[tuple[Row, str]]:
        """Rows to end before this step: cancelled, or past their deadline."""
        with self._lock:
            self.waiting.extend(self._inbox)
            self._inbox.clear()
            cancelled, self._cancelled = self._cancelled, set()
        out = []
        for row in list(self.waiting) + self.prefilling + self.running:
            if row.request_id in cancelled:
                out.append((row, "cancelled"))
            elif row.deadline is not None and now >= row.deadline:
                out.append((row, "timeout"))
        gone = {id(r) for r, _ in out}
        self.waiting = deque(r for r in self.waiting if id(r) not in gone)
        return out

    def _held(self) -> Counter:
        held = Counter(row.tenant for row in self.running)
        for row in self.prefilling:  # a beam request's first row holds its group's slots
            held[row.tenant] += row.slots
        return held

    def _used(self) -> int:
        """Places taken: running rows, and rows being prefilled with the slots their beams will fork into."""
        return len(self.running) + sum(row.slots for row in self.prefilling)

    def prefill_work(self) -> list[tuple[Row, list[int], bool]]:
        """This step's prompt tokens, (row, tokens, first chunk?): rows being prefilled go on (oldest first),
        then admitted rows start. Chunked, a step never takes more than max_prefill_tokens in all: a row
        takes what is left of the budget and goes on at the next step, between two decode steps."""
        budget, work = self.max_prefill_tokens, []
        for row in self.prefilling:
            if budget <= 0:
                break
            chunk = row.prefill_ids()[row.prefilled: row.prefilled + budget]
            work.append((row, chunk, False))
            budget -= len(chunk)
        if budget > 0:
            for row in self.admit(budget, busy=bool(work)):
                ids = row.prefill_ids()
                chunk = ids[:budget] if self.chunked else ids
                row.slot, row.prefilled = self._prefill_slot(), 0
                self.prefilling.append(row)
                work.append((row, chunk, True))
                budget -= len(chunk)
        for row, chunk, _ in work:
            row.prefilled += len(chunk)
        return work

    def _prefill_slot(self) -> int:
        taken = {row.slot for row in self.prefilling}
        return next(s for s in range(self.max_batch, 2 * self.max_batch + 1) if s not in taken)

    def _share(self, held: Counter) -> float:
        tenants = set(held) | {row.tenant for row in self.waiting}
        return self.max_batch / max(len(tenants), 1)

    def admit(self, budget: int | None = None, busy: bool = False) -> list[Row]:
        """Waiting rows that join the batch this step (not yet placed): one at a time to the waiting tenant
        holding the fewest slots, while slots are free and the prefill budget lasts; each tenant's rows take
        at most its share of the budget (the budget / tenants with work), since a step's prefill holds
        every running row of every tenant."""
        held = self._held()
        queues: dict[object, deque[Row]] = {}
        for row in self.waiting:
            queues.setdefault(row.tenant, deque()).append(row)
        order = {tenant: i for i, tenant in enumerate(queues)}  # the tenant whose oldest row came first wins a tie
        share = self.max_prefill_tokens / max(len(set(held) | set(queues)), 1)
        spent: Counter = Counter()
        out, budget, taken = [], self.max_prefill_tokens if budget is None else budget, 0
        used = self._used()
        while queues and used + taken < self.max_batch:
            tenant = min(queues, key=lambda t: (held[t], order[t]))
            row = queues[tenant][0]
            cost = len(row.prefill_ids())
            if ((out or busy) and (cost > budget or spent[tenant] + cost > share)
                    or used + taken + row.slots > self.max_batch):  # waits for the next step; others may fit
                del queues[tenant]
                continue
            queues[tenant].popleft()
            if not queues[tenant]:
                del queues[tenant]
            out.append(row)
            taken += row.slots
            held[tenant] += row.slots
            spent[tenant] += cost
            budget -= cost
        taken = {id(r) for r in out}
        self.waiting = deque(r for r in self.waiting if id(r) not in taken)
        return out

    def decode_rows(self) -> list[Row]:
        """The running rows this step decodes, in slot order: all of them, except a tenant's rows beyond its
        step share while other tenants run (see the module's docstring)."""
        units: dict[int, list[Row]] = {}  # what decodes as one: a row, or a beam group's rows
        for row in self.running:
            units.setdefault(id(row if row.beam is None else row.beam), []).append(row)
        tenants: dict[object, list[list[Row]]] = {}
        for unit in units.values():
            tenants.setdefault(unit[0].tenant, []).append(unit)
        rows_of = {t: sum(map(len, us)) for t, us in tenants.items()}
        out = []
        for tenant, tenant_units in tenants.items():
            others = [n for t, n in rows_of.items() if t != tenant]
            cap = max([self.tenant_step_rows] + others) if others else rows_of[tenant]
            taken = 0
            for unit in sorted(tenant_units, key=lambda u: (max(r.turn for r in u), u[0].slot)):
                if taken and taken + len(unit) > cap:
                    continue  # it waits; having waited, it comes first at the next step
                out += unit
                taken += len(unit)
            self.held_back += rows_of[tenant] - taken
        for row in out:
            row.turn = self.decode_steps
        self.decode_steps += 1
        return sorted(out, key=lambda r: r.slot)

    def preempt(self) -> list[Row]:
        """Running rows to take out now (their slots released by the caller, then `requeue`d), so that each
        tenant under its share that waits gets a slot at this step's admission."""
        if not self.preemptive or not self.waiting:
            return []
        held = self._held()
        share = self._share(held)
        waiting = Counter(row.tenant for row in self.waiting)
        wanted = sum(min(n, max(math.ceil(share) - held[t], 0)) for t, n in waiting.items() if held[t] < share)
        short = wanted - (self.max_batch - self._used())
        out = []
        while short > 0:
            # a victim stays at or above its share; beam rows are never taken (their group needs them all)
            over = [t for t in held if held[t] - 1 >= share
                    and any(r.tenant == t and r.beam is None and r not in out for r in self.running)]
            if not over:
                break
            victim = max(over, key=lambda t: held[t])
            row = min((r for r in self.running if r.tenant == victim and r.beam is None and r not in out),
                      key=lambda r: len(r.stop.tokens))
            out.append(row)
            held[victim] -= 1
            short -= 1
        return out

    def requeue(self, rows: list[Row]):
        """Preempted rows, out of their slots: back to the front of the queue (their tenant's oldest)."""
        for row in reversed(rows):
            row.preempted = True
            self.waiting.appendleft(row)
        self.preemptions += len(rows)

    def place(self, row: Row) -> int:
        """The row runs (its prefill done): it takes the next running slot."""
        if row in self.prefilling:
            self.prefilling.remove(row)
        row.slot = len(self.running)
        self.running.append(row)
        return row.slot

    def remove(self, row: Row) -> tuple[Row, int, int] | None:
        """Take a row out (running or being prefilled); the last running row fills a running row's slot.
        Returns (moved row, from, to) or None."""
        if row in self.prefilling:
            self.prefilling.remove(row)
            row.slot = -1
            return None
        slot, last = row.slot, self.running.pop()
        row.slot = -1
        if last is row:
            return None
        self.running[slot] = last
        src, last.slot = last.slot, slot
        return last, src, slot
