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
from prefixtune.llama_training import FusedLlamaLayers
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


def tiny_method(method_name, tokenizer):
    """A tiny Llama and a method on it whose trained parameters are random (not zero-initialised)."""
    model = tiny_model("llama")
    torch.manual_seed(0)
    method = build_method(method_name, model, tokenizer, model_spec(model),
                          TrainConfig(method=method_name, prefix_len=4, mlp_dim=16))
    for p in method.module.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    return model, method


def fused_run(method_name, fused: bool, tokenizer):
    """(loss, trained gradients, frozen weights after the step, patched modules) of one bf16 step on tiny Llama."""
    model, method = tiny_method(method_name, tokenizer)
    layers = FusedLlamaLayers(*method.loss_modules())
    with FrozenBf16Weights(*method.loss_modules()), layers if fused else contextlib.nullcontext():
        with torch.autocast("cpu", torch.bfloat16):
            loss, _ = method.loss(method.module, make_batch(model, tokenizer))
        loss.backward()
    trained = {n: p.grad.clone() for m in method.loss_modules() for n, p in m.named_parameters() if p.requires_grad}
    frozen = {n: p for m in method.loss_modules() for n, p in m.named_parameters() if not p.requires_grad}
    assert all(p.grad is None for p in frozen.values()), "a gradient reached a frozen weight"
    return loss.detach(), trained, {n: p.detach().clone() for n, p in frozen.items()}, layers


@pytest.mark.parametrize("method_name", ["prefix", "adapter", "finetune-top2"])
def test_fused_llama_layers_give_transformers_loss_and_gradients(method_name, tokenizer):
    loss, grads, frozen, _ = fused_run(method_name, False, tokenizer)
    fused_loss, fused_grads, fused_frozen, layers = fused_run(method_name, True, tokenizer)
    patched = {type(m).__name__ for m, _ in layers.patches}
    # trained layers keep transformers' forward (the tiny model's 2 layers are finetune-top2's top 2)
    assert patched == (set() if method_name == "finetune-top2" else {"LlamaAttention", "LlamaMLP", "LlamaRMSNorm"})
    assert all("forward" not in vars(m) for m, _ in layers.patches), "a patched forward outlived the block"
    assert torch.equal(loss, fused_loss)  # the forward is bitwise transformers' under autocast
    assert grads.keys() == fused_grads.keys() and grads
    for name in grads:  # gradients differ in summation order only (float32 where autograd summed in bf16)
        torch.testing.assert_close(fused_grads[name], grads[name], atol=1e-4, rtol=2e-2)
    assert sum(g.abs().sum() for g in fused_grads.values()) > 0
    assert frozen.keys() == fused_frozen.keys()
    assert all(torch.equal(frozen[n], fused_frozen[n]) for n in frozen)


def test_fused_llama_layers_leave_other_models_alone(tokenizer):
    assert not FusedLlamaLayers(tiny_model("gpt2")).patches
    model = tiny_model("llama")
    for p in model.model.layers[1].parameters():
        p.requires_grad_(True)  # a trained layer (finetune-top2) keeps transformers' forward
    fused = {"LlamaAttention", "LlamaMLP", "LlamaRMSNorm"}
    assert {id(m) for m, _ in FusedLlamaLayers(model).patches} == {
        id(m) for m in model.model.layers[0].modules() if type(m).__name__ in fused}


