"""Decoding on the engine, checked against an oracle (`reference`: one row alone, the whole sequence
recomputed at every step, no cache, no batch): mixed prefixes, greedy and beam, every family."""
from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, tiny_model
from prefixtune import cache
from prefixtune.bank import PrefixBank
from prefixtune.engine.beam import BeamGroup
from prefixtune.engine.offline import decode_ids
from prefixtune.engine.request import Request
from prefixtune.forward import position_ids, prefix_kv_from_groups
from prefixtune.generation import DecodingConfig, apply_repetition_controls, stop_ids
from prefixtune.prefix_file import ExportedPrefix, save_prefix, load_prefix
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


@torch.no_grad()
def reference(model, tokenizer, seq, prefix=None, config=None) -> list[int]:
    """The oracle: row `seq` alone with `prefix` (P per group, or None), its whole sequence recomputed
    through the HF forward at every step (no cache, no batch, no paging); greedy, or beams ranked by
    engine/beam.py; the repetition controls over each hypothesis' tokens."""
    config = config or DecodingConfig(stop_at_newline=False)
    spec = model_spec(model)
    cache.install(model)
    kv = None if prefix is None else prefix_kv_from_groups([prefix], spec)
    start = 0 if prefix is None else next(iter(prefix.values())).shape[0]
    stops = stop_ids(tokenizer, config.stop_at_newline, config.ignore_eos)

    def logits(tokens):  # the next token's logits after the source and `tokens`, the controls applied
        if spec.family == "decoder":
            x = torch.tensor([seq + tokens])
            mask = torch.ones_like(x)
            out = model(input_ids=x, attention_mask=mask, position_ids=position_ids(mask, start), prefix_kv=kv)
        else:
            dec = torch.tensor([[model.config.decoder_start_token_id] + tokens])
            out = model(input_ids=torch.tensor([seq]), decoder_input_ids=dec, prefix_kv=kv)
        return apply_repetition_controls(out.logits[:, -1].float(), [tokens], config)[0]

    if config.num_beams == 1:
        generated = []
        for _ in range(config.max_new_tokens):
            token = int(logits(generated).argmax())
            if token in stops:
                break
            generated.append(token)
        return generated
    group = BeamGroup(Request(seq, max_tokens=config.max_new_tokens, beams=config.num_beams,
                              length_penalty=config.length_penalty), stops)
    while not group.done:
        rows = [torch.log_softmax(logits(tokens), -1) if score > float("-inf") else None
                for tokens, score in zip(group.sequences, group.scores)]
        dead = torch.zeros_like(next(r for r in rows if r is not None))
        rows += [None] * (group.k - len(rows))
        group.rank(torch.stack([dead if r is None else r for r in rows]))
    return group.best()[0]


def decode(model, tokenizer, sequences, rows, config):
    """All rows at once on the engine (continuous batching, 32 slots)."""
    return decode_ids(model, tokenizer, sequences, rows, config)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("beams", [1, 3])
def test_mixed_batch_equals_each_row_alone_recomputed(family, beams, tokenizer):
    model = tiny_model(family, seed=1)
    p1, p2 = prefixes(model, tokenizer)
    rows = [p1, p2, None, p2, p1]
    config = DecodingConfig(max_new_tokens=8, num_beams=beams, stop_at_newline=False)
    sequences = ids(tokenizer, SOURCES)
    batched = decode(model, tokenizer, sequences, rows, config)
    assert batched == [reference(model, tokenizer, s, p, config) for s, p in zip(sequences, rows)]
    assert all(len(x) > 0 for x in batched)
    # the prefixes are not ignored: the same input decodes differently under another prefix
    swapped = decode(model, tokenizer, sequences, [p2, p1, p1, None, None], config)
    assert swapped != batched


def test_bank_decodes_encoder_decoders_as_the_old_loop_did(tokenizer):
    """T5 through `PrefixBank.generate_ids` (the engine, row by row), beam 5 and an n-gram ban, mixed prefixes:
    the tokens of `generation.decode`'s batched loop, frozen when the engine took encoder-decoders over."""
    model = tiny_model("t5", seed=1)
    p1, p2 = prefixes(model, tokenizer)
    bank = PrefixBank(model, tokenizer)
    meta = {"fingerprint": model_spec(model).fingerprint()}
    bank.add("one", ExportedPrefix(p1, meta))
    bank.add("two", ExportedPrefix(p2, meta))
    config = DecodingConfig(max_new_tokens=8, num_beams=5, stop_at_newline=False, no_repeat_ngram_size=2)
    assert bank.generate_ids(ids(tokenizer, SOURCES[:3]), ["one", "two", None], config) == [
        [2, 2, 210, 210, 221, 221, 232, 232], [148, 148, 159, 159, 290, 290, 184, 184],
        [18, 18, 285, 285, 264, 264, 206, 206]]


def test_stops_at_eos_and_newline(tokenizer):
    model = tiny_model("llama")
    newline = tokenizer("\n")["input_ids"][0]
    # force the model to emit a newline: bias the LM head towards it
    with torch.no_grad():
        model.lm_head.weight[newline] += 50 * model.lm_head.weight.abs().max()
    out = decode(model, tokenizer, ids(tokenizer, ["abc"]), [None], DecodingConfig(max_new_tokens=5))
    assert out == [[]]
    out = decode(model, tokenizer, ids(tokenizer, ["abc"]), [None], DecodingConfig(max_new_tokens=5, stop_at_newline=False))
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
    with pytest.raises(ValueError, match=r"as config or as keywords \(num_beams\), not both"):
        bank.generate(["x"], None, DecodingConfig(max_new_tokens=2), num_beams=5)  # num_beams was dropped
    bank.remove("one")
    assert bank.ids() == ["two"]


# --------------------------------------------------------------------------- repetition controls


def test_repetition_controls_on_logits():
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
    p1, p2 = prefixes(model, tokenizer)
    seqs, rows = ids(tokenizer, SOURCES), [p1, p2, None, p2, p1]
    plain = decode(model, tokenizer, seqs, rows, DecodingConfig(max_new_tokens=12, num_beams=beams, stop_at_newline=False))
    assert any(len(set(zip(o, o[1:]))) < len(o) - 1 for o in plain)  # a random model loops: the test has teeth
    config = DecodingConfig(max_new_tokens=12, num_beams=beams, stop_at_newline=False, no_repeat_ngram_size=2,
                            repetition_penalty=1.3)
    batched = decode(model, tokenizer, seqs, rows, config)
    for out in batched:
        bigrams = list(zip(out, out[1:]))
        assert len(set(bigrams)) == len(bigrams), out
    assert batched == [reference(model, tokenizer, s, r, config) for s, r in zip(seqs, rows)]


def test_bank_passes_repetition_controls(tokenizer):
    model = tiny_model("gpt2", seed=1)
    bank = PrefixBank(model, tokenizer)
    plain = bank.generate(SOURCES, None, max_new_tokens=10, stop_at_newline=False)
    controlled = bank.generate(SOURCES, None, max_new_tokens=10, stop_at_newline=False, no_repeat_ngram_size=1)
    assert plain != controlled
