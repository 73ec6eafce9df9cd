"""The one place that knows how transformers runs attention and stores past keys and values.

Prefixes enter the frozen model inside attention: we register an attention
function ("prefixtune") that prepends each row's prefix keys/values to the keys
and values of every attention it is given a prefix for (decoder self-attention,
encoder self-attention, cross-attention) and widens the mask to match. The
prefix travels as a keyword argument (`prefix_kv`) that transformers passes
through every layer down to the attention function. In training, scoring and
decoding the prefix is that argument only, never in transformers' own cache:
  * positions and masks of the real tokens are computed exactly as without a
    prefix;
  * each row of a batch can carry its own prefix, of its own length (serving);
  * gradient checkpointing works (the prefix is an argument of the layer call,
    so recomputation sees it), where PEFT refuses to run.
The engine's HF path (engine/generic.py) passes a row's paged entries (its prefix and its tokens so
far) as that row's `prefix_kv`, and takes the new tokens' keys/values back through `capture`.
Training on a CPU runs `grouped_attention` (below) instead of SDPA, whose CPU kernels are slow
for the short sequences prefix-tuning trains on; inference keeps SDPA.
When transformers changes its attention or cache API, this file changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache, EncoderDecoderCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from .architectures import architecture, attention_modules

ATTN_IMPLEMENTATION = "prefixtune"
SLOT_ATTR = "_prefixtune_slot"  # set on each attention module: "decoder.3", "encoder.0", "cross.5"


@dataclass
class PrefixKV:
    """Per-row prefix keys and values for one forward pass.

    keys/values: slot -> (batch, kv_heads, prefix_len, head_dim), already in the
    model's key space (for RoPE models: the keys as they would sit in the cache).
    mask: (batch, prefix_len) bool; rows with shorter prefixes are padded with False. Or
    (batch, query_len, prefix_len) where queries see different entries (an infix row prefilled by
    the engine: its earlier tokens see the row's own entries, not the infix's).
    query_visible: optional (batch, query_len) bool; a False query does not see the
    prefix (used by infix, where the source must not attend to it).
    capture: when a dict, the attention function records every slot's keys/values
    into it instead (used to initialise a prefix from real words).
    """

    keys: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    mask: torch.Tensor | None = None
    query_visible: torch.Tensor | None = None
    capture: dict | None = None

    def select(self, rows: torch.Tensor) -> "PrefixKV":
        """The same prefixes for a re-indexed batch (beam expansion, dropping finished rows)."""
        return PrefixKV(
            keys={s: k.index_select(0, rows) for s, k in self.keys.items()},
            values={s: v.index_select(0, rows) for s, v in self.values.items()},
            mask=None if self.mask is None else self.mask.index_select(0, rows),
            query_visible=None if self.query_visible is None else self.query_visible.index_select(0, rows),
        )


def _unmask_empty_rows(mask: torch.Tensor) -> torch.Tensor:
    """A query that sees nothing (left padding of a row without a prefix) would give NaN and
    poison later layers; let it see everything instead: its output is never read."""
    return mask | ~mask.any(dim=-1, keepdim=True)


def _bool_mask(module, attention_mask, q_len, k_len, device):
    """The real tokens' mask as (batch|1, 1, q, k) bool, whatever transformers handed us."""
    if attention_mask is None:
        if getattr(module, "is_causal", False) and q_len > 1:
            # bottom-right aligned causal: query i sees keys up to i + (k - q)
            q = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
            return (torch.arange(k_len, device=device)[None, :] <= q)[None, None]
        return torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device)
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return attention_mask[:, :, -q_len:, -k_len:] if attention_mask.shape[-1] >= k_len else attention_mask


