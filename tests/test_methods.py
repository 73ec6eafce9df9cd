"""The baseline and ablation methods: what trains, what never changes, and decoding that matches training."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)  # 2 shared cores: a second thread only contends (10x slower)

from conftest import ByteTokenizer, tiny_model
from prefixtune.architectures import adapter_sites, top_layers
from prefixtune.generation import DecodingConfig
from prefixtune.methods import METHODS, build_method
from prefixtune.methods.base import count_parameters
from prefixtune.models import model_spec
from prefixtune.train import TrainConfig, train

PAIRS = [(f"name : Place{i} | food : {f}", f"Place{i} serves {f} food.") for i, f in
         enumerate(["Thai", "French", "Chinese", "Italian", "English", "Indian"] * 2)]
SOURCES = ["a", "name : The Eagle | Type : coffee shop", "hello there", "xyz | q : r | s", "longer input text, ok"]
NEW = ["embedding-only", "infix", "finetune", "finetune-top2", "adapter"]


def config(tmp_path, method, **kw):
    base = dict(output_dir=str(tmp_path / method), method=method, max_steps=2, batch_size=4, lr=1e-2,
                prefix_len=3, mlp_dim=16, eval_every=0, save_every=0, seed=3, precision="fp32",
                max_source_len=128, max_target_len=64)  # within the tiny GPT-2's 256 positions, with the prefix
    base.update(kw)
    return TrainConfig(**base)


def snapshot(module):
    return {n: t.detach().clone() for n, t in module.state_dict().items()}


def changed(before, module):
    return {n for n, t in module.state_dict().items() if n in before and not torch.equal(t, before[n])}


def test_registry_has_every_method():
    assert set(NEW) | {"prefix", "prefix-flat"} <= set(METHODS)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bart", "t5"])
@pytest.mark.parametrize("method", NEW)
def test_only_intended_parameters_train_and_base_never_changes(family, method, tokenizer, tmp_path):
    model = tiny_model(family)
    base_before = snapshot(model)
    cfg = config(tmp_path, method, export=False)
    spec = model_spec(model)
    fresh = build_method(method, tiny_model(family), tokenizer, spec, cfg)
    start = snapshot(fresh.module)
    result = train(cfg, model, tokenizer, PAIRS, PAIRS[:4], progress=False)
    trained = result.method
    assert not changed(base_before, model), "the shared base model changed"
    assert not any(p.requires_grad for p in model.parameters())
    assert result.steps == 2 and result.prefix_file is None
    assert 0 < trained.trainable_percent() <= 100

    moved = changed(start, trained.module)
    trainable = {n for n, p in trained.module.named_parameters() if p.requires_grad}
    assert moved, "nothing trained"
    assert moved <= trainable | {n for n in start if n not in dict(trained.module.named_parameters())}
    if method == "finetune":
        assert trained.trainable_percent() == pytest.approx(100.0)
        assert len(moved) > len(trainable) // 2
    elif method == "finetune-top2":
        tops = tuple("model." + name + "." for name in top_layers(trained.trained, 2))
        assert all(n.startswith(tops) for n in moved), sorted(moved)
    elif method == "adapter":
        assert all(".adapter." in n for n in moved | trainable), sorted(moved | trainable)
        # every frozen weight of the copy still equals the base model's
        for n, t in trained.trained.state_dict().items():
            if ".adapter." not in n:
                assert torch.equal(t, base_before[n.replace(".inner.", ".")]), n
    else:
        assert trainable == {n for n, _ in trained.module.named_parameters()}
        assert count_parameters(trained.module) == trained.trainable_parameters()


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_finetune_top2_trains_exactly_the_top_two_layers(family, tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefixtune.models import freeze

    if family == "llama":  # four layers, so "top 2" is a real subset
        torch.manual_seed(0)
        model = freeze(LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, num_attention_heads=4,
                                                    num_key_value_heads=2, hidden_size=32, intermediate_size=64,
                                                    vocab_size=300, pad_token_id=0, eos_token_id=1)))
    else:
        model = tiny_model(family)
    base_before = snapshot(model)
    result = train(config(tmp_path, "finetune-top2", export=False), model, tokenizer, PAIRS, PAIRS[:4],
                   progress=False)
    trained = result.method.trained
    diff = {n for n, t in trained.state_dict().items() if not torch.equal(t, base_before[n])}
    expected = set(top_layers(trained, 2))
    touched = {e for e in expected for n in diff if n.startswith(e + ".")}
    assert touched == expected  # both top layers moved ...
    assert all(any(n.startswith(e + ".") for e in expected) for n in diff), sorted(diff)  # ... and nothing else
    assert not changed(base_before, model)


def medium_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefixtune.models import freeze

    torch.manual_seed(0)
    return freeze(LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               hidden_size=128, intermediate_size=512, vocab_size=20000,
                                               pad_token_id=0, eos_token_id=1)))


@pytest.mark.parametrize("budget", [0.001, 0.03])
def test_adapter_budgets_land_near_the_target(budget, tokenizer):
    model = medium_llama()
    spec = model_spec(model)
    method = build_method("adapter", model, tokenizer, spec, TrainConfig(method="adapter", adapter_budget=budget))
    assert len(adapter_sites(method.trained)) == 4  # attention and MLP output of 2 layers
    assert method.trainable_percent() == pytest.approx(100 * budget, rel=0.25)
    assert method.shipped_percent() == method.trainable_percent()


def test_trainable_percent_of_prefix_counts_the_mlp_and_shipped_counts_p(tokenizer):
    model = tiny_model("llama")
    spec = model_spec(model)
    method = build_method("prefix", model, tokenizer, spec, TrainConfig(prefix_len=4, mlp_dim=16))
    total = count_parameters(model)
    assert method.trainable_percent() == pytest.approx(100 * method.trainable_parameters() / total)
    assert method.shipped_percent() < method.trainable_percent()


def build(method, family, tokenizer, seed=5, **kw):
    model = tiny_model(family, seed=1)
    torch.manual_seed(seed)
    cfg = TrainConfig(method=method, prefix_len=kw.pop("prefix_len", 4), mlp_dim=16, **kw)
    m = build_method(method, model, tokenizer, model_spec(model), cfg)
    with torch.no_grad():  # make the trainable part matter, so a mix-up would change the tokens
        for p in m.module.parameters():
            p.mul_(5 if method == "infix" else 20)
    return m


@pytest.mark.parametrize("family", ["llama", "gpt2", "bart", "t5"])
@pytest.mark.parametrize("method", ["embedding-only", "infix"])
@pytest.mark.parametrize("beams", [1, 3])
def test_batched_decoding_equals_one_by_one(family, method, beams, tokenizer):
    m = build(method, family, tokenizer)
    cfg = DecodingConfig(max_new_tokens=8, num_beams=beams, stop_at_newline=False)
    batched = m.generate(SOURCES, cfg, batch_size=8)
    alone = [m.generate([s], cfg)[0] for s in SOURCES]
    assert batched == alone
    if family == "llama":  # the other tiny random models mostly emit non-byte tokens (empty text)
        assert any(batched)


class IdTokenizer(ByteTokenizer):
    """Decodes to the ids themselves, so a test can see tokens that are not bytes."""

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(int(i)) for i in ids)


def first_token_logits(m, source, monkeypatch):
    """The logits of the first target token as the method's training loss computes them."""
    import torch.nn.functional as F

    from prefixtune.data.collate import source_ids

    spec = m.spec
    src = source_ids(m.tokenizer, spec.family, source, m.template, m.max_source_len)
    if spec.family == "decoder":
        batch = {"input_ids": torch.tensor([src + [5]]), "labels": torch.tensor([[-100] * len(src) + [5]])}
    else:
        batch = {"input_ids": torch.tensor([src]), "labels": torch.tensor([[5]]),
                 "decoder_input_ids": torch.tensor([[m.model.config.decoder_start_token_id]]),
                 "decoder_attention_mask": torch.ones(1, 1, dtype=torch.long)}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    seen, real = [], F.cross_entropy

    def capture(logits, targets, *args, **kwargs):
        seen.append(logits.detach())
        return real(logits, targets, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", capture)
    with torch.no_grad():
        m.loss(m.module, batch)
    monkeypatch.setattr(F, "cross_entropy", real)
    (logits,) = seen
    return logits[0]


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("method", ["embedding-only", "infix"])
def test_decoding_reads_what_training_trained(family, method, monkeypatch):
    """The first greedy token is the argmax of the training loss's logits (positions and masks agree)."""
    m = build(method, family, IdTokenizer())
    m.module.eval()
    source = "name : The Eagle | food : Thai"
    expected = int(first_token_logits(m, source, monkeypatch).argmax())
    got = m.generate([source], DecodingConfig(max_new_tokens=1, stop_at_newline=False))[0]
    if got:
        assert int(got) == expected
    else:  # the argmax was a stop token
        assert expected == m.tokenizer.eos_token_id


def test_infix_is_invisible_to_the_source_but_not_to_the_target(tokenizer):
    from prefixtune import cache
    from prefixtune.data.collate import Collator, encode_pair
    from prefixtune.forward import position_ids, single_prefix_kv
    from prefixtune.methods.infix import source_only_hidden

    m = build("infix", "llama", tokenizer)
    spec = m.spec
    ex = encode_pair(tokenizer, "decoder", "name : Zizzi | area : riverside", "Zizzi is by the river.")
    batch = Collator(0, "decoder")([ex])
    src_len = sum(1 for x in ex["labels"] if x == -100)
    kv = single_prefix_kv(m.module(), spec, 1)
    kv.query_visible = source_only_hidden(batch["labels"])
    cache.install(m.model)
    mask = batch["attention_mask"]
    with torch.no_grad():
        pos = position_ids(mask, 4)
        with_infix = m.model.base_model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=pos,
                                        prefix_kv=kv).last_hidden_state
        without = m.model.base_model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=pos
                                     ).last_hidden_state
    assert torch.allclose(with_infix[0, : src_len - 1], without[0, : src_len - 1], atol=1e-5)
    assert not torch.allclose(with_infix[0, src_len - 1:], without[0, src_len - 1:], atol=1e-3)


