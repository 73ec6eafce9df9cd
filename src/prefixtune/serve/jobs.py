"""What a request handler hands the decoding worker (`Job`, one per choice) and gets back (`Result`),
and the worker's signs of life that /health reads (`WorkerHealth`)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable


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
    def deadline(self) -> float:
        return self.enqueued + self.timeout_s

    def cancel(self):
        self.future.cancel()


def engine_rows(job: Job) -> int:
    """The engine rows a job decodes as: a beam search is `num_beams` rows (n > 1 is a job per choice)."""
    return max(1, job.num_beams)


def resolve(job: Job, result=None, error: Exception | None = None) -> bool:
    try:
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)
        return True
    except InvalidStateError:  # cancelled by its request (timeout, disconnect) or resolved already
        return False


class WorkerHealth:
    """A decoding worker thread's signs of life, which /health reads.

    A heartbeat only says that the worker thread moves; a worker that beats at every step may still
    starve a row. So the stall is measured as a waiting row lives it
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
