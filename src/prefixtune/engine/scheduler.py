"""Continuous batching: who waits, who runs, who leaves, decided once per step.

Requests may arrive and be cancelled from any thread; they land in an inbox under a lock and the
stepping thread takes them at the start of its next step. Each step, rows that were cancelled or
ran past their deadline leave (waiting or running), and waiting rows are admitted, oldest first,
while a slot is free and the step's prefill budget (prompt tokens) lasts; one row is always
admitted when a slot is free, so a long prompt cannot starve.
"""
from __future__ import annotations

import threading
from collections import deque
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

    @property
    def request_id(self) -> str:
        return self.request.request_id


class Scheduler:
    def __init__(self, max_batch: int, max_prefill_tokens: int):
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        self._lock = threading.Lock()
        self._inbox: deque[Row] = deque()
        self._cancelled: set[str] = set()
        self.waiting: deque[Row] = deque()
        self.running: list[Row] = []      # running[i].slot == i

    # -- any thread ----------------------------------------------------------------------------
    def submit(self, rows: list[Row]):
        with self._lock:
            self._inbox.extend(rows)

    def cancel(self, request_id: str):
        with self._lock:
            self._cancelled.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._inbox or self.waiting or self.running)

    # -- the stepping thread -------------------------------------------------------------------
    def leaving(self, now: float) -> list[tuple[Row, str]]:
        """Rows to end before this step: cancelled, or past their deadline."""
        with self._lock:
            self.waiting.extend(self._inbox)
            self._inbox.clear()
            cancelled, self._cancelled = self._cancelled, set()
        out = []
        for row in list(self.waiting) + self.running:
            if row.request_id in cancelled:
                out.append((row, "cancelled"))
            elif row.deadline is not None and now >= row.deadline:
                out.append((row, "timeout"))
        gone = {id(r) for r, _ in out}
        self.waiting = deque(r for r in self.waiting if id(r) not in gone)
        return out

    def admit(self) -> list[Row]:
        """Waiting rows that join the batch this step (not yet placed)."""
        out, budget = [], self.max_prefill_tokens
        while self.waiting and len(self.running) + len(out) < self.max_batch:
            cost = len(self.waiting[0].request.prompt)
            if out and cost > budget:
                break
            out.append(self.waiting.popleft())
            budget -= cost
        return out

    def place(self, row: Row) -> int:
        row.slot = len(self.running)
        self.running.append(row)
        return row.slot

    def remove(self, row: Row) -> tuple[Row, int, int] | None:
        """Take a running row out; the last row fills its slot. Returns (moved row, from, to) or None."""
        slot, last = row.slot, self.running.pop()
        row.slot = -1
        if last is row:
            return None
        self.running[slot] = last
        src, last.slot = last.slot, slot
        return last, src, slot
