"""The one table of model families: everything prefixtune knows per `model_type`.

Like PEFT's TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING, keyed by
`config.model_type`. A model type without its own entry falls back to the
BART-style entry (encoder-decoder models) or the Llama-style one (decoder-only:
Llama, Mistral, Qwen2, SmolLM). Adding a family is one `Architecture` entry.

GGUF files need no per-family fix-up today: the one fix-up (dropping the
quantisation marker once dequantised) holds for every family, in `models.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class Shapes:
    """The attention shapes a prefix depends on (see `models.ModelSpec`)."""

    num_layers: int          # decoder layers
    num_encoder_layers: int  # 0 for decoder-only models
    num_kv_heads: int
    head_dim: int
    hidden_size: int


@dataclass(frozen=True)
class Architecture:
    shapes: Callable[[object], Shapes]                                 # config -> shapes
    layers: Callable[[nn.Module], tuple[list, list]]                   # model -> (encoder layers, decoder layers)
    self_attention: Callable[[nn.Module], nn.Module]                   # layer -> its self-attention
    adapter_sites: Callable[[nn.Module], list[tuple[nn.Module, str]]]  # layer -> (parent, attr) of output projections
    decoder_layers_name: str                                           # parameter-name prefix of the decoder layers
    cross_attention: Callable[[nn.Module], nn.Module] | None = None    # decoder layer -> cross-attention
    # float attributes on a layer that apply dropout with the layer's own training flag; kept at 0
    # when gradient checkpointing flags the (eval-mode) layer as training
    layer_dropout_attrs: tuple[str, ...] = ()


def _gpt2_shapes(cfg) -> Shapes:
    return Shapes(cfg.n_layer, 0, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.n_embd)


def _t5_shapes(cfg) -> Shapes:
    return Shapes(cfg.num_decoder_layers, cfg.num_layers, cfg.num_heads, cfg.d_kv, cfg.d_model)


def _bart_shapes(cfg) -> Shapes:
    heads = cfg.decoder_attention_heads
    return Shapes(cfg.decoder_layers, cfg.encoder_layers, heads, cfg.d_model // heads, cfg.d_model)


def _llama_shapes(cfg) -> Shapes:
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads  # grouped-query attention
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return Shapes(cfg.num_hidden_layers, 0, kv_heads, head_dim, cfg.hidden_size)


GPT2 = Architecture(_gpt2_shapes, lambda m: ([], list(m.transformer.h)), lambda b: b.attn,
                    lambda b: [(b.attn, "c_proj"), (b.mlp, "c_proj")], "transformer.h")
T5 = Architecture(
    shapes=_t5_shapes,
    layers=lambda m: (list(m.encoder.block), list(m.decoder.block)),
    self_attention=lambda b: b.layer[0].SelfAttention,
    adapter_sites=lambda b: [(b.layer[0].SelfAttention, "o"), (b.layer[-1].DenseReluDense, "wo")],
    decoder_layers_name="decoder.block",
    cross_attention=lambda b: b.layer[1].EncDecAttention,
)
BART = Architecture(  # BART, mBART, ... : the default for encoder-decoder models
    shapes=_bart_shapes,
    layers=lambda m: (list(m.get_encoder().layers), list(m.get_decoder().layers)),
    self_attention=lambda l: l.self_attn,
    adapter_sites=lambda l: [(l.self_attn, "out_proj"), (l, "fc2")],
    decoder_layers_name="model.decoder.layers",
    cross_attention=lambda l: l.encoder_attn,
    layer_dropout_attrs=("dropout", "activation_dropout"),
)
# Llama, Mistral, Qwen2, SmolLM: the default for decoder-only models
LLAMA = Architecture(_llama_shapes, lambda m: ([], list(m.base_model.layers)), lambda l: l.self_attn,
                     lambda l: [(l.self_attn, "o_proj"), (l.mlp, "down_proj")], "model.layers")

ARCHITECTURES: dict[str, Architecture] = {"gpt2": GPT2, "t5": T5, "bart": BART, "llama": LLAMA}


def architecture(config) -> Architecture:
    """The table entry for a model's config (a model type without an entry gets its kind's default)."""
    found = ARCHITECTURES.get(config.model_type)
    if found is not None:
        return found
    return BART if getattr(config, "is_encoder_decoder", False) else LLAMA


def attention_modules(model) -> dict[str, nn.Module]:
    """slot name ("decoder.3", "encoder.0", "cross.5") -> attention module."""
    arch = architecture(model.config)
    encoder, decoder = arch.layers(model)
    slots = {f"encoder.{i}": arch.self_attention(l) for i, l in enumerate(encoder)}
    for i, l in enumerate(decoder):
        slots[f"decoder.{i}"] = arch.self_attention(l)
        if arch.cross_attention is not None:
            slots[f"cross.{i}"] = arch.cross_attention(l)
    return slots


def adapter_sites(model) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every projection an adapter follows: attention output and MLP output, per layer."""
    arch = architecture(model.config)
    encoder, decoder = arch.layers(model)
    return [site for layer in encoder + decoder for site in arch.adapter_sites(layer)]


def top_layers(model, count: int = 2) -> dict[str, nn.Module]:
    """name -> module of the top `count` transformer layers (of the decoder stack for BART/T5)."""
    arch = architecture(model.config)
    layers = arch.layers(model)[1]
    first = max(0, len(layers) - count)
    return {f"{arch.decoder_layers_name}.{i}": layers[i] for i in range(first, len(layers))}
