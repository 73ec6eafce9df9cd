"""Precision: whether a device computes bf16 natively (`bf16_available`, for training and decoding alike),
and frozen weights for bf16 training: each frozen matmul weight cast to bf16 once, not at every call.

Under autocast a Linear casts its float32 weight to bf16 at every call, and autocast's cache keeps
a cast only for weights that require grad: a frozen model's weights are cast again at every step
(SmolLM2-135M: ~270 MB written per step, the tied LM head alone 57 MB). `FrozenBf16Weights` holds
bf16 copies and swaps them into the Linears for the length of a `with` block. Inside autocast the
result is bitwise the same: autocast rounds the same float32 weight the same way, once per call
instead of once per training run. Outside the block the model is exactly as before (state dicts,
exports and float32 callers see float32), so the block should hold one step, nothing else.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .llama_training import FusedLlamaLayers


def bf16_available(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


class FrozenBf16Weights:
    """`with FrozenBf16Weights(model, ...):` frozen float32 `nn.Linear` weights read as bf16 copies.

    Only weights that do not require grad are swapped (a trained weight changes every step; autocast
    already casts it once per forward). A weight shared by several Linears gets one copy; a weight
    tied to an embedding is swapped in the Linear only, so embedding lookups stay float32. Use only
    under bf16 autocast: a float32 input meets a bf16 weight outside it and fails loudly. `skip`: Linears
    left float32 because another path multiplies by its own copy (the fused Llama layers).
    """

    def __init__(self, *modules: nn.Module, skip=()):
        copies: dict[int, nn.Parameter] = {}
        self.swaps: list[tuple[nn.Module, nn.Parameter, nn.Parameter]] = []
        seen: set[int] = {id(module) for module in skip}
        for root in modules:
            for module in root.modules():
                weight = module._parameters.get("weight") if isinstance(module, nn.Linear) else None
                if id(module) in seen or weight is None or weight.requires_grad or weight.dtype != torch.float32:
                    continue
                seen.add(id(module))
                if id(weight) not in copies:
                    copies[id(weight)] = nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False)
                self.swaps.append((module, weight, copies[id(weight)]))

    def __enter__(self):
        for module, _, low in self.swaps:
            module._parameters["weight"] = low
        return self

    def __exit__(self, *exc):
        for module, original, _ in self.swaps:
            module._parameters["weight"] = original
        return False


class FrozenBf16Step:
    """What a bf16 training step of a frozen model runs inside, built once per run: the frozen weights'
    bf16 copies (`FrozenBf16Weights`) and frozen Llama layers on fused weights (llama_training.py).
    train.py and the users trainer both enter it, so a user's prefix trained in a joint job is the one a
    separate run trains. Reusable: `with step:` at every step."""

    def __init__(self, *modules: nn.Module):
        fused = FusedLlamaLayers(*modules)
        # the Linears the fused layers replace keep float32 weights: their bf16 copies would go unused (~0.2 GB)
        self.contexts = (FrozenBf16Weights(*modules, skip=fused.replaced), fused)

    def __enter__(self):
        self.stack = contextlib.ExitStack()
        for context in self.contexts:
            self.stack.enter_context(context)

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)