def test_exports_hold_only_trained_weights(tokenizer, tmp_path):
    from safetensors import safe_open

    model = tiny_model("llama")
    for method, expect in [("adapter", ".adapter."), ("finetune-top2", "model.layers."),
                           ("embedding-only", "embeddings"), ("infix", "infix.decoder")]:
        result = train(config(tmp_path, method), model, tokenizer, PAIRS, PAIRS[:4], progress=False)
        with safe_open(result.prefix_file, "pt") as f:
            names = list(f.keys())
            meta = f.metadata()
        assert names and all(expect in n for n in names), (method, names)
        assert meta["method"] == method


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_export_decodes_like_the_trained_method(method, tokenizer, tmp_path):
    """`generate`/`eval` take what any method exports (file or training directory), on a fresh base model."""
    from pathlib import Path

    from prefixtune.exported import ExportDecoder, check_export
    from prefixtune.methods import EXPORT_FILES

    result = train(config(tmp_path, method), tiny_model("llama"), tokenizer, PAIRS, PAIRS[:4], progress=False)
    assert Path(result.prefix_file).name == EXPORT_FILES[method]
    decoding = DecodingConfig(max_new_tokens=6, stop_at_newline=False)
    want = result.method.generate(SOURCES, decoding)
    assert check_export(tmp_path / method) == (Path(result.prefix_file), "prefix" if "prefix" in method else "weights")
    for where in (result.prefix_file, tmp_path / method):
        fresh = tiny_model("llama")  # the base model alone: nothing trained is carried over
        assert ExportDecoder(fresh, tokenizer, where).generate(SOURCES, decoding) == want, where
    if "prefix" not in method:  # a bank (and the server) say why they refuse it
        from prefixtune.prefix_file import PrefixFileError, load_prefix

        with pytest.raises(PrefixFileError, match=f"holds {method} weights, not a prefix"):
            load_prefix(result.prefix_file)


