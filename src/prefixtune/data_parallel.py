"""Data parallelism over Python threads in one process, for a training step on a CPU.

A training step's matmuls fill the cores with OpenMP threads, but the rest of the step (elementwise
operations, attention bookkeeping, autograd, Python) runs mostly on one. PyTorch releases the GIL
inside its operators, so two Python threads, each with one torch thread, each running the forward
and backward of half the batch, keep both cores busy through all of it (measured in
docs/training_speed.md).

`ThreadedHalves` splits a batch's rows in two, runs each half's loss and `torch.autograd.grad` on
its own worker thread (no shared `.grad` is written while they run), then writes each trained
parameter's `.grad` as the halves' gradients weighted by their target tokens, summed in a fixed
order: the gradient of the whole batch's mean token loss, up to float summation order. The frozen
weights and their bf16/prepacked copies are only read. Autocast and grad mode are per thread, so
`loss_of` enters autocast itself.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn


def split_rows(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """The batch's rows in `parts` contiguous pieces (the first ones one row longer when rows do not divide)."""
    rows = next(iter(batch.values())).shape[0]
    sizes = [rows // parts + (i < rows % parts) for i in range(parts)]
    pieces = {k: v.split(sizes) for k, v in batch.items()}
    return [{k: pieces[k][i] for k in batch} for i in range(parts) if sizes[i]]


def uses_dropout(*modules: nn.Module) -> bool:
    """True when a module in training mode would draw random numbers (dropout): the halves would then draw them
    from one generator in an order that depends on thread timing, and the step would not be reproducible."""
    for root in modules:
        for module in root.modules():
            if not module.training:
                continue
            if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
                return True
            if any(isinstance(getattr(module, a, None), float) and getattr(module, a) > 0
                   for a in ("attention_dropout", "dropout")):
                return True
    return False


def threaded_halves(device: torch.device, *modules: nn.Module) -> "ThreadedHalves | None":
    """`ThreadedHalves` where they apply (train.py, the users trainer): a CPU with 2+ torch threads and no
    dropout in `modules` (its draws would depend on thread timing); else None, one pass."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2 or uses_dropout(*modules):
        return None
    return ThreadedHalves(threads)


class ThreadedHalves:
    """`step(loss_of, batch, params)`: the batch's mean-loss gradient on `params`, the halves run on two threads.

    `threads`: the torch threads of the whole step, shared between the two workers (at least one each)."""

    workers = 2

    def __init__(self, threads: int):
        self.threads_per_worker = max(1, threads // self.workers)
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="prefixtune-half")
        # Each worker sets its own OpenMP thread count once (a per-thread setting; reading it back fixes it
        # for that thread). The barrier makes the pool start both workers now. torch.set_num_threads also
        # stores the count as the default for threads started later: the caller's count is put back after.
        caller = torch.get_num_threads()
        barrier = threading.Barrier(self.workers)

        def start_worker():
            torch.set_num_threads(self.threads_per_worker)
            torch.get_num_threads()
            barrier.wait()

        for started in [self.pool.submit(start_worker) for _ in range(self.workers)]:
            started.result()
        torch.set_num_threads(caller)

    def step(self, loss_of, batch: dict, params: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Runs `loss_of(half) -> (mean loss, target tokens)` and its gradient per half; sets `p.grad` for every
        parameter in `params` (None where no half reaches it). Returns the batch's mean loss (detached) and its
        target tokens."""
        def run(half):
            loss, n = loss_of(half)
            grads = torch.autograd.grad(loss, params, allow_unused=True) if n else [None] * len(params)
            return loss.detach(), n, grads

        results = self.map(run, split_rows(batch, self.workers))
        total = sum(n for _, n, _ in results)
        weights = [n / total if total else 1.0 / len(results) for _, n, _ in results]
        for i, p in enumerate(params):
            grad = None
            for (_, n, grads), w in zip(results, weights):  # fixed order: first half, then second
                if grads[i] is None:
                    continue
                grad = grads[i] * w if grad is None else grad.add_(grads[i], alpha=w)
            p.grad = grad
        loss = sum(l * w for (l, n, _), w in zip(results, weights) if n) if total else results[0][0]
        return loss, total

    def map(self, fn, items) -> list:
        """[fn(item) for item in items], run on the workers (at most two at once), in order."""
        return list(self.pool.map(fn, items))

    def close(self):
        self.pool.shutdown(wait=True)