def test_fused_llama_functions_give_transformers_values_and_gradients_float32():
    """Each hand-written backward against autograd through transformers' own float32 operations."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    from prefixtune.llama_training import _QkvRope, _RmsNorm, _SwiGlu

    torch.manual_seed(0)
    batch, length, heads, kv_heads, dim = 2, 5, 4, 2, 8
    qkv = torch.randn(batch, length, heads + 2 * kv_heads, dim, requires_grad=True)
    angles = torch.rand(batch, length, dim // 2) * 6
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=2)
    reference = (*apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin), v.transpose(1, 2))
    ours = _QkvRope.apply(qkv, cos, sin, heads)
    grads = [torch.randn_like(t) for t in reference]
    for a, b in zip(ours, reference):
        assert torch.equal(a, b)
    torch.testing.assert_close(torch.autograd.grad(ours, qkv, grads)[0], torch.autograd.grad(reference, qkv, grads)[0])

    x = torch.randn(batch, length, 16, requires_grad=True)
    norm = LlamaRMSNorm(16, eps=1e-5)
    norm.weight.data.uniform_(0.5, 1.5)
    norm.weight.requires_grad_(False)
    ours, reference = _RmsNorm.apply(x, norm.weight, 1e-5, torch.float32), norm(x)
    assert torch.equal(ours, reference)
    grad = torch.randn_like(x)
    torch.testing.assert_close(torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(reference, x, grad)[0])

    gate_up = torch.randn(batch, length, 32, requires_grad=True)
    ours, reference = _SwiGlu.apply(gate_up), F.silu(gate_up[..., :16]) * gate_up[..., 16:]
    assert torch.equal(ours, reference)
    grad = torch.randn_like(ours)
    assert torch.equal(torch.autograd.grad(ours, gate_up, grad)[0], torch.autograd.grad(reference, gate_up, grad)[0])


def half_batch_run(method_name, tokenizer, halves: bool, bf16: bool = False):
    """(loss, trained gradients, frozen weights after) of one step on tiny Llama, the batch whole or in threaded halves."""
    from prefixtune.data_parallel import ThreadedHalves
    from prefixtune.precision import FrozenBf16Step

    model, method = tiny_method(method_name, tokenizer)
    trained = {n: p for m in method.loss_modules() for n, p in m.named_parameters() if p.requires_grad}
    frozen = {n: p for m in method.loss_modules() for n, p in m.named_parameters() if not p.requires_grad}
    batch = make_batch(model, tokenizer)
    assert batch["input_ids"].shape[0] == 3  # odd: halves of 2 and 1 rows, weighted by their target tokens

    def loss_of(b):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return method.loss(method.module, b)

    with FrozenBf16Step(*method.loss_modules()) if bf16 else contextlib.nullcontext():
        if halves:
            pool = ThreadedHalves(2)
            loss, n = pool.step(loss_of, batch, list(trained.values()))
            pool.close()
        else:
            loss, n = loss_of(batch)
            loss.backward()
    assert all(p.grad is None for p in frozen.values()), "a gradient reached a frozen weight"
    return loss.detach(), n, {k: p.grad.clone() for k, p in trained.items()}, {k: p.detach().clone() for k, p in frozen.items()}


@pytest.mark.parametrize("method_name", ["prefix", "adapter", "finetune"])
def test_threaded_halves_give_the_whole_batch_gradient(method_name, tokenizer):
    loss, n, grads, frozen = half_batch_run(method_name, tokenizer, halves=False)
    half_loss, half_n, half_grads, half_frozen = half_batch_run(method_name, tokenizer, halves=True)
    assert n == half_n
    torch.testing.assert_close(half_loss, loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == half_grads.keys() and grads
    for name in grads:  # float32: equal up to summation order (an unweighted mean of the halves is off by ~10%)
        torch.testing.assert_close(half_grads[name], grads[name], atol=1e-6, rtol=1e-5)
    assert sum(g.abs().sum() for g in half_grads.values()) > 0
    assert all(torch.equal(frozen[k], half_frozen[k]) for k in frozen)


def test_threaded_halves_under_bf16_stay_near_the_whole_batch(tokenizer):
    loss, _, grads, _ = half_batch_run("prefix", tokenizer, halves=False, bf16=True)
    half_loss, _, half_grads, _ = half_batch_run("prefix", tokenizer, halves=True, bf16=True)
    torch.testing.assert_close(half_loss, loss, atol=1e-2, rtol=1e-2)
    for name in grads:
        torch.testing.assert_close(half_grads[name], grads[name], atol=1e-4, rtol=2e-2)


def test_split_rows_and_dropout_check():
    from prefixtune.data_parallel import split_rows, uses_dropout

    batch = {"input_ids": torch.arange(15).view(5, 3), "attention_mask": torch.ones(5, 3)}
    halves = split_rows(batch, 2)
    assert [h["input_ids"].shape[0] for h in halves] == [3, 2]
    assert torch.equal(torch.cat([h["input_ids"] for h in halves]), batch["input_ids"])
    assert split_rows({"input_ids": torch.zeros(1, 4)}, 2)[0]["input_ids"].shape == (1, 4)
    assert len(split_rows({"input_ids": torch.zeros(1, 4)}, 2)) == 1
    model = tiny_model("llama")
    assert not uses_dropout(model.train())
    assert uses_dropout(torch.nn.Sequential(torch.nn.Dropout(0.1)).train())
    assert not uses_dropout(torch.nn.Sequential(torch.nn.Dropout(0.1)).eval())


def test_train_runs_halves_on_two_threads_reproducibly(tokenizer, tmp_path, monkeypatch):
    """With two torch threads `train` splits every batch of 2+ rows over two threads: the same prefix as one
    thread up to float rounding, and bitwise the same prefix twice; the caller's thread count is kept."""
    from prefixtune import data_parallel
    from prefixtune.train import train

    pairs = PAIRS * 4
    calls = []
    step = data_parallel.ThreadedHalves.step
    monkeypatch.setattr(data_parallel.ThreadedHalves, "step", lambda self, *a: calls.append(1) or step(self, *a))

    def run(name, threads):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            cfg = TrainConfig(output_dir=str(tmp_path / name), max_steps=4, batch_size=4, eval_every=0, save_every=0,
                              prefix_len=4, mlp_dim=16, precision="fp32", seed=3)
            result = train(cfg, tiny_model("llama"), tokenizer, pairs, pairs[:3], progress=False)
            assert torch.get_num_threads() == threads
        finally:
            torch.set_num_threads(before)
        return result.method.prefix_p()

    one = run("one", 1)
    assert not calls
    two, again = run("two", 2), run("again", 2)
    assert len(calls) == 8
    cfg = TrainConfig(output_dir=str(tmp_path / "finetune"), method="finetune", max_steps=2, batch_size=4,
                      eval_every=0, save_every=0, precision="fp32", export=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # fine-tuning trains every weight: one pass on both threads (the halves measured slower)
        train(cfg, tiny_model("llama"), tokenizer, pairs, pairs[:3], progress=False)
    finally:
        torch.set_num_threads(before)
    assert len(calls) == 8
    for group in one:
        assert torch.equal(two[group], again[group])
        torch.testing.assert_close(two[group], one[group], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method_name", ["prefix", "adapter"])
def test_bf16_step_copies_only_the_linears_the_fused_layers_still_call(method_name, tokenizer):
    """FrozenBf16Step casts no Linear the fused layers replace (their copies would go unused), and its step is
    bitwise the one with every Linear copied."""
    from prefixtune.precision import FrozenBf16Step

    runs = []
    for whole_step in (True, False):
        model = tiny_model("llama")
        torch.manual_seed(0)
        method = build_method(method_name, model, tokenizer, model_spec(model),
                              TrainConfig(method=method_name, prefix_len=4, mlp_dim=16))
        modules = method.loss_modules()
        weights, fused = FrozenBf16Step(*modules).contexts if whole_step else (
            FrozenBf16Weights(*modules), FusedLlamaLayers(*modules))  # before: every frozen Linear copied
        swapped = {id(m) for m, _, _ in weights.swaps}
        names = {n.rsplit(".", 1)[-1] for m in modules for n, l in m.named_modules() if id(l) in swapped}
        assert fused.replaced and "lm_head" in names
        if whole_step:
            assert not swapped & {id(m) for m in fused.replaced}
            # adapters wrap o_proj and down_proj: the wrapped Linears ("inner") are still called, so still copied
            assert names == ({"lm_head", "inner"} if method_name == "adapter" else {"lm_head"})
        else:
            assert {"q_proj", "gate_proj"} <= names
        with weights, fused:
            with torch.autocast("cpu", torch.bfloat16):
                loss, _ = method.loss(method.module, make_batch(model, tokenizer))
            loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in method.module.parameters() if p.requires_grad]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
