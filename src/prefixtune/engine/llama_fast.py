"""A lean decoding step for the Llama family, run directly on the HF module's weights.

It reproduces transformers' Llama forward operation for operation in the same dtype (RMSNorm in
fp32, RoPE cos/sin from the model's own `inv_freq`, SDPA, a single query's heads packed by key/value
head, repeat_kv for a multi-token query), and in bf16 a row's bits never depend on the rows around it
(`exact`, the default; all measured on this CPU, and tested):
  * bf16 matmuls run on oneDNN's packed weights, whose kernel gives a row the same bits at any number
    of rows from 2 to 2,100: so a prefill runs every admitted prompt's tokens through one matmul per
    weight, and a decode step all running rows. A lone row runs as two, since oneDNN's one-row kernel
    sums otherwise (`_Linear`);
  * a decode step attends in one SDPA call per layer, every row padded (masked, zeros) to the
    longest row rounded up to `PAD` (16) entries and to a block. The CPU flash kernel's sums depend on
    the padded length, but not on how far past a row's own 16-rounded length it goes: a row padded to
    any multiple of 16 gets the bits it gets padded to its own (measured: lengths 1..1,100, batches
    1..64, 1 and 2 threads; multiples of 8 are not enough). So a row alone and in any batch agree;
  * a prefill attends per prompt over exactly its own keys (unpadded, as transformers does).
So a decode step's bits are not transformers' unpadded SDPA's in their last place, but they are the
row's own. fp32 rows are not batch-invariant: MKL's fp32 matmuls give a row other last bits in a
batch (so before paging too); there an exact prefill still runs one matmul per prompt, as alone, and
`exact=False` runs all prompts through one (in bf16 `exact=False` changes nothing: exactness no
longer costs there).
What it drops against the HF forward is the per-call machinery: q/k/v and gate/up are one matmul each
(concatenated once), bf16 weights are prepacked for oneDNN once, RoPE is applied to queries and keys in
one pass with a precomputed table, keys and values reach the rows' `PagedKV` blocks in one indexed copy
per layer, and attention reads them with one gather per layer (its index and mask built once a step).
"""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .kv import PagedKV

PAD = 16  # a decode step pads each row's keys to a multiple of this; more padding leaves a row's bits (8: not so)


def supports(model) -> bool:
    """Models this step reproduces exactly: plain Llama (SmolLM2, Llama 2/3 with default RoPE)."""
    cfg = model.config
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    plain = (cfg.model_type == "llama" and not cfg.attention_bias and not getattr(cfg, "mlp_bias", False)
             and cfg.hidden_act == "silu" and rope == "default" and getattr(cfg, "pretraining_tp", 1) == 1)
    return plain and _unmodified(model)


def _unmodified(model) -> bool:
    """The step reads the projections' weights directly, so it decodes only what it knows: plain Linears,
    and output projections (o, down) followed by a bottleneck adapter (`_adapter_of`). A model changed
    otherwise (another wrapper, a hook) would be decoded without the change, so it takes the HF path."""
    try:
        layers = model.model.layers
    except AttributeError:
        return False
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        for proj in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            if type(proj) is not torch.nn.Linear:
                return False
        for proj in (a.o_proj, m.down_proj):
            if type(proj) is not torch.nn.Linear and _adapter_of(proj) is None:
                return False
    return not any(mod._forward_hooks or mod._forward_pre_hooks for mod in model.modules())


def _adapter_of(proj):
    """(the Linear, the adapter) of a projection followed by a Houlsby bottleneck adapter, h + up(relu(down h))
    (methods/adapter.py's WithAdapter, which says so with `residual_relu_bottleneck`); else None. So the
    adapter baselines decode here too: SmolLM2 with adapter-0.1%, beam 5, one thread, took 1.46x the CPU time
    on the HF forward in bf16 and 1.08x in fp32 (benchmarks/decode_adapter.py)."""
    if not getattr(type(proj), "residual_relu_bottleneck", False):
        return None
    inner, adapter = proj.inner, proj.adapter
    plain = all(type(x) is torch.nn.Linear for x in (inner, adapter.down, adapter.up))
    return (inner, adapter) if plain and inner.bias is None else None


