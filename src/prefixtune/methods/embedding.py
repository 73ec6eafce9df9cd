"""`embedding-only` (the paper's EMB-k): k trainable virtual-token embeddings at the input layer only.

Like prompt tuning: the frozen model reads `[v_1..v_k; x; y]` where the v's are free
input embeddings; no layer above the input has trainable activations (contrast
with `prefix`, whose keys/values are free at every layer). The length k is
`TrainConfig.prefix_len`. For BART/T5 the virtual tokens go in front of the
encoder input.

Positions: the virtual tokens take positions 0..k-1 and x starts at k, in training
and decoding alike (the engine prefills them before the prompt: `Request.prefix_embeds`).
Init: "random" draws each coordinate from N(0, s^2) with s the standard deviation of
the model's embedding table (scale-matched); "words:<text>" starts at the
embeddings of those tokens, repeated to fill k slots.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..forward import position_ids
from .base import Method, generate_texts, save_weights


class VirtualTokens(nn.Module):
    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.embeddings = nn.Parameter(init.detach().clone())

    def forward(self) -> torch.Tensor:
        return self.embeddings


def initial_embeddings(model, tokenizer, length: int, init: str) -> torch.Tensor:
    table = model.get_input_embeddings()
    if init.startswith("words:"):
        ids = tokenizer(init[len("words:"):], add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"init text {init!r} has no tokens")
        ids = (ids * (length // len(ids) + 1))[:length]
        with torch.no_grad():
            return table(torch.tensor(ids, device=table.weight.device)).float()
    if init != "random":
        raise ValueError(f"init must be 'random' or 'words:<text>', got {init!r}")
    std = table.weight.detach().float().std().item()
    return torch.randn(length, table.weight.shape[1], device=table.weight.device) * std


class EmbeddingMethod(Method):
    def __init__(self, name, model, tokenizer, spec, train_config):
        self.name, self.model, self.tokenizer, self.spec = name, model, tokenizer, spec
        self.template, self.max_source_len = train_config.template, train_config.max_source_len
        self.length = train_config.prefix_len
        if self.length < 1:
            raise ValueError(f"embedding-only needs prefix_len >= 1, got {self.length}")
        self.module = VirtualTokens(initial_embeddings(model, tokenizer, self.length, train_config.init))
        # Input-only prompts need a large rate (prompt tuning: 3e-1 with Adafactor; PEFT's examples: 3e-2).
        # Measured here (EMB-10, 400 E2E pairs, 60 steps of 8, BLEU on 30 dev MRs): 3e-3 39.0, 1e-2 37.3, 3e-2 41.6.
        self.default_lr = 3e-2

    def loss(self, module, batch):
        v = module()
        ids, mask = batch["input_ids"], batch["attention_mask"]
        b, k = ids.shape[0], v.shape[0]
        emb = self.model.get_input_embeddings()(ids)
        inputs = torch.cat([v.unsqueeze(0).expand(b, -1, -1).to(emb.dtype), emb], dim=1)
        full_mask = torch.cat([torch.ones(b, k, dtype=mask.dtype, device=mask.device), mask], dim=1)
        labels = batch["labels"]
        if self.spec.family == "encoder-decoder":
            out = self.model(inputs_embeds=inputs, attention_mask=full_mask,
                             decoder_input_ids=batch["decoder_input_ids"],
                             decoder_attention_mask=batch["decoder_attention_mask"], use_cache=False)
            selected = labels != -100
            logits, targets = out.logits[selected], labels[selected]
        else:
            hidden = self.model.base_model(inputs_embeds=inputs, attention_mask=full_mask,
                                           position_ids=position_ids(full_mask), use_cache=False).last_hidden_state
            hidden = hidden[:, k:]                 # the real tokens; their positions start at k
            next_labels = labels[:, 1:]
            selected = next_labels != -100
            logits = self.model.get_output_embeddings()(hidden[:, :-1][selected])
            targets = next_labels[selected]
        return F.cross_entropy(logits.float(), targets), int(selected.sum())

    def export(self, path, metadata: dict):
        return save_weights(path, {"embeddings": self.module.embeddings}, self, metadata)

    def load_export(self, tensors):
        with torch.no_grad():
            self.module.embeddings.copy_(tensors["embeddings"])

    @torch.no_grad()
    def generate(self, sources, config=None, batch_size=32, progress=None):
        v = self.module().detach().to(self.model.device)
        return generate_texts(self, sources, config, batch_size, progress, prefix_embeds=v)