def prefix_attention(module, query, key, value, attention_mask, prefix_kv: PrefixKV | None = None, **kwargs):
    slot = getattr(module, SLOT_ATTR, None)
    if prefix_kv is not None and prefix_kv.capture is not None and slot is not None:
        prefix_kv.capture[slot] = (key.detach(), value.detach())
    if prefix_kv is None or slot not in prefix_kv.keys:
        if _grouped_applies(query, kwargs):
            mask = _unmask_empty_rows(_bool_mask(module, attention_mask, query.shape[2], key.shape[2], query.device))
            return grouped_attention(query, key, value, mask, kwargs.get("scaling"))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    pk, pv = prefix_kv.keys[slot], prefix_kv.values[slot]
    batch, _, q_len, _ = query.shape
    k_len, p_len = key.shape[2], pk.shape[2]
    real = _bool_mask(module, attention_mask, q_len, k_len, query.device).expand(batch, 1, q_len, k_len)
    mask = prefix_kv.mask
    seen = (mask[:, None, -q_len:] if mask.dim() == 3 else mask[:, None, None, :]).expand(batch, 1, q_len, p_len)
    if prefix_kv.query_visible is not None:
        seen = seen & prefix_kv.query_visible[:, None, -q_len:, None]
    mask = _unmask_empty_rows(torch.cat([seen, real], dim=-1))
    position_bias = kwargs.pop("position_bias", None)
    if position_bias is not None:  # T5: prefix slots have no relative position, so no bias
        position_bias = F.pad(position_bias, (p_len, 0))
    key = torch.cat([pk.to(key.dtype), key], dim=2)
    value = torch.cat([pv.to(value.dtype), value], dim=2)
    if position_bias is None and _grouped_applies(query, kwargs):
        return grouped_attention(query, key, value, mask, kwargs.get("scaling"))
    return sdpa_attention_forward(module, query, key, value, mask, position_bias=position_bias, **kwargs)


def _grouped_applies(query: torch.Tensor, kwargs: dict) -> bool:
    """Training on a CPU: SDPA's kernels are slow there for the short sequences prefix-tuning trains
    on (the flash kernel's backward; the math kernel upcasts bf16 to float32 and repeats keys/values
    per query head): `grouped_attention` trains 2-3x faster per attention (benchmarks/train_profile.py).
    The choice depends only on the call itself, so gradient checkpointing recomputes with the same
    path. Inference and accelerators keep SDPA; so do calls that need what it alone does (T5's
    position bias, attention dropout, soft-capping, sinks)."""
    return (query.device.type == "cpu" and torch.is_grad_enabled() and not kwargs.get("dropout")
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and kwargs.get("s_aux") is None)


def grouped_attention(query, key, value, mask, scaling=None):
    """softmax(q k^T * scaling, masked) v for (batch, heads, q, dim) queries and (batch, kv_heads, k, dim)
    keys/values. The query heads that share a key/value head are stacked into one matmul, so keys and
    values are never repeated per head; scores are computed in the inputs' dtype and the softmax in
    float32, as transformers' eager attention does. `mask`: bool, broadcastable to (batch, 1, q, k);
    True = may attend. Returns (output as (batch, q, heads, dim), None), like transformers' attention
    functions."""
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scaling = dim ** -0.5 if scaling is None else scaling
    scores = query.reshape(batch, kv_heads, groups * q_len, dim) @ key.transpose(-1, -2)
    # the mask as an additive float32 bias, so scaling, upcast and masking are one pass (bitwise the same:
    # 0 + s * scaling rounds as s * scaling does) and its backward one multiply
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    scores = torch.add(bias.unsqueeze(2), scores.view(batch, kv_heads, groups, q_len, k_len), alpha=scaling)
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(batch, kv_heads, groups * q_len, k_len)
    out = (probs @ value).view(batch, heads, q_len, dim)
    return out.transpose(1, 2).contiguous(), None


def _always_mask(*args, **kwargs):
    # Our attention needs an explicit mask to widen: never let transformers skip it for is_causal.
    kwargs["allow_is_causal_skip"] = False
    kwargs.pop("allow_is_bidirectional_skip", None)
    mask = sdpa_mask(*args, **kwargs)
    return _unmask_empty_rows(mask) if mask is not None and mask.dtype == torch.bool else mask


AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, _always_mask)


def install(model):
    """Route the model's attention through prefix_attention (idempotent; a model without a prefix is unchanged)."""
    for slot, module in attention_modules(model).items():
        setattr(module, SLOT_ATTR, slot)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def enable_gradient_checkpointing(model):
    """Recompute layer activations in backward. Works with a prefix (it is a layer-call argument).

    transformers only checkpoints layers in training mode; the frozen model stays in eval
    mode (no dropout), so only the layer containers themselves are flagged as training.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    dropout_attrs = architecture(model.config).layer_dropout_attrs
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = True
            # Some layers (BART) apply dropout with their own training flag: keep it off.
            for name in dropout_attrs:
                if isinstance(getattr(module, name, None), float):
                    setattr(module, name, 0.0)
    return model


def new_cache(model):
    """An empty cache for incremental decoding (the engine's encoder-decoder rows: engine/generic.py)."""
    if model.config.is_encoder_decoder:
        return EncoderDecoderCache(DynamicCache(), DynamicCache())
    return DynamicCache()