# Rows per packed matmul call. oneDNN's bf16 kernels give a row the same bits at 2..32 rows on every CPU
# measured; past 32 rows it depends on the CPU: the same at 2..2,100 rows on the AMX core first measured,
# but on an AVX10.1/AMX core other bits for some rows at 33..512 rows (every SmolLM2 weight shape, one thread).
ROW_BLOCK = 32


class _Linear:
    """y = x @ W.T. bf16 weights are reordered once into oneDNN's blocked layout: bit-identical to
    F.linear at two rows or more, 1.5-2x faster at 32-64 rows on one AVX512/AMX core (measured here),
    and row-invariant (`rows_independent`: a row's bits are the same at any number of rows: one row runs
    as two, and more than ROW_BLOCK rows run in blocks of ROW_BLOCK)."""

    def __init__(self, weight: torch.Tensor, batch_hint: int, bias: torch.Tensor | None = None, relu: bool = False):
        self.weight, self.packed, self.bias, self.relu = weight, None, bias, relu
        if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and torch.backends.mkldnn.is_available():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
                self.weight = None  # the packed copy is all we need
            except (RuntimeError, AttributeError):
                self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            act = "relu" if self.relu else "none"  # fused into the matmul's epilogue, as the bias
            if x.shape[0] > ROW_BLOCK:  # a prefill's tokens: in blocks whose bits every CPU measured keeps
                return torch.cat([self(x[r: r + ROW_BLOCK]) for r in range(0, x.shape[0], ROW_BLOCK)])
            if x.shape[0] == 1:
                # oneDNN runs one row on another kernel, whose sums differ in the last bit (SmolLM2's
                # down projection, K=1536: ~10% of rows, measured); 2..64 rows all agree. So one row
                # runs as two, and a row decoded alone gets the bits it gets in any batch.
                return torch.ops.mkldnn._linear_pointwise(x.repeat(2, 1), self.packed, self.bias, act, [], "")[:1]
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, act, [], "")
        y = F.linear(x, self.weight, self.bias)
        return y.relu_() if self.relu else y

    @property
    def rows_independent(self) -> bool:
        return self.packed is not None

    def segments(self, x: torch.Tensor, bounds: list[tuple[int, int]], exact: bool = True) -> torch.Tensor:
        """Rows of several requests: one matmul where a row's bits do not depend on the others (packed
        bf16), else one per request's rows, as each would run alone."""
        if len(bounds) == 1 or self.rows_independent or not exact:
            return self(x)
        return torch.cat([self(x[a:b]) for a, b in bounds])


class _Bottleneck:
    """An adapter after an output projection, y + up(relu(down y)) as `Adapter.forward` (methods/adapter.py),
    on `_Linear`s (packed and row-invariant in bf16, as the projections; bias and relu fused)."""

    def __init__(self, down: _Linear, up: _Linear):
        self.down, self.up = down, up

    def __call__(self, y: torch.Tensor, bounds=None, exact: bool = True) -> torch.Tensor:
        if bounds is None:
            return y + self.up(self.down(y))
        return y + self.up.segments(self.down.segments(y, bounds, exact), bounds, exact)


def _after(adapter, y, bounds=None, exact=True):
    return y if adapter is None else adapter(y, bounds, exact)


def _rms_norm(x, weight, eps):
    # transformers' LlamaRMSNorm (fp32 inside, then the weight in the model dtype); F.rms_norm gives
    # the same bits as its pow/mean/rsqrt in fewer ops
    return weight * F.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=eps).to(x.dtype)


