"""`infix` (the paper's INFIX-k, [x; INFIX; y]): trainable activations at every layer that x does not see.

The infix is a prefix-shaped set of keys/values (P' through the MLP, as `prefix`)
that enters attention through `PrefixKV.query_visible`: in a decoder-only model
only the last source token (which predicts y_1, where the infix would sit) and the
target tokens attend to it; the rest of x is computed exactly as without it. For
BART/T5, x lives in the encoder, so the infix is a decoder self-attention prefix
only (no encoder or cross-attention activations). The length is
`TrainConfig.prefix_len`. Positions follow the prefix convention (x starts at k),
the same in training and decoding (the engine decodes it: `Request(infix=True)`).
"""
from __future__ import annotations

import torch

from ..forward import lm_loss, single_prefix_kv
from ..prefix import build_prefix_encoder
from .base import Method, generate_texts, save_weights


def source_only_hidden(labels: torch.Tensor) -> torch.Tensor:
    """(batch, len) bool: True from the last source token on (right-padded training batches)."""
    first_target = (labels != -100).int().argmax(-1)
    return torch.arange(labels.shape[1], device=labels.device)[None, :] >= (first_target - 1)[:, None]


class InfixMethod(Method):
    def __init__(self, name, model, tokenizer, spec, train_config):
        self.name, self.model, self.tokenizer, self.spec = name, model, tokenizer, spec
        self.template, self.max_source_len = train_config.template, train_config.max_source_len
        config = train_config.prefix_config()
        self.module = build_prefix_encoder(model, tokenizer, spec, config)
        if spec.family == "encoder-decoder":  # keep the decoder self-attention group only
            for group in [g for g in self.module.groups if g != "decoder"]:
                if config.reparam:
                    del self.module.embeddings[group]
                    del self.module.mlps[group]
                else:
                    del self.module.prefix[group]
            self.module.groups = {"decoder": self.module.groups["decoder"]}
        self.default_lr = 5e-4 if config.reparam else 5e-3
        self.exported_p: dict[str, torch.Tensor] | None = None  # set by load_export: decode with a shipped P

    def loss(self, module, batch):
        kv = single_prefix_kv(module(), self.spec, batch["input_ids"].shape[0])
        if self.spec.family == "decoder":
            kv.query_visible = source_only_hidden(batch["labels"])
        return lm_loss(self.model, self.spec, batch, kv)

    @torch.no_grad()
    def infix_p(self) -> dict[str, torch.Tensor]:
        if self.exported_p is not None:
            return self.exported_p
        was_training = self.module.training
        self.module.eval()
        p = {g: t.detach().float() for g, t in self.module().items()}
        self.module.train(was_training)
        return p

    def export(self, path, metadata: dict):
        return save_weights(path, {f"infix.{g}": t for g, t in self.infix_p().items()}, self, metadata)

    def load_export(self, tensors):
        self.exported_p = {name[len("infix."):]: t.float() for name, t in tensors.items()}

    def shipped_parameters(self) -> int:
        return sum(t.numel() for t in self.infix_p().values())

    @torch.no_grad()
    def generate(self, sources, config=None, batch_size=32, progress=None):
        p = {g: t.to(self.model.device) for g, t in self.infix_p().items()}
        return generate_texts(self, sources, config, batch_size, progress, prefix=p, infix=True)