# Tokens of the ablations and of encoder-decoder fine-tuning on `generation.decode`'s batched loop (fp32, the
# first 3 SOURCES, 8 tokens), frozen when the engine took them over (the engine gave these exact tokens then):
# the engine must keep giving them.
OLD_LOOP_TOKENS = {
    ("llama", "embedding-only", 1): [[168, 217, 62, 78, 17, 166, 248, 217], [168, 217, 35, 30, 131, 35, 30, 131], [168, 217, 35, 243, 23, 175, 264, 36]],
    ("llama", "embedding-only", 5): [[168, 217, 279, 278, 84, 264, 162, 39], [168, 217, 237, 66, 69, 35, 126, 293], [168, 217, 237, 66, 69, 177, 47, 21]],
    ("llama", "infix", 1): [[198, 174, 289, 44, 44, 44, 44, 44], [289, 44, 44, 44, 44, 44, 44, 44], [289, 44, 44, 44, 44, 44, 44, 44]],
    ("llama", "infix", 5): [[44, 44, 44, 44, 44, 44, 44, 44], [289, 44, 44, 44, 44, 44, 44, 44], [289, 44, 44, 44, 44, 44, 44, 44]],
    ("gpt2", "embedding-only", 5): [[13, 13, 13, 141, 141, 141, 141, 141], [109, 109, 109, 109, 109, 109, 109, 109], [13, 109, 109, 109, 109, 109, 109, 109]],
    ("bart", "finetune", 1): [[294] * 8, [182, 138, 138, 94, 20, 193, 99, 138], [181, 181, 181, 181, 94, 94, 94, 294]],
    ("bart", "finetune", 5): [[294] * 8, [182, 138, 138, 294, 182, 138, 182, 266], [181, 181, 181, 181, 94, 94, 94, 294]],
    ("t5", "finetune", 1): [[148] * 8, [75, 164, 84, 164, 234, 35, 184, 95], [264, 285, 284, 284, 284, 284, 284, 284]],
    ("t5", "embedding-only", 5): [[84, 84, 84, 84, 84, 84, 84, 84], [220, 220, 220, 148, 148, 148, 148, 148], [84, 84, 84, 84, 84, 84, 84, 84]],
}


