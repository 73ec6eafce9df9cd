"""The prefix module, its cache entry into every family, and what training may and may not touch."""
from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, tiny_model
from prefixtune import cache
from prefixtune.prefix_file import load_prefix, save_prefix
from prefixtune.forward import lm_loss, position_ids, prefix_kv_from_groups, single_prefix_kv
from prefixtune.models import model_spec
from prefixtune.prefix import PrefixConfig, build_prefix_encoder, groups_of, word_activations
from prefixtune.data.collate import Collator, encode_pair


def make_batch(model, tokenizer, pairs):
    spec = model_spec(model)
    examples = [encode_pair(tokenizer, spec.family, s, t) for s, t in pairs]
    return Collator(tokenizer.pad_token_id, spec.family, getattr(model.config, "decoder_start_token_id", None))(examples)


PAIRS = [("name : Aromi | food : Thai", "Aromi serves Thai food."), ("name : Zizzi", "Zizzi is a pub."),
         ("area : riverside | name : The Mill | price : cheap", "The Mill is cheap and by the river.")]


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_shapes_every_family(family, tokenizer):
    model = tiny_model(family)
    spec = model_spec(model)
    encoder = build_prefix_encoder(model, tokenizer, spec, PrefixConfig(prefix_len=5, mlp_dim=16))
    p = encoder()
    kv = single_prefix_kv(p, spec, batch=3)
    slots = cache.attention_modules(model)
    expected_groups = {"decoder"} if family in ("gpt2", "llama") else {"encoder", "decoder", "cross"}
    assert set(groups_of(spec)) == expected_groups
    assert set(kv.keys) == set(slots) == set(kv.values)
    heads = {"gpt2": 4, "llama": 2, "bart": 4, "t5": 4}[family]  # llama: 2 key/value heads for 4 query heads
    head_dim = 8
    for slot in slots:
        assert kv.keys[slot].shape == (3, heads, 5, head_dim)
        assert kv.values[slot].shape == (3, heads, 5, head_dim)
    for group, layers in groups_of(spec).items():
        assert p[group].shape == (5, layers * 2 * heads * head_dim)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_only_the_prefix_and_base_is_untouched(family, tokenizer):
    model = tiny_model(family)
    spec = model_spec(model)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    encoder = build_prefix_encoder(model, tokenizer, spec, PrefixConfig(prefix_len=4, mlp_dim=16))
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-2)
    batch = make_batch(model, tokenizer, PAIRS)
    loss, n = lm_loss(model, spec, batch, single_prefix_kv(encoder(), spec, 3))
    loss.backward()
    assert n > 0 and torch.isfinite(loss)
    assert all(p.grad is None for p in model.parameters()), "a frozen weight received a gradient"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())
    optimizer.step()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"base weight {name} changed"
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_prefix_reproduces_mlp_logits(family, tokenizer, tmp_path):
    model = tiny_model(family)
    spec = model_spec(model)
    encoder = build_prefix_encoder(model, tokenizer, spec, PrefixConfig(prefix_len=6, mlp_dim=24), seed=3)
    batch = make_batch(model, tokenizer, PAIRS)
    with torch.no_grad():
        mlp_loss = logits_of(model, spec, batch, single_prefix_kv(encoder(), spec, 3))
    path = save_prefix(tmp_path / "p.safetensors", {g: t.detach() for g, t in encoder().items()}, spec, "tiny")
    exported = load_prefix(path, spec)
    with torch.no_grad():
        file_loss = logits_of(model, spec, batch, prefix_kv_from_groups([exported.p] * 3, spec))
    assert torch.allclose(mlp_loss, file_loss, atol=1e-5, rtol=0)
    # and the prefix really matters (else the check above would be vacuous)
    with torch.no_grad():
        bare = logits_of(model, spec, batch, None)
    assert (bare - mlp_loss).abs().max() > 1e-3


def logits_of(model, spec, batch, prefix_kv):
    cache.install(model)
    if spec.family == "encoder-decoder":
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     decoder_input_ids=batch["decoder_input_ids"], prefix_kv=prefix_kv).logits
    mask = batch["attention_mask"]
    offset = 0 if prefix_kv is None else prefix_kv.mask.sum(-1)
    return model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids(mask, offset),
                 prefix_kv=prefix_kv).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_word_init_equals_reading_the_words(family, tokenizer):
    """A prefix initialised from "table-to-text:" makes the model behave as if it had read those words."""
    model = tiny_model(family)
    spec = model_spec(model)
    words = "table-to-text:"
    length = len(tokenizer(words)["input_ids"])
    for reparam in (True, False):
        encoder = build_prefix_encoder(model, tokenizer, spec, PrefixConfig(prefix_len=length, mlp_dim=32,
                                                                             reparam=reparam, init="words:" + words))
        x = torch.tensor([tokenizer(" hello world")["input_ids"]])
        joined = torch.tensor([tokenizer(words)["input_ids"] + x[0].tolist()])
        with torch.no_grad():
            reference = model(joined).logits[:, length:]
            mask = torch.ones_like(x)
            cache.install(model)
            out = model(input_ids=x, attention_mask=mask, position_ids=position_ids(mask, length),
                        prefix_kv=single_prefix_kv(encoder(), spec, 1)).logits
        assert torch.allclose(out, reference, atol=1e-4), (out - reference).abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_word_init_through_mlp_hits_activations(family, tokenizer):
    model = tiny_model(family)
    spec = model_spec(model)
    config = PrefixConfig(prefix_len=7, mlp_dim=32, init="words:summarize")
    encoder = build_prefix_encoder(model, tokenizer, spec, config)
    targets = word_activations(model, tokenizer, spec, "summarize", 7)
    with torch.no_grad():
        p = encoder()
    for group in targets:
        assert torch.allclose(p[group], targets[group], atol=1e-4)
        assert targets[group].abs().max() > 0


@pytest.mark.parametrize("family", ["llama", "bart"])
def test_gradient_checkpointing_gives_the_same_gradients(family, tokenizer):
    from prefixtune.cache import enable_gradient_checkpointing

    grads = []
    for checkpointing in (False, True):
        model = tiny_model(family)
        spec = model_spec(model)
        if checkpointing:
            enable_gradient_checkpointing(model)
        encoder = build_prefix_encoder(model, tokenizer, spec, PrefixConfig(prefix_len=4, mlp_dim=16), seed=0)
        loss, _ = lm_loss(model, spec, make_batch(model, tokenizer, PAIRS), single_prefix_kv(encoder(), spec, 3))
        loss.backward()
        grads.append([p.grad.clone() for p in encoder.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="prefix_len"):
        PrefixConfig(prefix_len=0)
    with pytest.raises(ValueError, match="init"):
        PrefixConfig(init="glove")
