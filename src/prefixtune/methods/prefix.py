"""Prefix-tuning: `prefix` (P' through the MLP, the paper) and `prefix-flat` (P trained directly)."""
from __future__ import annotations

import json
from dataclasses import replace

import torch

from ..prefix_file import save_prefix
from ..forward import lm_loss, single_prefix_kv
from ..models import model_name
from ..prefix import build_prefix_encoder
from .base import Method


class PrefixMethod(Method):
    def __init__(self, name, model, tokenizer, spec, train_config):
        config = train_config.prefix_config()
        if name == "prefix-flat":
            config = replace(config, reparam=False)
        self.name, self.model, self.tokenizer, self.spec, self.config = name, model, tokenizer, spec, config
        self.template = train_config.template
        self.module = build_prefix_encoder(model, tokenizer, spec, config)
        # A flat P has no MLP to smooth its updates and needs a much larger rate (measured here).
        self.default_lr = 5e-4 if config.reparam else 5e-3

    def loss(self, module, batch):
        # P in float32 even under bf16 autocast: the MLP is a sliver of the step's work, and autocast
        # would cast its 6M-weight last layer to bf16 (and that weight's gradient back) at every step.
        with torch.autocast(batch["input_ids"].device.type, enabled=False):
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
        """Write P; a file named prefix.safetensors makes its folder an HF-style prefix folder, with a model card."""
        from ..interop.card import find_scores
        from ..interop.folders import PREFIX_FILE
        from ..interop.hub import save_card
        from ..prefix_file import load_prefix
        from .base import count_parameters

        metadata = {**metadata, "base_params": count_parameters(self.model)}
        target = save_prefix(path, self.prefix_p(), self.spec, model_name(self.model), metadata)
        if target.name == PREFIX_FILE:
            save_card(load_prefix(target), target.parent, scores=find_scores(target.parent))
        return target

    def shipped_parameters(self) -> int:
        return sum(t.numel() for t in self.prefix_p().values())

    def generate(self, sources, config=None, batch_size=32, progress=None):
        from ..bank import PrefixBank
        from ..prefix_file import ExportedPrefix

        bank = PrefixBank(self.model, self.tokenizer)
        metadata = {"fingerprint": self.spec.fingerprint(), "train_config": json.dumps({"template": self.template})}
        bank.add(self.name, ExportedPrefix(self.prefix_p(), metadata))
        return bank.generate(sources, self.name, config, batch_size=batch_size, progress=progress)
