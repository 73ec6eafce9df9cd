"""Decoding: batched equals one-by-one, with mixed prefixes, greedy and beam, every family."""
from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, tiny_model
from prefixtune.bank import PrefixBank
from prefixtune.generation import DecodingConfig, decode
from prefixtune.prefix_file import ExportedPrefix, save_prefix, load_prefix
from prefixtune.forward import prefix_kv_from_groups
from prefixtune.models import model_spec
from prefixtune.prefix import PrefixConfig, build_prefix_encoder

SOURCES = ["a", "name : The Eagle | Type : coffee shop", "hello there", "xyz | q : r | s", "longer input text here, ok"]


def prefixes(model, tokenizer, lengths=(3, 6)):
    spec = model_spec(model)
    out = []
    for i, n in enumerate(lengths):
        # a large MLP init makes the prefixes differ strongly, so a mix-up would change the tokens
        enc = build_prefix_encoder(model, tokenizer, spec, PrefixConfig(prefix_len=n, mlp_dim=16), seed=10 + i)
        with torch.no_grad():
            out.append({g: t * 5 for g, t in enc().items()})
    return out


def ids(tokenizer, texts):
    return [tokenizer(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("beams", [1, 3])
def test_mixed_batch_equals_each_row_alone(family, beams, tokenizer):
    model = tiny_model(family, seed=1)
    spec = model_spec(model)
    p1, p2 = prefixes(model, tokenizer)
    rows = [p1, p2, None, p2, p1]
    config = DecodingConfig(max_new_tokens=8, num_beams=beams, stop_at_newline=False)
    sequences = ids(tokenizer, SOURCES)
    batched = decode(model, tokenizer, sequences, prefix_kv_from_groups(rows, spec), config)
    alone = [decode(model, tokenizer, [s], prefix_kv_from_groups([p], spec), config)[0]
             for s, p in zip(sequences, rows)]
    assert batched == alone
    assert all(len(x) > 0 for x in batched)
    # the prefixes are not ignored: the same input decodes differently under another prefix
    swapped = decode(model, tokenizer, sequences, prefix_kv_from_groups([p2, p1, p1, None, None], spec), config)
    assert swapped != batched


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_greedy_equals_full_recompute(family, tokenizer):
    """The incremental cache gives the same tokens as re-running the whole sequence each step."""
    from prefixtune import cache
    from prefixtune.forward import position_ids

    model = tiny_model(family, seed=2)
    spec = model_spec(model)
    (p,) = prefixes(model, tokenizer, lengths=(4,))
    src = ids(tokenizer, ["name : Zizzi | food : Thai"])[0]
    fast = decode(model, tokenizer, [src], prefix_kv_from_groups([p], spec),
                  DecodingConfig(max_new_tokens=6, stop_at_newline=False))[0]
    kv = prefix_kv_from_groups([p], spec)
    cache.install(model)
    generated = []
    with torch.no_grad():
        for _ in range(6):
            if spec.family == "decoder":
                x = torch.tensor([src + generated])
                mask = torch.ones_like(x)
                logits = model(input_ids=x, attention_mask=mask, position_ids=position_ids(mask, 4), prefix_kv=kv).logits
            else:
                dec = torch.tensor([[model.config.decoder_start_token_id] + generated])
                logits = model(input_ids=torch.tensor([src]), decoder_input_ids=dec, prefix_kv=kv).logits
            token = int(logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            generated.append(token)
    assert fast == generated


def test_stops_at_eos_and_newline(tokenizer):
    model = tiny_model("llama")
    newline = tokenizer("\n")["input_ids"][0]
    # force the model to emit a newline: bias the LM head towards it
    with torch.no_grad():
        model.lm_head.weight[newline] += 50 * model.lm_head.weight.abs().max()
    out = decode(model, tokenizer, ids(tokenizer, ["abc"]), None, DecodingConfig(max_new_tokens=5))
    assert out == [[]]
    out = decode(model, tokenizer, ids(tokenizer, ["abc"]), None,
                 DecodingConfig(max_new_tokens=5, stop_at_newline=False))
    assert out == [[newline] * 5]


def test_bank_generate_keeps_order_and_checks_ids(tokenizer, tmp_path):
    model = tiny_model("llama", seed=1)
    spec = model_spec(model)
    p1, p2 = prefixes(model, tokenizer)
    bank = PrefixBank(model, tokenizer)
    bank.add("one", load_prefix(save_prefix(tmp_path / "1.safetensors", p1, spec, "tiny-llama"), spec))
    bank.add("two", ExportedPrefix(p2, load_prefix(tmp_path / "1.safetensors").metadata))
    texts = SOURCES
    mixed = bank.generate(texts, ["one", "two", "one", None, "two"], max_new_tokens=6, batch_size=2,
                          stop_at_newline=False)
    alone = [bank.generate([t], [pid], max_new_tokens=6, stop_at_newline=False)[0]
             for t, pid in zip(texts, ["one", "two", "one", None, "two"])]
    assert mixed == alone
    with pytest.raises(KeyError, match="nope"):
        bank.generate(["x"], ["nope"])
    bank.remove("one")
    assert bank.ids() == ["two"]


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_rows_get_the_same_first_logits_as_alone(family, tokenizer):
    """Stricter than equal tokens: the prefill logits of a padded row equal the row alone (BART's
    absolute encoder positions break if its input is left-padded)."""
    from prefixtune.generation import _Decoder, pad_batch

    model = tiny_model(family, seed=4)
    spec = model_spec(model)
    p1, p2 = prefixes(model, tokenizer)
    rows = [p1, None, p2]
    sequences = ids(tokenizer, SOURCES[:3])
    side = "right" if spec.family == "encoder-decoder" else "left"
    with torch.no_grad():
        batch = _Decoder(model, spec, *pad_batch(sequences, 0, "cpu", side), prefix_kv_from_groups(rows, spec)).logits
        for i, (s, p) in enumerate(zip(sequences, rows)):
            alone = _Decoder(model, spec, *pad_batch([s], 0, "cpu", side), prefix_kv_from_groups([p], spec)).logits
            assert torch.allclose(batch[i], alone[0], atol=1e-4), (family, i, (batch[i] - alone[0]).abs().max())


# --------------------------------------------------------------------------- repetition controls


def test_repetition_controls_on_logits():
    from prefixtune.generation import apply_repetition_controls

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [1.0, 1.0, 1.0, 1.0]])
    off = DecodingConfig()
    assert apply_repetition_controls(logits, [[0, 1], [2]], off) is logits  # off by default: untouched
    pen = apply_repetition_controls(logits, [[0, 1, 0], []], DecodingConfig(repetition_penalty=2.0))
    assert pen.tolist() == [[1.0, -2.0, 0.5, 3.0], [1.0, 1.0, 1.0, 1.0]]  # HF's rule: divide > 0, multiply < 0
    # n=2: history "3 1 3" ends in 3, and "3 1" occurred: token 1 is banned after 3
    ban = apply_repetition_controls(logits, [[3, 1, 3], [2, 2]], DecodingConfig(no_repeat_ngram_size=2))
    assert ban[0, 1] == float("-inf") and torch.isfinite(ban[0, [0, 2, 3]]).all()
    assert ban[1, 2] == float("-inf") and torch.isfinite(ban[1, [0, 1, 3]]).all()
    one = apply_repetition_controls(logits, [[0, 3], []], DecodingConfig(no_repeat_ngram_size=1))
    assert one[0, 0] == one[0, 3] == float("-inf") and torch.isfinite(one[1]).all()
    with pytest.raises(ValueError):
        DecodingConfig(repetition_penalty=0)
    with pytest.raises(ValueError):
        DecodingConfig(no_repeat_ngram_size=-1)


@pytest.mark.parametrize("beams", [1, 3])
def test_no_repeat_ngram_decoding_never_repeats_and_batches_exactly(beams, tokenizer):
    model = tiny_model("llama", seed=1)
    spec = model_spec(model)
    p1, p2 = prefixes(model, tokenizer)
    seqs, rows = ids(tokenizer, SOURCES), [p1, p2, None, p2, p1]
    plain = decode(model, tokenizer, seqs, prefix_kv_from_groups(rows, spec),
                   DecodingConfig(max_new_tokens=12, num_beams=beams, stop_at_newline=False), spec)
    assert any(len(set(zip(o, o[1:]))) < len(o) - 1 for o in plain)  # a random model loops: the test has teeth
    config = DecodingConfig(max_new_tokens=12, num_beams=beams, stop_at_newline=False, no_repeat_ngram_size=2,
                            repetition_penalty=1.3)
    batched = decode(model, tokenizer, seqs, prefix_kv_from_groups(rows, spec), config, spec)
    for out in batched:
        bigrams = list(zip(out, out[1:]))
        assert len(set(bigrams)) == len(bigrams), out
    alone = [decode(model, tokenizer, [s], prefix_kv_from_groups([r], spec), config, spec)[0]
             for s, r in zip(seqs, rows)]
    assert batched == alone


def test_bank_passes_repetition_controls(tokenizer):
    model = tiny_model("gpt2", seed=1)
    bank = PrefixBank(model, tokenizer)
    plain = bank.generate(SOURCES, None, max_new_tokens=10, stop_at_newline=False)
    controlled = bank.generate(SOURCES, None, max_new_tokens=10, stop_at_newline=False, no_repeat_ngram_size=1)
    assert plain != controlled


@pytest.mark.parametrize("beams", [1, 3])
def test_a_cancelled_row_leaves_the_batch_and_the_others_are_unchanged(beams, tokenizer):
    model = tiny_model("llama", seed=1)
    spec = model_spec(model)
    p1, p2 = prefixes(model, tokenizer)
    rows, sequences = [p1, p2, None], ids(tokenizer, SOURCES[:3])
    config = DecodingConfig(max_new_tokens=12, num_beams=beams, stop_at_newline=False, ignore_eos=True)
    full = decode(model, tokenizer, sequences, prefix_kv_from_groups(rows, spec), config)
    asked = []

    def cancelled(row):  # row 1's request gives up after its 3rd step
        asked.append(row)
        return row == 1 and asked.count(1) > 3

    cut = decode(model, tokenizer, sequences, prefix_kv_from_groups(rows, spec), config, cancelled=cancelled)
    assert cut[0] == full[0] and cut[2] == full[2]
    assert asked.count(1) == 4  # asked once more, then gone
    if beams == 1:
        assert cut[1] == full[1][:3]
    everything = decode(model, tokenizer, sequences, prefix_kv_from_groups(rows, spec), config,
                        cancelled=lambda row: True)
    assert everything == [[], [], []]  # all gone at the first step