@pytest.mark.parametrize("family,method,beams", sorted(OLD_LOOP_TOKENS))
def test_ablations_decode_on_the_engine_as_the_old_loop_did(family, method, beams):
    m = build(method, family, IdTokenizer())
    m.module.eval()
    got = m.generate(SOURCES[:3], DecodingConfig(max_new_tokens=8, num_beams=beams, stop_at_newline=False))
    assert [[int(t) for t in text.split()] for text in got] == OLD_LOOP_TOKENS[family, method, beams]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_embedding_only_greedy_equals_transformers_generate_with_inputs_embeds(family):
    from prefixtune.data.collate import source_ids

    m = build("embedding-only", family, IdTokenizer())
    m.module.eval()
    got = m.generate(SOURCES[:3], DecodingConfig(max_new_tokens=8, stop_at_newline=False))
    v = m.module().detach()
    for source, text in zip(SOURCES[:3], got):
        x = torch.tensor([source_ids(m.tokenizer, "decoder", source, m.template, m.max_source_len)])
        embeds = torch.cat([v[None], m.model.get_input_embeddings()(x)], dim=1)  # [v; x], positions from 0
        with torch.no_grad():
            want = m.model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                    max_new_tokens=8, do_sample=False, eos_token_id=1, pad_token_id=0)[0].tolist()
        assert [int(t) for t in text.split()] == (want[: want.index(1)] if 1 in want else want)  # 1: eos
