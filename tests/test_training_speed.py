"""The training fast paths give what the plain paths give: grouped attention (CPU training) against SDPA,
and bf16 weight copies against autocast's own casts."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from conftest import FAMILIES, tiny_model
from prefixtune import cache
from prefixtune.cache import grouped_attention
from prefixtune.data.collate import Collator, encode_pair
from prefixtune.methods import build_method
from prefixtune.models import model_spec
from prefixtune.precision import FrozenBf16Weights
from prefixtune.train_config import TrainConfig

PAIRS = [("name : Aromi | food : Thai", "Aromi serves Thai food."), ("name : Zizzi", "Zizzi is a pub."),
         ("area : riverside | name : The Mill | price : cheap", "The Mill is cheap and by the river.")]


def make_batch(model, tokenizer):
    spec = model_spec(model)
    examples = [encode_pair(tokenizer, spec.family, s, t) for s, t in PAIRS]
    return Collator(tokenizer.pad_token_id, spec.family, getattr(model.config, "decoder_start_token_id", None))(examples)


def attention_inputs(dtype, batch=3, heads=6, kv_heads=2, q_len=7, k_len=11, dim=8):
    torch.manual_seed(0)
    q = torch.randn(batch, heads, q_len, dim, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, k_len, dim, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, k_len, dim, dtype=dtype, requires_grad=True)
    mask = torch.rand(batch, 1, q_len, k_len) > 0.4
    mask[..., 0] = True  # every query sees something (prefix_attention guarantees it)
    return q, k, v, mask


def sdpa_reference(q, k, v, mask, scaling):
    groups = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(groups, 1),
                                         v.float().repeat_interleave(groups, 1), attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)


def test_grouped_attention_equals_sdpa_with_repeated_keys_float32():
    q, k, v, mask = attention_inputs(torch.float32)
    grad_out = torch.randn(3, 7, 6, 8)
    results = []
    for attend in (lambda: grouped_attention(q, k, v, mask, 0.3)[0], lambda: sdpa_reference(q, k, v, mask, 0.3)):
        out = attend()
        (gq, gk, gv) = torch.autograd.grad(out, (q, k, v), grad_out)
        results.append((out, gq, gk, gv))
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_grouped_attention_in_bf16_stays_near_float32():
    """bf16 scores (transformers' eager attention does the same), float32 softmax: within bf16's resolution."""
    q, k, v, mask = attention_inputs(torch.bfloat16)
    out = grouped_attention(q, k, v, mask, 0.3)[0]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), sdpa_reference(q, k, v, mask, 0.3), atol=3e-2, rtol=3e-2)


def prefix_loss_and_grads(family, tokenizer, dtype=torch.float32):
    model = tiny_model(family)
    spec = model_spec(model)
    method = build_method("prefix", model, tokenizer, spec, TrainConfig(prefix_len=4, mlp_dim=16))
    torch.manual_seed(1)
    for p in method.module.parameters():  # a trained-looking MLP, not its zero-mean init
        p.data.normal_(0, 0.5)
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss, _ = method.loss(method.module, make_batch(model, tokenizer))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in method.module.parameters()]


@pytest.mark.parametrize("family", FAMILIES)
def test_training_attention_gives_sdpa_loss_and_gradients(family, tokenizer, monkeypatch):
    calls = []
    fast = cache.grouped_attention
    monkeypatch.setattr(cache, "grouped_attention", lambda *a, **k: calls.append(1) or fast(*a, **k))
    loss, grads = prefix_loss_and_grads(family, tokenizer)
    if family != "t5":  # T5's position bias stays with SDPA
        assert calls, "the grouped path was not taken"
    monkeypatch.setattr(cache, "_grouped_applies", lambda query, kwargs: False)
    calls.clear()
    plain_loss, plain_grads = prefix_loss_and_grads(family, tokenizer)
    assert not calls
    torch.testing.assert_close(loss, plain_loss, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_scoring_without_gradients_keeps_sdpa(tokenizer, monkeypatch):
    calls = []
    monkeypatch.setattr(cache, "grouped_attention", lambda *a, **k: calls.append(1))
    model = tiny_model("llama")
    spec = model_spec(model)
    method = build_method("prefix", model, tokenizer, spec, TrainConfig(prefix_len=4, mlp_dim=16))
    with torch.no_grad():
        method.loss(method.module, make_batch(model, tokenizer))
    assert not calls


@pytest.mark.parametrize("family,method_name", [("llama", "prefix"), ("gpt2", "prefix"), ("llama", "adapter"),
                                                ("llama", "finetune-top2")])
def test_bf16_weight_copies_give_autocasts_exact_loss_and_gradients(family, method_name, tokenizer):
    runs = []
    for copies in (False, True):
        model = tiny_model(family)
        spec = model_spec(model)
        torch.manual_seed(0)
        method = build_method(method_name, model, tokenizer, spec, TrainConfig(method=method_name, prefix_len=4, mlp_dim=16))
        for p in method.module.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.1)
        trainable = {n: p for n, p in method.module.named_parameters() if p.requires_grad}
        before = {id(p): p for m in method.loss_modules() for p in m.parameters()}
        frozen = FrozenBf16Weights(*method.loss_modules())
        if copies:
            assert frozen.swaps
        with frozen if copies else contextlib.nullcontext():
            with torch.autocast("cpu", torch.bfloat16):
                loss, _ = method.loss(method.module, make_batch(model, tokenizer))
                if copies:  # embeddings (tied to GPT-2's head) stay float32; trained weights are never copied
                    assert model.get_input_embeddings().weight.dtype == torch.float32
                    assert all(p.dtype == torch.float32 for p in trainable.values())
            loss.backward()
        after = {id(p): p for m in method.loss_modules() for p in m.parameters()}
        assert after.keys() == before.keys() and all(p.dtype == torch.float32 for p in after.values())
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in trainable.items()}))
    (loss, grads), (copied_loss, copied_grads) = runs
    assert torch.equal(loss, copied_loss)
    assert grads.keys() == copied_grads.keys() and grads
    for name in grads:
        assert torch.equal(grads[name], copied_grads[name]), name


def test_bf16_copies_skip_the_shared_model_for_copy_methods(tokenizer):
    model = tiny_model("llama")
    method = build_method("adapter", model, tokenizer, model_spec(model), TrainConfig(method="adapter"))
    swapped = {id(m) for m, _, _ in FrozenBf16Weights(*method.loss_modules()).swaps}
    assert swapped and not swapped & {id(m) for m in model.modules()}
