"""Prefix-tuning: `prefix` (P' through the MLP, the paper) and `prefix-flat` (P trained directly)."""
from __future__ import annotations

from dataclasses import replace

import torch

from ..io import save_prefix
from ..modeling import lm_loss, single_prefix_kv
from ..models import model_name
from ..prefix import PrefixConfig, build_prefix_encoder
from .base import Method


class PrefixMethod(Method):
    def __init__(self, name, model, tokenizer, spec, config: PrefixConfig):
        if name == "prefix-flat":
            config = replace(config, reparam=False)
        self.name, self.model, self.spec, self.config = name, model, spec, config
        self.module = build_prefix_encoder(model, tokenizer, spec, config)
        # A flat P has no MLP to smooth its updates and needs a much larger rate (measured here).
        self.default_lr = 5e-4 if config.reparam else 5e-3

    def loss(self, module, batch):
        p = module()
        return lm_loss(self.model, self.spec, batch, single_prefix_kv(p, self.spec, batch["input_ids"].shape[0]))

    @torch.no_grad()
    def prefix_p(self) -> dict[str, torch.Tensor]:
        """P with the MLP applied and dropped: what gets exported."""
        was_training = self.module.training
        self.module.eval()
        p = {g: t.detach().float().cpu() for g, t in self.module().items()}
        self.module.train(was_training)
        return p

    def export(self, path, metadata: dict):
        return save_prefix(path, self.prefix_p(), self.spec, model_name(self.model), metadata)

    def shipped_parameters(self) -> int:
        return sum(t.numel() for t in self.prefix_p().values())
