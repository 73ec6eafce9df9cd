"""The prefix: P' and the reparameterising MLP that map to P, the per-layer keys and values.

P for one attention group is a matrix `prefix_len x (layers x 2 x kv_heads x head_dim)`,
as in the paper. Decoder-only models have one group ("decoder"); encoder-decoder
models have three ("encoder", "decoder", "cross"), each with its own P' and MLP.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import cache
from .models import ModelSpec

LAYOUT = "prefix_len x (layers x 2 x kv_heads x head_dim)"


@dataclass
class PrefixConfig:
    prefix_len: int = 10
    mlp_dim: int = 512          # d': width of P' and of the MLP's hidden layer
    reparam: bool = True        # train P' through the MLP (the paper); False trains P directly
    dropout: float = 0.0        # dropout on P during training
    init: str = "random"        # "random" or "words:<text>", e.g. "words:table-to-text:"

    def __post_init__(self):
        if self.prefix_len < 1:
            raise ValueError(f"prefix_len must be >= 1, got {self.prefix_len}")
        if self.mlp_dim < 1:
            raise ValueError(f"mlp_dim must be >= 1, got {self.mlp_dim}")
        if not (self.init == "random" or self.init.startswith("words:")):
            raise ValueError(f"init must be 'random' or 'words:<text>', got {self.init!r}")
        if self.init.startswith("words:") and not self.init[len("words:"):]:
            raise ValueError("init 'words:' needs some text after the colon")

def groups_of(spec: ModelSpec) -> dict[str, int]:
    """Attention groups and their layer counts."""
    if spec.family == "encoder-decoder":
        return {"encoder": spec.num_encoder_layers, "decoder": spec.num_layers, "cross": spec.num_layers}
    return {"decoder": spec.num_layers}


def group_width(spec: ModelSpec, layers: int) -> int:
    return layers * 2 * spec.num_kv_heads * spec.head_dim


def p_to_kv(p: torch.Tensor, spec: ModelSpec, group: str) -> tuple[dict, dict]:
    """P (..., len, layers*2*H*D) -> slot -> keys (..., H, len, D) and values."""
    *lead, length, width = p.shape
    layers = width // (2 * spec.num_kv_heads * spec.head_dim)
    x = p.reshape(*lead, length, layers, 2, spec.num_kv_heads, spec.head_dim)
    x = x.movedim(-4, 0).movedim(-3, 1)           # layers, 2, ..., len, H, D
    x = x.transpose(-3, -2)                       # layers, 2, ..., H, len, D
    # unbind, not x[i, 0]: the backward of one unbind stacks the slots' gradients once, where each
    # indexing's backward would zero-fill a tensor of x's full size (2 x layers of them per step)
    keys, values = {}, {}
    for i, (k, v) in enumerate(t.unbind(0) for t in x.unbind(0)):
        keys[f"{group}.{i}"], values[f"{group}.{i}"] = k, v
    return keys, values


def kv_to_p(keys: dict, values: dict, group: str, layers: int) -> torch.Tensor:
    """Inverse of p_to_kv for one unbatched group: slot -> (H, len, D) -> (len, layers*2*H*D)."""
    x = torch.stack([torch.stack([keys[f"{group}.{i}"], values[f"{group}.{i}"]]) for i in range(layers)])
    x = x.transpose(-3, -2)                       # layers, 2, len, H, D
    return x.movedim(2, 0).reshape(x.shape[2], -1)


class PrefixEncoder(nn.Module):
    """Holds the trainable prefix and produces P for every group."""

    def __init__(self, spec: ModelSpec, config: PrefixConfig):
        super().__init__()
        self.spec, self.config = spec, config
        self.groups = groups_of(spec)
        self.dropout = nn.Dropout(config.dropout)
        L, d = config.prefix_len, config.mlp_dim
        if config.reparam:
            # nn.Embedding-style N(0, 1) init for P', default Linear init for the MLP (the paper's code).
            self.embeddings = nn.ParameterDict({g: nn.Parameter(torch.randn(L, d)) for g in self.groups})
            self.mlps = nn.ModuleDict({
                g: nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, group_width(spec, n)))
                for g, n in self.groups.items()
            })
        else:
            self.prefix = nn.ParameterDict({
                g: nn.Parameter(torch.randn(L, group_width(spec, n)) * 0.02) for g, n in self.groups.items()
            })

    def forward(self) -> dict[str, torch.Tensor]:
        """P per group, (prefix_len, layers*2*H*D)."""
        if self.config.reparam:
            out = {g: self.mlps[g](self.embeddings[g]) for g in self.groups}
        else:
            out = {g: self.prefix[g] for g in self.groups}
        return {g: self.dropout(p) for g, p in out.items()}

    @torch.no_grad()
    def init_from_targets(self, targets: dict[str, torch.Tensor]):
        """Make P equal `targets` (group -> (len, width)), e.g. the activations of real words.

        With the MLP on, P' and the first layer keep their random init and the last
        layer is solved in closed form (least squares, exact while len <= d'), so the
        MLP starts out producing exactly the target activations.
        """
        for g, target in targets.items():
            target = target.to(torch.float32)
            if not self.config.reparam:
                self.prefix[g].copy_(target)
                continue
            hidden = self.mlps[g][1](self.mlps[g][0](self.embeddings[g]))  # (len, d')
            last = self.mlps[g][2]
            last.bias.zero_()
            solution = torch.linalg.pinv(hidden.double()) @ target.double()  # (d', width)
            last.weight.copy_(solution.T.to(last.weight.dtype))


def word_activations(model, tokenizer, spec: ModelSpec, text: str, length: int) -> dict[str, torch.Tensor]:
    """Keys/values the frozen model computes for `text`, per group, as (length, width).

    The text's tokens are repeated until they fill `length` slots and cut there, so
    every prefix slot holds the activation of a real token in a real context.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"init text {text!r} has no tokens")
    ids = (ids * (length // len(ids) + 1))[:length]
    input_ids = torch.tensor([ids], device=model.device)
    captured: dict = {}
    probe = cache.PrefixKV(capture=captured)
    cache.install(model)
    with torch.no_grad():
        if spec.family == "encoder-decoder":
            model(input_ids=input_ids, decoder_input_ids=input_ids, prefix_kv=probe, use_cache=False)
        else:
            model(input_ids=input_ids, prefix_kv=probe, use_cache=False)
    targets = {}
    for g, n in groups_of(spec).items():
        keys = {s: captured[s][0][0] for s in captured if s.startswith(g + ".")}
        values = {s: captured[s][1][0] for s in captured if s.startswith(g + ".")}
        targets[g] = kv_to_p(keys, values, g, n)
    return targets


def build_prefix_encoder(model, tokenizer, spec: ModelSpec, config: PrefixConfig, seed: int | None = None) -> PrefixEncoder:
    if seed is not None:
        torch.manual_seed(seed)
    encoder = PrefixEncoder(spec, config)
    if config.init.startswith("words:"):
        text = config.init[len("words:"):]
        encoder.init_from_targets(word_activations(model, tokenizer, spec, text, config.prefix_len))
    return encoder.to(model.device)