class LlamaFast:
    def __init__(self, model, kv: PagedKV, dtype: torch.dtype, exact: bool = True):
        cfg = model.config
        self.kv, self.exact = kv, exact
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.rep = self.heads // self.kv_heads
        self.scale = self.head_dim ** -0.5
        self.inter = cfg.intermediate_size
        self.q_dim, self.kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.dtype = dtype
        hint = kv.max_batch

        def w(t):
            return t.detach().to(dtype).contiguous()

        def linear(module, relu=False):
            return _Linear(w(module.weight), hint, None if module.bias is None else w(module.bias), relu)

        def output(proj):  # an output projection, and the adapter after it (None: a plain Linear)
            inner, adapter = _adapter_of(proj) or (proj, None)
            return linear(inner), None if adapter is None else _Bottleneck(linear(adapter.down, relu=True),
                                                                          linear(adapter.up))

        self.layers = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            (o, o_adapter), (down, down_adapter) = output(a.o_proj), output(m.down_proj)
            self.layers.append(SimpleNamespace(
                ln1=w(layer.input_layernorm.weight), eps1=layer.input_layernorm.variance_epsilon,
                qkv=_Linear(torch.cat([w(a.q_proj.weight), w(a.k_proj.weight), w(a.v_proj.weight)]), hint),
                o=o, o_adapter=o_adapter,
                ln2=w(layer.post_attention_layernorm.weight), eps2=layer.post_attention_layernorm.variance_epsilon,
                gate_up=_Linear(torch.cat([w(m.gate_proj.weight), w(m.up_proj.weight)]), hint),
                down=down, down_adapter=down_adapter))
        self.embed = w(model.model.embed_tokens.weight)
        self.norm, self.norm_eps = w(model.model.norm.weight), model.model.norm.variance_epsilon
        self.lm_head = _Linear(w(model.lm_head.weight), hint)
        # RoPE as transformers computes it: fp32 angles from the model's inv_freq (which a model cast
        # to bf16 holds rounded), cast to the dtype; looked up by position. rotate_half(x) * sin equals
        # x.roll(half) * [-sin, sin] bit for bit (a sign flip is exact), one op instead of four.
        rotary = model.model.rotary_emb
        positions = torch.arange(kv.max_len, dtype=torch.float32)
        freqs = positions[:, None] * rotary.inv_freq.to(torch.float32)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        half = self.head_dim // 2
        self.cos = (emb.cos() * rotary.attention_scaling).to(dtype)
        sin = (emb.sin() * rotary.attention_scaling).to(dtype)
        self.sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)

    def _rope_in_place(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """RoPE on the query and key heads of a fused projection (tokens, q_dim + 2 kv_dim), in place."""
        qk = qkv[:, : self.q_dim + self.kv_dim].view(-1, self.heads + self.kv_heads, self.head_dim)
        rotated = qk.roll(self.head_dim // 2, -1).mul_(sin)
        torch.add(qk * cos, rotated, out=qk)

    def _mlp(self, layer, h, bounds=None):
        x = _rms_norm(h, layer.ln2, layer.eps2)
        gu = layer.gate_up(x) if bounds is None else layer.gate_up.segments(x, bounds, self.exact)
        act = F.silu(gu[:, : self.inter]).mul_(gu[:, self.inter:])
        out = layer.down(act) if bounds is None else layer.down.segments(act, bounds, self.exact)
        return h.add_(_after(layer.down_adapter, out, bounds, self.exact))

    @torch.no_grad()
    def prefill(self, batch: list[tuple[int, torch.Tensor | None, list[int]]], totals: list[int] | None = None
                ) -> torch.Tensor:
        """Prefill rows, or a chunk of each: (slot, prefix P or None, prompt tokens). A prefix starts the
        slot's row (its blocks attached); the tokens follow what the slot holds already. `totals`: the
        entries each row holds once its whole prompt is in; a chunk attends over that many keys, the
        ones not written yet masked, so its queries get the bits of the whole prompt's prefill (the CPU
        flash kernel's sums depend on the key length). Returns each row's last-position logits in fp32,
        (rows, vocab)."""
        kv = self.kv
        bounds, spans, slots, positions, ids = [], [], [], [], []
        start = 0
        for slot, prefix, prompt in batch:
            if prefix is not None:
                kv.attach_prefix(slot, prefix)
            p, n = kv.length(slot), len(prompt)
            bounds.append((start, start + n))
            spans.append((p, n))
            slots += [slot] * n
            positions += range(p, p + n)
            ids += prompt
            start += n
        index = kv.write_index(slots, positions)
        positions = torch.tensor(positions)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]    # (tokens, 1, D)
        # query i of a row (position p + i) sees entries 0..p+i: the prefix, earlier chunks, the prompt up to itself
        totals = totals or [p + n for p, n in spans]
        masks = [(torch.arange(t)[None, :] <= torch.arange(p, p + n)[:, None])[None, None]
                 for (p, n), t in zip(spans, totals)]
        rows = [slot for slot, _, _ in batch]
        h = self.embed[torch.tensor(ids)]
        for i, layer in enumerate(self.layers):
            x = _rms_norm(h, layer.ln1, layer.eps1)
            qkv = layer.qkv.segments(x, bounds, self.exact)
            self._rope_in_place(qkv, cos, sin)
            kv.flat(i).index_copy_(0, index, qkv[:, self.q_dim:].reshape(-1, self.head_dim))
            entries, starts = kv.gather(i, rows)
            outs = []
            for (a, b), (p, n), s, t, mask in zip(bounds, spans, starts, totals, masks):
                q = qkv[a:b, : self.q_dim].view(n, self.heads, self.head_dim).transpose(0, 1)
                keys, values = entries[0, :, s: s + t], entries[1, :, s: s + t]
                if keys.shape[1] < t:  # a chunk: the keys still to come, as zeros (masked)
                    keys, values = (F.pad(x, (0, 0, 0, t - x.shape[1])) for x in (keys, values))
                if self.rep > 1:  # transformers' repeat_kv for a multi-token query
                    shape = (self.kv_heads, self.rep, t, self.head_dim)
                    keys = keys[:, None].expand(shape).reshape(self.heads, t, self.head_dim)
                    values = values[:, None].expand(shape).reshape(self.heads, t, self.head_dim)
                o = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask, scale=self.scale)
                outs.append(o[0].transpose(0, 1).reshape(n, self.q_dim))
            out = layer.o.segments(torch.cat(outs) if len(outs) > 1 else outs[0], bounds, self.exact)
            h.add_(_after(layer.o_adapter, out, bounds, self.exact))
            h = self._mlp(layer, h, bounds)
        last = torch.tensor([b - 1 for _, b in bounds])
        h = _rms_norm(h[last], self.norm, self.norm_eps)
        return torch.cat([self.lm_head(h[r: r + 32]) for r in range(0, len(bounds), 32)]).float()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, slots: list[int] | None = None) -> torch.Tensor:
        """One token for each of `slots` (default: 0..B-1) at its position; fp32 logits (B, vocab)."""
        kv = self.kv
        b = tokens.shape[0]
        slots, where = list(range(b)) if slots is None else slots, positions.tolist()
        index = kv.write_index(slots, where)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]   # (B, 1, D)
        # every row padded to the step's span (zeros, masked): its bits are those of the row padded to its
        # own blocks, alone (module docstring); built once a step, read by every layer
        span = self._span(max(where) + 1)
        blocks = kv.padded_index(slots, span)
        visible = torch.arange(span)[None, :] <= positions[:, None]
        mask = torch.zeros(b, 1, 1, span, dtype=self.dtype).masked_fill_(~visible[:, None, None], float("-inf"))
        h = self.embed[tokens]
        for i, layer in enumerate(self.layers):
            x = _rms_norm(h, layer.ln1, layer.eps1)
            qkv = layer.qkv(x)
            self._rope_in_place(qkv, cos, sin)
            kv.flat(i).index_copy_(0, index, qkv[:, self.q_dim:].reshape(-1, self.head_dim))
            # one query: its heads packed by key/value head (transformers' pack_gqa), no repeat_kv
            q = qkv[:, : self.q_dim].view(b, self.kv_heads, self.rep, self.head_dim)
            keys, values = kv.padded(i, blocks, b, span)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
            # h is the step's own (the embedding lookup copies)
            h.add_(_after(layer.o_adapter, layer.o(o.reshape(b, self.q_dim))))
            h = self._mlp(layer, h)
        h = _rms_norm(h, self.norm, self.norm_eps)
        return self.lm_head(h).float()

    def sharing(self, kv: PagedKV) -> "LlamaFast":
        """This step over another KV (a replica's, replicas.py), reading the same weights: nothing is
        copied or packed again. The weights are read only, so replicas may decode concurrently."""
        if kv.max_len > self.kv.max_len:  # the RoPE table covers max_len positions
            raise ValueError(f"a sharing KV's max_len {kv.max_len} exceeds {self.kv.max_len}")
        step = copy.copy(self)
        step.kv = kv
        return step

    def _span(self, entries: int) -> int:
        quantum = math.lcm(PAD, self.kv.block_size)
        return -(-entries // quantum) * quantum

    def move(self, src: int, dst: int, length: int):
        self.kv.move(src, dst, length)

    def release(self, slot: int):
        self.kv.release(slot)

    def fork(self, src: int, dst: int, length: int):
        self.kv.fork(src, dst, length)
