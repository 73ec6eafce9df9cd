"""A leaner training forward for Llama decoder layers whose weights are frozen, under bf16 autocast.

transformers' Llama layer runs q/k/v as three matmuls and gate/up as two, each casting the same
float32 normed activations to bf16 again; applies RoPE in float32 to bf16 queries and keys through
a mixed-dtype chain (its result cast to bf16 again by the attention matmul); and lets autograd
differentiate RMSNorm through a dozen small operations. `FusedLlamaLayers` swaps, for the length of
a `with` block (one step), the forward of each frozen `LlamaAttention`, `LlamaMLP` and their
RMSNorms for one that:
  * multiplies by q/k/v concatenated and by gate/up concatenated (bf16 copies made once per run):
    one cast of the input, bigger matmuls, one input-gradient matmul instead of three plus sums;
    every frozen projection runs on oneDNN-prepacked weights (`_frozen_matmul`);
  * applies RoPE in float32 to queries and keys together and hands the attention bf16 (`_QkvRope`);
  * computes RMSNorm as transformers does and hands the next matmul bf16, with a hand-written
    backward (`_RmsNorm`).
The forward is bitwise transformers' under bf16 autocast (the same float32 arithmetic, rounded to
bf16 where autocast rounded it); gradients differ only in summation order (they are accumulated in
float32 where autograd summed some in bf16). Trained weights are never swapped: a layer with a
weight that requires grad (fine-tuning) keeps transformers' forward, and so does anything that is
not exactly transformers' Llama (other models, decoding with a cache). Output projections wrapped
by adapters are called as modules, so the adapters still run. Measured in docs/training_speed.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama import modeling_llama as llama


def _frozen_linears(*linears) -> bool:
    return all(type(l) is nn.Linear and l.bias is None and not l.weight.requires_grad
               and l.weight.dtype == torch.float32 for l in linears)


def _frozen_norm(norm) -> bool:
    return type(norm) is llama.LlamaRMSNorm and not norm.weight.requires_grad


def _swap_halves(x):
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], x[..., :half]), dim=-1)


class _QkvRope(torch.autograd.Function):
    """(batch, len, heads + 2 kv_heads, dim) bf16 projections and float32 cos/sin (batch, len, dim) ->
    queries, keys and values as (batch, heads, len, dim) in the input's dtype. RoPE is transformers'
    `x * cos + rotate_half(x) * sin` in float32, rounded once (where the attention matmul's autocast
    rounded it), applied to queries and keys together; the backward writes one gradient for the
    projections (no cat of three)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, heads):
        half = qkv.shape[-1] // 2
        # rotate_half(x) * sin == swap_halves(x) * (-sin | sin), bitwise (a product's sign is exact): one op less
        cos, sin = cos.unsqueeze(1), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(1)
        ctx.save_for_backward(cos, sin)
        rotated_heads = qkv.shape[2] - (qkv.shape[2] - heads) // 2  # queries and keys
        x = qkv[:, :, :rotated_heads].transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        qk = torch.empty(x.shape, dtype=qkv.dtype, device=qkv.device)
        torch.add(x * cos, _swap_halves(x) * sin, out=qk)  # the float32 sum, rounded as it is stored
        return qk[:, :heads], qk[:, heads:], qkv[:, :, rotated_heads:].transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        cos, sin = ctx.saved_tensors
        batch, heads, length, dim = grad_q.shape
        kv_heads = grad_k.shape[1]
        g = torch.empty(batch, heads + kv_heads, length, dim, dtype=torch.float32, device=grad_q.device)
        g[:, :heads], g[:, heads:] = grad_q, grad_k
        grad = torch.empty(batch, length, heads + 2 * kv_heads, dim, dtype=grad_q.dtype, device=grad_q.device)
        # swapping halves is its own transpose
        torch.add(g * cos, _swap_halves(g * sin), out=grad[:, :, :heads + kv_heads].transpose(1, 2))
        grad[:, :, heads + kv_heads:] = grad_v.transpose(1, 2)
        return grad, None, None, None


class _SwiGlu(torch.autograd.Function):
    """silu(gate) * up of the concatenated (gate | up) projections, as transformers computes it; the
    backward writes one gradient for both halves (no cat)."""

    @staticmethod
    def forward(ctx, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate, up, act)
        return act * up

    @staticmethod
    def backward(ctx, grad):
        gate, up, act = ctx.saved_tensors
        out = torch.empty(*grad.shape[:-1], 2 * grad.shape[-1], dtype=grad.dtype, device=grad.device)
        width = grad.shape[-1]
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=out[..., :width])
        torch.mul(grad, act, out=out[..., width:])
        return out


class _RmsNorm(torch.autograd.Function):
    """transformers' LlamaRMSNorm of a float32 input with a frozen weight, returned in `dtype`."""

    @staticmethod
    def forward(ctx, x, weight, eps, dtype):
        x = x.float()
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        normed = x * rstd
        ctx.save_for_backward(normed, rstd, weight)
        return torch.mul(weight, normed, out=torch.empty(x.shape, dtype=dtype, device=x.device))  # rounded as stored

    @staticmethod
    def backward(ctx, grad):
        normed, rstd, weight = ctx.saved_tensors
        wg = grad.float() * weight
        return rstd * (wg - normed * (wg * normed).mean(-1, keepdim=True)), None, None, None


