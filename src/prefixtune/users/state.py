"""One user's training state: their prefix module, AdamW, schedule, batches, dev loss, best step and RNG.

Nothing here is shared between users: each user has their own optimizer (so Adam's step count, moments
and weight decay see only their gradients), their own learning-rate schedule over their own number of
steps, their own length-grouped batches (the same ones `train.train` draws for that user's data alone),
and their own random generator state for prefix dropout.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field

import torch

from ..checkpoint import trained_state
from ..data.collate import length_grouped_batches
from ..train import early_stop_due, lr_lambda
from ..train_config import TrainConfig


@dataclass
class UserState:
    user: str
    name: str                          # the prefix name in the store
    examples: list[dict]               # encoded training pairs
    dev_examples: list[dict]
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    total_steps: int
    steps_per_epoch: int
    lengths: list[int]
    batch_size: int
    seed: int
    rng: torch.Tensor | None = None    # the generator state for prefix dropout (None: no dropout)
    step: int = 0
    best: dict = field(default_factory=lambda: {"loss": None, "step": None, "state": None})
    history: list = field(default_factory=list)
    stopped_early: bool = False
    diverged: bool = False             # a non-finite training loss: stopped there, the best step kept
    last_loss: float | None = None
    train_losses: list = field(default_factory=list)  # since the last dev evaluation: its mean is logged
    _epoch: int | None = None
    _batches: list = field(default_factory=list)

    @classmethod
    def create(cls, user: str, name: str, examples: list[dict], dev_examples: list[dict], template_module,
               config: TrainConfig, lr: float, family: str, rng: torch.Tensor | None) -> "UserState":
        module = copy.deepcopy(template_module)  # every user starts where a lone run with this seed starts
        module.train()
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr,
                                      weight_decay=config.weight_decay)
        steps_per_epoch = math.ceil(len(examples) / config.batch_size)
        total = config.max_steps or max(1, int(config.epochs * steps_per_epoch))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.warmup_steps, total))
        lengths = [len(e["input_ids"]) + len(e["labels"]) * (family != "decoder") for e in examples]
        return cls(user, name, examples, dev_examples, module, optimizer, scheduler, total, steps_per_epoch,
                   lengths, config.batch_size, config.seed, None if rng is None else rng.clone())

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps or self.stopped_early or self.diverged

    def next_batch(self) -> list[dict]:
        """This user's batch for their next step: `train.train`'s length-grouped batches of their data alone."""
        epoch, offset = divmod(self.step, self.steps_per_epoch)
        if self._epoch != epoch:
            self._epoch, self._batches = epoch, length_grouped_batches(self.lengths, self.batch_size,
                                                                       seed=self.seed * 100003 + epoch)
        return [self.examples[i] for i in self._batches[offset]]

    def prefix(self, device: torch.device) -> dict[str, torch.Tensor]:
        """P for this step, under the user's own generator (dropout). In float32 even in a bf16 job, as
        `methods.prefix.PrefixMethod.loss` computes it: through a bf16 MLP, a user's prefix differed from the one
        `train` gives their rows alone by 0.3-0.7% of the largest |P| (tiny Llama, 6 steps), 6e-8 in float32."""
        with self._own_rng(device), torch.autocast(device.type, enabled=False):
            return self.module()

    def step_with(self, p: dict[str, torch.Tensor], leaves: dict[str, torch.Tensor], grad_clip: float):
        """One optimizer step once `leaves` (step.gradient_leaves(p)) hold the gradient of the loss with respect
        to this step's P: back through the user's MLP, clipped by this user's own norm, AdamW, schedule."""
        through = [g for g in p if leaves[g] is not p[g]]  # P made by an MLP (or dropout), not P itself
        if through:
            torch.autograd.backward([p[g] for g in through], [leaves[g].grad.to(p[g].dtype) for g in through])
        if grad_clip:  # per user: a global norm over all users would couple them
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def check_finite(self):
        """As `train.train`: a NaN/inf training loss stops this user, keeping their best step; with none, one error
        (else their prefix would be written to the store, and served, with weights that give NaN)."""
        if math.isfinite(self.last_loss):
            return
        if self.best["state"] is None:
            raise ValueError(f"user {self.user!r}: training diverged: the loss is {self.last_loss} at step "
                             f"{self.step}, before any dev loss was measured; lower --lr (or try --precision fp32)")
        self.diverged = True

    @contextlib.contextmanager
    def _own_rng(self, device: torch.device):
        if self.rng is None:
            yield
            return
        cuda = device.type == "cuda"
        get, put = (torch.cuda.get_rng_state, torch.cuda.set_rng_state) if cuda else (torch.get_rng_state,
                                                                                    torch.set_rng_state)
        saved = get()
        put(self.rng)
        try:
            yield
        finally:
            self.rng = get()
            put(saved)

    def eval_due(self, eval_every: int) -> bool:
        return bool(eval_every and self.step % eval_every == 0) or self.step == self.total_steps

    def record(self, logs: dict, patience: int):
        """Log a step's dev loss, keep the best state, and decide early stopping, as `train.train` does."""
        dev = logs.get("dev_loss")
        if self.train_losses:  # as train.py's history: the mean train loss since the previous evaluation
            logs["train_loss"], self.train_losses = sum(self.train_losses) / len(self.train_losses), []
        if dev is not None and math.isfinite(dev) and (self.best["loss"] is None or dev < self.best["loss"]):
            self.best = {"loss": dev, "step": self.step, "state": copy.deepcopy(trained_state(self.module))}
        self.history.append(logs)
        self.stopped_early = early_stop_due(self.history, self.best["step"], patience)

    def state_bytes(self) -> int:
        """Bytes this user holds between steps: parameters, AdamW moments, and the best state kept."""
        tensors = list(self.module.parameters())
        tensors += [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        if self.best["state"] is not None:
            tensors += list(self.best["state"].values())
        return sum(t.numel() * t.element_size() for t in tensors)
