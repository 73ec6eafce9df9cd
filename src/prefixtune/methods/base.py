"""The interface every training method implements."""
from __future__ import annotations

import torch
from torch import nn


class Method:
    """A way of adapting a frozen model: owns the trainable module and computes the loss.

    `module` is what the trainer optimises (and what accelerate wraps for several
    processes); `loss` must call the module it is given (the wrapped one) so that
    gradients synchronise.
    """

    name: str
    module: nn.Module
    default_lr: float = 5e-5

    def loss(self, module: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def export(self, path, metadata: dict):
        """Write what users ship for this method."""
        raise NotImplementedError

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)

    def shipped_parameters(self) -> int:
        """Parameters in the exported artefact (for prefixes: P without the MLP)."""
        return self.trainable_parameters()