class _PackedMatmul(torch.autograd.Function):
    """x @ W.T with W frozen, forward and input gradient each on a oneDNN-prepacked bf16 copy (W and W.T)."""

    @staticmethod
    def forward(ctx, x, packed, packed_t):
        ctx.packed_t, ctx.dtype = packed_t, x.dtype
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        return torch.ops.mkldnn._linear_pointwise(flat, packed, None, "none", [], "").view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        flat = grad.reshape(-1, grad.shape[-1]).to(torch.bfloat16)
        out = torch.ops.mkldnn._linear_pointwise(flat, ctx.packed_t, None, "none", [], "")
        return out.view(*grad.shape[:-1], -1).to(ctx.dtype), None, None


def _frozen_matmul(weight: torch.Tensor, rows_hint: int = 512):
    """x -> x @ weight.T under bf16 autocast. On a CPU with oneDNN the bf16 weight is reordered once into
    oneDNN's blocked layout, and so is its transpose for the backward: each matmul then skips the reorder
    (bitwise F.linear's result at two rows or more, measured; 2-8% faster at these shapes); elsewhere F.linear."""
    low = weight.detach().to(torch.bfloat16)
    if low.device.type == "cpu" and torch.backends.mkldnn.is_available():
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(low, rows_hint)
            packed_t = torch.ops.mkldnn._reorder_linear_weight(low.t().contiguous(), rows_hint)
            return lambda x: _PackedMatmul.apply(x, packed, packed_t)
        except (RuntimeError, AttributeError):
            pass
    return lambda x: F.linear(x, low)


def _norm_forward(norm):
    def forward(hidden_states):
        if hidden_states.dtype != torch.float32 or not torch.is_autocast_enabled(hidden_states.device.type):
            return type(norm).forward(norm, hidden_states)
        dtype = torch.get_autocast_dtype(hidden_states.device.type)
        return _RmsNorm.apply(hidden_states, norm.weight, norm.variance_epsilon, dtype)
    return forward


def _attention_forward(attn, qkv_weight):
    heads, kv_heads = attn.config.num_attention_heads, attn.config.num_key_value_heads
    qkv_proj = _frozen_matmul(qkv_weight)
    o_proj = _frozen_matmul(attn.o_proj.weight) if _frozen_linears(attn.o_proj) else attn.o_proj  # else: adapters

    def forward(hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if cache is not None or position_embeddings is None:  # decoding: transformers' own path
            return type(attn).forward(attn, hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        batch, length, _ = hidden_states.shape
        qkv = qkv_proj(hidden_states).view(batch, length, heads + 2 * kv_heads, attn.head_dim)
        q, k, v = _QkvRope.apply(qkv, *position_embeddings, heads)
        attend = llama.ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                              llama.eager_attention_forward)
        dropout = attn.attention_dropout if attn.training else 0.0
        out, weights = attend(attn, q, k, v, attention_mask, dropout=dropout, scaling=attn.scaling, **kwargs)
        return o_proj(out.reshape(batch, length, -1)), weights
    return forward


def _mlp_forward(mlp, gate_up_weight):
    gate_up_proj = _frozen_matmul(gate_up_weight)
    down_proj = _frozen_matmul(mlp.down_proj.weight) if _frozen_linears(mlp.down_proj) else mlp.down_proj

    def forward(x):
        return down_proj(_SwiGlu.apply(gate_up_proj(x)))
    return forward


class FusedLlamaLayers:
    """`with FusedLlamaLayers(model, ...):` the frozen Llama attentions, MLPs and their norms run the forward
    above. The concatenated bf16 weights are made here, once; use only under bf16 autocast (the block is
    meant to hold one training step, like `FrozenBf16Weights`)."""

    def __init__(self, *modules: nn.Module):
        self.patches: list[tuple[nn.Module, object]] = []
        self.replaced: list[nn.Linear] = []  # Linears whose weights the patched forwards never read (own copies)
        seen: set[int] = set()
        for root in modules:
            for layer in root.modules():
                if type(layer) is not llama.LlamaDecoderLayer or id(layer) in seen:
                    continue
                seen.add(id(layer))
                attn, mlp = layer.self_attn, layer.mlp
                if type(attn) is llama.LlamaAttention and _frozen_linears(attn.q_proj, attn.k_proj, attn.v_proj):
                    weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
                    self.patches.append((attn, _attention_forward(attn, weight)))
                    self.replaced += [attn.q_proj, attn.k_proj, attn.v_proj]
                    self.replaced += [attn.o_proj] if _frozen_linears(attn.o_proj) else []
                    if _frozen_norm(layer.input_layernorm):
                        self.patches.append((layer.input_layernorm, _norm_forward(layer.input_layernorm)))
                if (type(mlp) is llama.LlamaMLP and mlp.config.hidden_act == "silu"
                        and _frozen_linears(mlp.gate_proj, mlp.up_proj)):
                    weight = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
                    self.patches.append((mlp, _mlp_forward(mlp, weight)))
                    self.replaced += [mlp.gate_proj, mlp.up_proj]
                    self.replaced += [mlp.down_proj] if _frozen_linears(mlp.down_proj) else []
                    if _frozen_norm(layer.post_attention_layernorm):
                        self.patches.append((layer.post_attention_layernorm,
                                             _norm_forward(layer.post_attention_layernorm)))

    def __enter__(self):
        for module, forward in self.patches:
            module.forward = forward  # an instance attribute: nn.Module.__call__ finds it first
        return self

    def __exit__(self, *exc):
        for module, _ in self.patches:
            module.__dict__.pop("forward", None)
        return False
