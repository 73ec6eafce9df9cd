"""The engine: a row's greedy tokens equal the oracle's (test_generation.reference: that row alone, recomputed
at every step), whatever joins or leaves the batch around it; seeded sampling is reproducible; stops, max_tokens, cancellation,
timeouts and logprobs behave per row."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import ByteTokenizer, tiny_model
from prefixtune import cache
from prefixtune.engine import Engine, Request
from prefixtune.generation import DecodingConfig
from prefixtune.forward import position_ids, prefix_kv_from_groups
from prefixtune.models import model_spec
from test_generation import SOURCES, ids, prefixes, reference

torch.set_num_threads(1)


class LetterTokenizer(ByteTokenizer):
    """Every token is one ASCII letter, so any output has text (for stop strings)."""

    def decode(self, ids, skip_special_tokens=False):
        ids = ids.tolist() if torch.is_tensor(ids) else ids
        return "".join(chr(ord("a") + int(i) % 26) for i in ids if int(i) > 2)


def alone(model, tokenizer, seq, prefix, max_tokens):
    """The oracle's greedy tokens for the row by itself."""
    return reference(model, tokenizer, seq, prefix, DecodingConfig(max_new_tokens=max_tokens, stop_at_newline=False))


def run(engine, schedule, cancel_at=None):
    """Step the engine; `schedule[step]` lists requests added before that step; `cancel_at[step]`
    lists request ids cancelled before it. Returns {request_id: [events]}."""
    events, step = {}, 0
    cancel_at = cancel_at or {}
    while step <= max(schedule) or engine.has_work():
        for r in schedule.get(step, []):
            engine.add_request(r)
        for rid in cancel_at.get(step, []):
            engine.cancel(rid)
        for e in engine.step():
            events.setdefault(e.request_id, []).append(e)
        step += 1
        assert step < 500
    return events


def tokens_of(events):
    return [e.token for e in events if e.token is not None]


@pytest.mark.parametrize("family,fast", [("llama", True), ("llama", False), ("gpt2", False)])
def test_greedy_equals_alone_under_continuous_batching(family, fast, tokenizer):
    model = tiny_model(family, seed=1)
    p1, p2 = prefixes(model, tokenizer, lengths=(3, 6))
    seqs = ids(tokenizer, SOURCES + ["q", "the last one"])
    plan = [  # (prefix, max_tokens, step it arrives)
        (p1, 12, 0), (p2, 3, 0), (None, 9, 0), (p2, 10, 2), (p1, 1, 2), (None, 7, 5), (p1, 11, 9)]
    reqs = [Request(s, prefix=p, max_tokens=m, request_id=f"r{i}") for i, (s, (p, m, _)) in enumerate(zip(seqs, plan))]
    schedule = {}
    for r, (_, _, at) in zip(reqs, plan):
        schedule.setdefault(at, []).append(r)
    # a batch of 3 slots for 7 requests: rows wait, join as others finish, and one is cancelled mid-way
    engine = Engine(model, tokenizer, max_batch=3, max_len=64, dtype="fp32", fast=fast)
    assert engine.path == ("llama_fast" if fast and family == "llama" else "hf")
    victim = Request(seqs[0], prefix=p2, max_tokens=20, request_id="victim")
    schedule.setdefault(1, []).append(victim)
    events = run(engine, schedule, cancel_at={6: ["victim"]})
    assert engine.stats["max_running"] == 3
    for r, (p, m, _) in zip(reqs, plan):
        assert tokens_of(events[r.request_id]) == alone(model, tokenizer, r.prompt, p, m), r.request_id
        assert events[r.request_id][-1].finish_reason == "length"
    cancelled = events["victim"]
    assert cancelled[-1].finish_reason == "cancelled" and cancelled[-1].token is None
    partial = tokens_of(cancelled)
    assert 0 < len(partial) < 20
    assert partial == alone(model, tokenizer, victim.prompt, p2, 20)[: len(partial)]
    assert not engine.has_work() and engine.num_running == 0


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_encoder_decoder_rows_equal_alone(family, tokenizer):
    model = tiny_model(family, seed=1)
    p1, p2 = prefixes(model, tokenizer)
    seqs = ids(tokenizer, SOURCES)
    rows = [p1, p2, None, p2, p1]
    engine = Engine(model, tokenizer, max_batch=2, max_len=64, dtype="fp32")
    outs = engine.generate([Request(s, prefix=p, max_tokens=6) for s, p in zip(seqs, rows)])
    assert [o.choices[0].token_ids for o in outs] == [alone(model, tokenizer, s, p, 6) for s, p in zip(seqs, rows)]


def test_stop_tokens_end_a_row_without_output(tokenizer):
    model = tiny_model("llama", seed=1)
    seq = ids(tokenizer, ["name : The Eagle"])[0]
    full = alone(model, tokenizer, seq, None, 10)
    stop = full[3]
    engine = Engine(model, tokenizer, max_batch=4, max_len=64, dtype="fp32")
    out = engine.generate([Request(seq, max_tokens=10, stop_token_ids=[stop]), Request(seq, max_tokens=10)])
    assert out[0].choices[0].token_ids == full[: full.index(stop)]
    assert out[0].choices[0].finish_reason == "stop"
    assert out[1].choices[0].token_ids == full


def test_max_tokens_per_row(tokenizer):
    model = tiny_model("llama", seed=3)
    seqs = ids(tokenizer, SOURCES[:3])
    engine = Engine(model, tokenizer, max_batch=3, max_len=64, dtype="fp32")
    outs = engine.generate([Request(s, max_tokens=m, ignore_eos=True) for s, m in zip(seqs, (1, 4, 9))])
    assert [len(o.choices[0].token_ids) for o in outs] == [1, 4, 9]
    assert all(o.choices[0].finish_reason == "length" for o in outs)


def test_stop_strings_cut_the_text_and_stream_consistently():
    tokenizer = LetterTokenizer()
    model = tiny_model("llama", seed=1)
    seq = ids(tokenizer, ["name : The Eagle | food : Thai"])[0]
    full = tokenizer.decode(alone(model, tokenizer, seq, None, 16))
    assert len(full) >= 8
    stop = full[4:6]
    expected = full[: full.find(stop)]
    engine = Engine(model, tokenizer, max_batch=2, max_len=64, dtype="fp32")
    events = run(engine, {0: [Request(seq, max_tokens=16, stop=[stop, "zzzzzzzz"], request_id="s"),
                              Request(seq, max_tokens=16, request_id="plain")]})
    text = "".join(e.text for e in events["s"])
    assert text == expected and stop not in text
    assert events["s"][-1].finish_reason == "stop"
    assert "".join(e.text for e in events["plain"]) == full
    # while running, text that could still turn into a stop string is held back
    assert all(len("".join(e.text for e in events["s"][: i + 1])) <= max(0, len(full[: i + 1]) - 7)
               for i in range(len(events["s"]) - 1))


def test_seeded_sampling_is_reproducible_alone_or_in_a_batch(tokenizer):
    model = tiny_model("llama", seed=2)
    p1, p2 = prefixes(model, tokenizer)
    seqs = ids(tokenizer, SOURCES)

    def sampled(seed, n=1):
        return Request(seqs[1], prefix=p1, max_tokens=12, temperature=1.3, top_p=0.9, top_k=50, seed=seed, n=n,
                       ignore_eos=True)

    engine = Engine(model, tokenizer, max_batch=4, max_len=64, dtype="fp32")
    solo = engine.generate([sampled(7)])[0].choices[0].token_ids
    others = [Request(seqs[0], prefix=p2, max_tokens=5), Request(seqs[2], max_tokens=12, temperature=0.8, seed=1),
              Request(seqs[3], prefix=p1, max_tokens=9)]
    schedule = {0: others[:2], 3: [sampled(7, n=2)], 4: others[2:]}
    events = run(Engine(model, tokenizer, max_batch=4, max_len=64, dtype="fp32"), schedule)
    rid = schedule[3][0].request_id
    choice0 = [e.token for e in events[rid] if e.index == 0 and e.token is not None]
    choice1 = [e.token for e in events[rid] if e.index == 1 and e.token is not None]
    assert choice0 == solo                                                        # same seed, same tokens
    assert choice1 == engine.generate([sampled(8)])[0].choices[0].token_ids      # choice i samples with seed + i
    assert choice1 != choice0
    assert engine.generate([sampled(7)])[0].choices[0].token_ids == solo
    greedy = alone(model, tokenizer, seqs[1], p1, 12)
    assert solo != greedy                                                         # it did sample


def test_top_k_one_is_greedy(tokenizer):
    model = tiny_model("llama", seed=2)
    seq = ids(tokenizer, ["hello there"])[0]
    engine = Engine(model, tokenizer, max_batch=2, max_len=64, dtype="fp32")
    out = engine.generate([Request(seq, max_tokens=8, temperature=2.0, top_k=1, seed=3)])
    assert out[0].choices[0].token_ids == alone(model, tokenizer, seq, None, 8)


def test_logprobs_are_the_log_softmax_of_the_step_logits(tokenizer):
    model = tiny_model("llama", seed=1)
    spec = model_spec(model)
    (p,) = prefixes(model, tokenizer, lengths=(4,))
    seq = ids(tokenizer, ["name : Zizzi"])[0]
    engine = Engine(model, tokenizer, max_batch=2, max_len=64, dtype="fp32")
    out = engine.generate([Request(seq, prefix=p, max_tokens=5, logprobs=True, top_logprobs=3, ignore_eos=True)])
    choice = out[0].choices[0]
    assert len(choice.logprobs) == len(choice.top_logprobs) == 5
    x = torch.tensor([seq])
    cache.install(model)  # the prefix enters attention through prefixtune's attention function
    with torch.no_grad():  # the prompt's positions count from the prefix's length, as in training
        first = model(input_ids=x, attention_mask=torch.ones_like(x), position_ids=position_ids(torch.ones_like(x), 4),
                      prefix_kv=prefix_kv_from_groups([p], spec)).logits[0, -1].float()
    reference = torch.log_softmax(first, -1)
    assert choice.logprobs[0] == pytest.approx(float(reference[choice.token_ids[0]]), abs=1e-4)
    top_ids = [t for t, _ in choice.top_logprobs[0]]
    assert top_ids == reference.topk(3).indices.tolist()
    for lp, top, token in zip(choice.logprobs, choice.top_logprobs, choice.token_ids):
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True) and sum(torch.tensor(values).exp()) <= 1 + 1e-5
        assert top[0][0] == token and lp == pytest.approx(top[0][1])   # greedy: the chosen token is the top one
        assert lp <= 0


def test_cancel_and_timeout_of_waiting_and_running_rows(tokenizer):
    model = tiny_model("llama", seed=1)
    seqs = ids(tokenizer, SOURCES[:3])
    engine = Engine(model, tokenizer, max_batch=1, max_len=128, dtype="fp32")
    running = engine.add_request(Request(seqs[0], max_tokens=30, ignore_eos=True))
    waiting = engine.add_request(Request(seqs[1], max_tokens=30))
    expires = engine.add_request(Request(seqs[2], max_tokens=30, timeout_s=0.0))
    first = engine.step()
    assert [e.request_id for e in first if e.finish_reason == "timeout"] == [expires]
    assert engine.num_running == 1 and engine.num_waiting == 1
    engine.cancel(waiting)
    engine.cancel(running)
    events = engine.step()
    assert {(e.request_id, e.finish_reason, e.token) for e in events} == {(waiting, "cancelled", None),
                                                                         (running, "cancelled", None)}
    assert not engine.has_work()


def test_requests_from_another_thread_while_stepping(tokenizer):
    model = tiny_model("gpt2", seed=1)
    seqs = ids(tokenizer, SOURCES)
    engine = Engine(model, tokenizer, max_batch=2, max_len=64, dtype="fp32")
    got: dict[str, list[int]] = {}
    finished = threading.Event()

    def worker():
        done = 0
        while done < len(seqs):
            for e in engine.step():
                if e.token is not None:
                    got.setdefault(e.request_id, []).append(e.token)
                done += e.finished
        finished.set()

    thread = threading.Thread(target=worker)
    rids = [engine.add_request(Request(seqs[0], max_tokens=6))]
    thread.start()
    rids += [engine.add_request(Request(s, max_tokens=6)) for s in seqs[1:]]
    assert finished.wait(60)
    thread.join()
    assert [got.get(r, []) for r in rids] == [alone(model, tokenizer, s, None, 6) for s in seqs]


def test_requests_are_checked(tokenizer):
    model = tiny_model("llama", seed=1)
    engine = Engine(model, tokenizer, max_batch=2, max_len=16, dtype="fp32")
    with pytest.raises(ValueError, match="max_len"):
        engine.add_request(Request([5] * 10, max_tokens=10))
    with pytest.raises(ValueError, match="widths"):
        engine.add_request(Request([5, 6], prefix={"decoder": torch.zeros(2, 7)}))
    with pytest.raises(ValueError):
        Request([], max_tokens=3)
    with pytest.raises(ValueError):
        Request([1], top_p=0)


def smollm2_rows(data_root, dtype):
    """The embedded model in `dtype`, three random prefixes (lengths 10, 5, 10) and six E2E test sources
    encoded by the bank: what the SmolLM2 engine tests decode."""
    from prefixtune.bank import PrefixBank
    from prefixtune.data.e2e import load_e2e
    from prefixtune.models import load_base_model
    from prefixtune.prefix import PrefixConfig, build_prefix_encoder

    model, tokenizer = load_base_model("smollm2-135m", dtype=dtype)
    spec = model_spec(model)
    ps = []
    for i, length in enumerate((10, 5, 10)):
        enc = build_prefix_encoder(model, tokenizer, spec, PrefixConfig(prefix_len=length), seed=1000 + i)
        with torch.no_grad():
            ps.append({g: t.float() for g, t in enc().items()})
    bank = PrefixBank(model, tokenizer)
    seqs = [bank.encode(r.source, None) for r in load_e2e("test", data_root)[:6]]
    return model, tokenizer, spec, ps, seqs


@pytest.mark.slow
def test_smollm2_bf16_batch_equals_bf16_alone(data_root):
    """The lean bf16 step on the embedded model: rows joining and leaving a batch of 4 decode the
    tokens each row gets alone (the lean step runs a lone row as two copies of itself: see below)."""
    from prefixtune.precision import bf16_available

    if not bf16_available(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16")
    model, tokenizer, spec, ps, seqs = smollm2_rows(data_root, torch.bfloat16)
    rows = [ps[0], ps[1], None, ps[2], ps[0], None]
    lengths = [16, 6, 12, 16, 9, 16]
    engine = Engine(model, tokenizer, max_batch=4, max_len=128)
    assert engine.path == "llama_fast" and engine.dtype == torch.bfloat16
    outs = engine.generate([Request(s, prefix=p, max_tokens=m, ignore_eos=True)
                            for s, p, m in zip(seqs, rows, lengths)])
    alone = Engine(model, tokenizer, max_batch=4, max_len=128)
    for out, s, p, m in zip(outs, seqs, rows, lengths):
        # oneDNN runs a lone row's bf16 matmuls on another kernel, whose last bits differ: the engine runs
        # a lone row as two for that reason (`llama_fast._Linear`)
        ref = alone.generate([Request(s, prefix=p, max_tokens=m, ignore_eos=True)])
        assert out.choices[0].token_ids == ref[0].choices[0].token_ids


# -- offline decoding (PrefixBank, the CLI, evaluation and the methods) goes through the engine ------------
def test_offline_decode_equals_alone_for_every_family_greedy_and_beams(tokenizer):
    from prefixtune.engine.offline import decode_ids

    model = tiny_model("llama", seed=3)
    p1, p2 = prefixes(model, tokenizer, lengths=(2, 5))
    seqs = ids(tokenizer, SOURCES)
    rows = [p1, None, p2, p1, p2]
    config = DecodingConfig(max_new_tokens=7, stop_at_newline=False)
    # batch_size 2 for 5 rows: rows wait for a slot, as in a long evaluation
    got = decode_ids(model, tokenizer, seqs, rows, config, batch_size=2)
    assert got == [alone(model, tokenizer, s, p, 7) for s, p in zip(seqs, rows)]
    # beam search and the repetition controls too, 2 inputs at a time (6 slots)
    beam = DecodingConfig(max_new_tokens=7, stop_at_newline=False, num_beams=3, length_penalty=0.7,
                          no_repeat_ngram_size=2)
    assert decode_ids(model, tokenizer, seqs, rows, beam, batch_size=2) == [
        reference(model, tokenizer, s, p, beam) for s, p in zip(seqs, rows)]
    bart = tiny_model("bart")  # encoder-decoders: row by row
    assert decode_ids(bart, tokenizer, seqs, [None] * len(seqs), config) == [
        alone(bart, tokenizer, s, None, 7) for s in seqs]
    with pytest.raises(ValueError, match="dtype"):
        DecodingConfig(dtype="fp16")


def test_bank_generate_runs_on_the_engine_and_equals_each_row_alone(tokenizer, monkeypatch):
    import prefixtune.bank as bank_module
    from prefixtune.bank import PrefixBank
    from prefixtune.prefix_file import ExportedPrefix

    model = tiny_model("gpt2", seed=2)
    p1, p2 = prefixes(model, tokenizer, lengths=(3, 4))
    bank = PrefixBank(model, tokenizer)
    meta = {"fingerprint": model_spec(model).fingerprint()}
    bank.add("a", ExportedPrefix(p1, meta))
    bank.add("b", ExportedPrefix(p2, meta))
    texts = ["name : The Eagle", "x", "a longer source to decode here", "type : pub"]
    pids = ["a", "b", None, "a"]
    calls = []
    real = bank_module.decode_ids
    monkeypatch.setattr(bank_module, "decode_ids", lambda *a, **k: calls.append(1) or real(*a, **k))
    greedy = bank.generate(texts, pids, DecodingConfig(max_new_tokens=6), batch_size=3)
    assert calls, "decoding did not go through the engine"
    config = DecodingConfig(max_new_tokens=6)
    want = [reference(model, tokenizer, bank.encode(t, p), None if p is None else bank.get(p).p, config)
            for t, p in zip(texts, pids)]
    assert greedy == [bank.tokenizer.decode(s, skip_special_tokens=True).split("\n")[0].strip() for s in want]


def with_adapters(model, width: int = 4):
    """`model` with a bottleneck adapter after every attention and MLP output projection (as the adapter
    baselines train it), its up projections random so that the adapters change the output."""
    from prefixtune.architectures import adapter_sites
    from prefixtune.methods.adapter import WithAdapter

    torch.manual_seed(5)
    for parent, attr in adapter_sites(model):
        wrapped = WithAdapter(getattr(parent, attr), model.config.hidden_size, width)
        for linear in (wrapped.adapter.down, wrapped.adapter.up):
            torch.nn.init.normal_(linear.weight, std=0.5)
            torch.nn.init.normal_(linear.bias, std=0.5)
        setattr(parent, attr, wrapped)
    return model


def test_a_model_with_adapters_decodes_on_the_lean_step_as_the_hf_forward_does(tokenizer):
    """The adapter baselines decode on the lean Llama step: each row's greedy and beam tokens equal the
    oracle's (the row alone, recomputed through the HF forward, adapters and all), in a continuous batch
    with prefixes, and so do its log-probabilities at every step; without its adapters the model decodes
    otherwise (so they are not skipped)."""
    from prefixtune.engine import llama_fast
    from prefixtune.engine.offline import decode_ids

    plain = tiny_model("llama", seed=4)
    p1, p2 = prefixes(plain, tokenizer, lengths=(2, 5))
    seqs = ids(tokenizer, SOURCES)
    rows = [p1, None, p2, p1, p2]
    plain_tokens = [alone(plain, tokenizer, s, p, 8) for s, p in zip(seqs, rows)]
    model = with_adapters(plain)
    assert llama_fast.supports(model)
    engine = Engine(model, tokenizer, max_batch=3, max_len=64, dtype="fp32")
    assert engine.path == "llama_fast"
    outs = engine.generate([Request(s, prefix=p, max_tokens=8, ignore_eos=True, logprobs=True, top_logprobs=5)
                            for s, p in zip(seqs, rows)])
    want = [alone(model, tokenizer, s, p, 8) for s, p in zip(seqs, rows)]
    assert [o.choices[0].token_ids for o in outs] == want
    assert want != plain_tokens
    spec = model_spec(model)
    cache.install(model)
    for out, s, p in zip(outs, seqs, rows):  # every step's top log-probabilities, as the HF forward gives them
        choice, start = out.choices[0], 0 if p is None else next(iter(p.values())).shape[0]
        x = torch.tensor([s + choice.token_ids[:-1]])
        with torch.no_grad():
            logits = model(input_ids=x, attention_mask=torch.ones_like(x), position_ids=position_ids(
                torch.ones_like(x), start), prefix_kv=None if p is None else prefix_kv_from_groups([p], spec)).logits
        hf = torch.log_softmax(logits[0, len(s) - 1:].float(), -1)
        for step, top in enumerate(choice.top_logprobs):
            ids_, values = zip(*top)
            assert torch.allclose(torch.tensor(values), hf[step, list(ids_)], atol=1e-4), step
            assert list(ids_) == hf[step].topk(5).indices.tolist()
    beam = DecodingConfig(max_new_tokens=6, stop_at_newline=False, num_beams=3, length_penalty=0.7, dtype="fp32")
    assert decode_ids(model, tokenizer, seqs, rows, beam, batch_size=2) == [
        reference(model, tokenizer, s, p, beam) for s, p in zip(seqs, rows)]


def test_adapter_rows_in_bf16_get_the_bits_they_get_alone(tokenizer):
    """bf16 on the lean step with adapters: a row decodes the same tokens beside other rows as alone (the
    adapters' matmuls are packed and row-invariant like the projections')."""
    from prefixtune.precision import bf16_available

    if not bf16_available(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16")
    model = with_adapters(tiny_model("llama", seed=6))
    p1, p2 = prefixes(model, tokenizer, lengths=(3, 4))
    seqs = ids(tokenizer, SOURCES)
    rows = [p1, None, p2, p1, p2]
    engine = Engine(model, tokenizer, max_batch=4, max_len=64, dtype="bf16")
    assert engine.path == "llama_fast"
    requests = [Request(s, prefix=p, max_tokens=10, ignore_eos=True) for s, p in zip(seqs, rows)]
    batched = [o.choices[0].token_ids for o in engine.generate(requests)]
    solo = Engine(model, tokenizer, max_batch=4, max_len=64, dtype="bf16")
    assert batched == [solo.generate([Request(s, prefix=p, max_tokens=10, ignore_eos=True)])[0].choices[0].token_ids
                       for s, p in zip(seqs, rows)]


def test_a_model_changed_otherwise_is_decoded_on_the_hf_forward(tokenizer):
    """The lean step reads weights directly: a wrapper it does not know, an adapter after a projection it
    fuses (q), or a hook, would be decoded without the change, so such models take the HF path and decode
    what the model computes."""
    from prefixtune.engine import llama_fast
    from prefixtune.methods.adapter import WithAdapter

    class Scaled(torch.nn.Module):  # a wrapper the lean step cannot know
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 3 * self.inner(x)

    seq = ids(tokenizer, SOURCES[:1])[0]
    for change in ("wrapper", "fused site", "hook"):
        model = tiny_model("llama", seed=4)
        layer = model.model.layers[0]
        if change == "wrapper":
            layer.mlp.down_proj = Scaled(layer.mlp.down_proj)
        elif change == "fused site":
            layer.self_attn.q_proj = WithAdapter(layer.self_attn.q_proj, 32, 4)
            torch.nn.init.normal_(layer.self_attn.q_proj.adapter.up.weight, std=0.5)
        else:
            layer.mlp.register_forward_hook(lambda module, args, out: out * 3)
        assert not llama_fast.supports(model), change
        engine = Engine(model, tokenizer, max_batch=2, max_len=64, dtype="fp32")
        assert engine.path == "hf", change
        out = engine.generate([Request(seq, max_tokens=6)])[0].choices[0].token_ids
        assert out == alone(model, tokenizer, seq, None, 6), change


def test_offline_decoding_from_two_threads_at_once_gives_each_its_own_rows(tokenizer):
    from concurrent.futures import ThreadPoolExecutor

    from prefixtune.engine.offline import EngineCache, decode_ids

    model = tiny_model("llama", seed=5)
    p1, p2 = prefixes(model, tokenizer, lengths=(2, 3))
    seqs = ids(tokenizer, SOURCES)
    config = DecodingConfig(max_new_tokens=6, stop_at_newline=False)
    engines = EngineCache(model, tokenizer)  # shared, as a PrefixBank shares its own between callers
    first_row_done, release = threading.Event(), threading.Event()

    def paused(_):  # the first call stops after its first finished row, with its other rows in the engine
        first_row_done.set()
        release.wait(10)

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(decode_ids, model, tokenizer, seqs, [p1] * len(seqs), config, batch_size=2,
                            engines=engines, progress=paused)
        assert first_row_done.wait(10)
        second = pool.submit(decode_ids, model, tokenizer, seqs[::-1], [p2] * len(seqs), config, engines=engines)
        time.sleep(0.5)
        assert not second.done()  # it waits for the engine, rather than stepping the first call's rows
        release.set()
        got = [first.result(30), second.result(30)]
    assert got[0] == [alone(model, tokenizer, s, p1, 6) for s in seqs]
    assert got[1] == [alone(model, tokenizer, s, p2, 6) for s in seqs[::-1]]


# -- issue 21: sampling edge cases -----------------------------------------------------------------
def test_a_temperature_below_the_floor_is_greedy_and_seeds_outside_int64_are_refused(tokenizer):
    from prefixtune.engine.request import MIN_TEMPERATURE, SEED_RANGE

    model = tiny_model("llama", seed=2)
    seq = ids(tokenizer, ["hello there"])[0]
    engine = Engine(model, tokenizer, max_batch=2, max_len=64, dtype="fp32")
    greedy = alone(model, tokenizer, seq, None, 8)
    for temperature in (1e-300, 5e-324, MIN_TEMPERATURE / 2):  # logits / 1e-300 overflow fp32: garbage before
        out = engine.generate([Request(seq, max_tokens=8, temperature=temperature, seed=3, ignore_eos=True)])
        assert out[0].choices[0].token_ids == greedy[:8], temperature
    for seed in (SEED_RANGE[1] + 1, SEED_RANGE[0] - 1, 2**80, -(2**80)):
        with pytest.raises(ValueError, match="seed must be an int64"):
            Request(seq, temperature=1.0, seed=seed)
    top = Request(seq, max_tokens=6, temperature=1.5, seed=SEED_RANGE[1], n=2, ignore_eos=True)  # wraps, not fails
    first, second = engine.generate([top])[0].choices
    assert first.token_ids != second.token_ids


# -- issue 21: fair admission across tenants ---------------------------------------------------------
def _row(tenant, prompt_len: int, tokens: int = 0):
    from prefixtune.engine.scheduler import Row
    from prefixtune.engine.stops import StopState

    request = Request(list(range(3, 3 + prompt_len)), max_tokens=64, tenant=tenant)
    row = Row(request, 0, StopState(request, None, set()))
    row.stop.tokens = list(range(tokens))
    return row


def test_a_tenant_with_many_long_prompts_does_not_take_a_steps_prefill_from_another():
    from prefixtune.engine.scheduler import Scheduler

    scheduler = Scheduler(max_batch=32, max_prefill_tokens=2048)
    scheduler.submit([_row("a", 508) for _ in range(32)] + [_row("b", 20)])  # b's one row came last
    scheduler.leaving(0.0)
    first = scheduler.admit()
    # turns: a's oldest, b's, then a's again within a's half of the budget (old: four of a's, b after 8 steps)
    assert [r.tenant for r in first] == ["a", "b", "a"]
    for r in first:
        scheduler.place(r)
    second = scheduler.admit()  # b has nothing waiting, but it runs: a still takes only its half
    assert [r.tenant for r in second] == ["a", "a"] and len(scheduler.waiting) == 28


def test_a_tenant_over_its_share_of_slots_is_preempted_for_a_waiting_tenant_and_resumes_exactly(tokenizer):
    model = tiny_model("llama", seed=2)
    seqs = ids(tokenizer, SOURCES)
    p1, _ = prefixes(model, tokenizer)

    def hog():  # n=4 rows of one tenant: every slot
        return Request(seqs[1], prefix=p1, max_tokens=30, n=4, ignore_eos=True, tenant="a",
                       temperature=1.0, seed=11)

    engine = Engine(model, tokenizer, max_batch=4, max_len=128, dtype="fp32")
    solo = engine.generate([hog()])[0]
    engine = Engine(model, tokenizer, max_batch=4, max_len=128, dtype="fp32")
    a = hog()
    b = Request(seqs[0], max_tokens=3, ignore_eos=True, tenant="b")
    events = run(engine, {0: [a], 5: [b]})
    steps_to_b = None
    for step, e in enumerate(events[b.request_id]):
        if e.token is not None:
            steps_to_b = step
            break
    assert steps_to_b == 0 and engine.scheduler.preemptions == 1  # b's first token at the step it arrived
    for i, choice in enumerate(solo.choices):  # the preempted row resumed where it was: the same tokens
        assert [e.token for e in events[a.request_id] if e.index == i and e.token is not None] == choice.token_ids
    assert tokens_of(events[b.request_id]) == alone(model, tokenizer, seqs[0], None, 3)


def test_a_lone_row_gets_the_bits_it_gets_in_a_batch():
    """oneDNN's bf16 matmul runs one row on another kernel whose sums differ in the last bit (K=1536, as
    SmolLM2's down projection: ~10% of rows here): `_Linear` runs a lone row as two, so a row decoded
    alone gets the bits it gets beside any other rows."""
    from prefixtune.engine.llama_fast import _Linear

    torch.manual_seed(0)
    lin = _Linear((torch.randn(576, 1536) * 0.02).to(torch.bfloat16), 32)
    if lin.packed is None:
        pytest.skip("no oneDNN bf16 packing on this CPU")
    x = (torch.randn(256, 1536) * 0.3).to(torch.bfloat16)
    alone = torch.cat([lin(x[i: i + 1]) for i in range(len(x))])
    for rows in (2, 3, 32):
        batched = torch.cat([lin(x[i: i + rows]) for i in range(0, len(x), rows)])
        assert torch.equal(alone, batched), rows


# -- the ablations' virtual tokens (methods/embedding.py, infix.py) ------------------------------------------
@pytest.mark.parametrize("kind", ["embeds", "infix"])
def test_virtual_tokens_prefilled_in_chunks_equal_one_piece_and_the_lean_step_declines_them(kind, tokenizer):
    model = tiny_model("llama", seed=1)
    spec = model_spec(model)
    (p,) = prefixes(model, tokenizer, lengths=(4,))
    torch.manual_seed(0)
    virtual = dict(prefix_embeds=torch.randn(3, spec.hidden_size)) if kind == "embeds" else dict(prefix=p, infix=True)
    seqs = ids(tokenizer, SOURCES)

    def outputs(**engine):
        e = Engine(model, tokenizer, max_batch=3, max_len=96, dtype="fp32", fast=False, **engine)
        return [o.choices[0].token_ids for o in e.generate([Request(s, max_tokens=8, **virtual) for s in seqs])]

    whole = outputs()
    assert outputs(max_prefill_tokens=3) == whole  # prompts in chunks of 3 tokens, decode steps in between
    engine = Engine(model, tokenizer, max_batch=3, max_len=96, dtype="fp32", fast=False)
    plain = [o.choices[0].token_ids for o in engine.generate(
        [Request(s, max_tokens=8, prefix=p if kind == "infix" else None) for s in seqs])]
    assert plain != whole  # the virtual tokens change the tokens (an infix is not a prefix)
    lean = Engine(model, tokenizer, max_batch=3, max_len=96, dtype="fp32")
    assert lean.path == "llama_fast"
    with pytest.raises(ValueError, match="fast=False"):
        lean.add_request(Request(seqs[0], **virtual))
    with pytest.raises(ValueError, match="prefix_embeds must be"):
        Request(seqs[0], prefix_embeds=torch.zeros(spec.hidden_size))
    with pytest.raises(ValueError, match="infix=True needs a prefix"):
        Request(seqs[0], infix=True)


def test_a_request_the_step_could_not_decode_is_refused_at_add_not_in_the_batch(tokenizer):
    """A request whose decoding would raise inside `step` (which ends every row of the batch) is a ValueError
    naming the parameter at `add_request`, and the rows already running are untouched."""
    model = tiny_model("llama", seed=1)
    engine = Engine(model, tokenizer, max_batch=2, max_len=64, dtype="fp32")
    seq = ids(tokenizer, ["hello there"])[0]
    engine.add_request(Request(seq, max_tokens=4, ignore_eos=True, request_id="ok"))
    with pytest.raises(ValueError, match="top_logprobs"):
        engine.add_request(Request(seq, max_tokens=4, logprobs=True, top_logprobs=301))
    for bad in (300, -1):  # an IndexError in the step; -1 silently read the embedding table's last row
        with pytest.raises(ValueError, match="prompt token ids"):
            engine.add_request(Request(seq + [bad], max_tokens=4))
    events = run(engine, {0: []})
    assert tokens_of(events["ok"]) == alone(model, tokenizer, seq, None, 4)
    out = engine.generate([Request(seq, max_tokens=2, logprobs=True, top_logprobs=300)])  # the whole vocabulary
    assert len(out[0].choices[0].top_logprobs[0]) == 300


def test_a_row_past_the_models_positions_is_refused_at_add_not_in_the_batch(tokenizer):
    """GPT-2's learned positions end at n_positions (256 here): an engine built longer took the row and its step
    raised an IndexError, ending the row beside it too."""
    model = tiny_model("gpt2", seed=1)
    engine = Engine(model, tokenizer, max_batch=2, max_len=512, dtype="fp32")
    seq = ids(tokenizer, ["hello there"])[0]
    engine.add_request(Request(seq, max_tokens=4, ignore_eos=True, request_id="ok"))
    with pytest.raises(ValueError, match="max_tokens .*256 positions"):
        engine.add_request(Request([5] * 200, max_tokens=100, ignore_eos=True))
    events = run(engine, {0: []})
    assert tokens_of(events["ok"]) == alone(model, tokenizer, seq, None, 4)
    out = engine.generate([Request([5] * 200, max_tokens=56, ignore_eos=True)])  # exactly the 256 positions
    assert len(out[0].choices[0].token_ids) == 56


@pytest.mark.parametrize("field,value", [
    ("top_k", 2.5), ("top_logprobs", 2.0), ("no_repeat_ngram_size", 1.5), ("beams", 2.0),  # raised in the step
    ("max_tokens", 2.5), ("n", 2.0), ("seed", 1.5),
    ("temperature", float("nan")), ("temperature", float("inf")), ("length_penalty", float("nan")),  # garbage
    ("repetition_penalty", float("inf")), ("top_p", "0.5"), ("timeout_s", float("nan")),  # NaN: never timed out
    ("stop", [5])])
def test_a_parameter_of_the_wrong_type_or_not_finite_is_a_value_error_naming_it(field, value):
    name = "stop strings" if field == "stop" else field
    with pytest.raises(ValueError, match=name):
        Request([5, 6], **{"temperature": 1.0, "seed": 1, field: value})


def test_numeric_parameters_of_other_integer_and_real_types_are_taken():
    import numpy as np

    r = Request([5, 6], max_tokens=np.int64(3), top_k=np.int32(2), seed=np.int64(7), temperature=np.float32(0.5),
                timeout_s=float("inf"))
    assert type(r.max_tokens) is int and type(r.top_k) is int and type(r.seed) is int and r.temperature == 0.5


def test_an_encoder_decoder_row_past_the_models_positions_is_refused_at_add(tokenizer):
    """BART's learned positions (256 here) bound the encoder's prompt and the decoder's tokens alike: past them
    the row's step raised an IndexError, ending the row beside it."""
    model = tiny_model("bart", seed=1)
    engine = Engine(model, tokenizer, max_batch=2, max_len=512, dtype="fp32")
    engine.add_request(Request([5] * 10, max_tokens=4, ignore_eos=True, request_id="ok"))
    for prompt, max_tokens in ((257, 4), (10, 257)):
        with pytest.raises(ValueError, match="256 positions"):
            engine.add_request(Request([5] * prompt, max_tokens=max_tokens, ignore_eos=True))
    assert len(tokens_of(run(engine, {0: []})["ok"])) == 4
    out = engine.generate([Request([5] * 256, max_tokens=256, ignore_eos=True)])  # exactly the positions
    assert len(out[0].choices[0].token_ids) == 256


@pytest.mark.parametrize("family", ["llama", "bart"])
def test_a_prefix_not_shaped_length_by_width_is_refused_at_add(family, tokenizer):
    """A prefix of one group per (length, width) tensor: a batched (1, length, width) one, or a 1-D one, was taken
    and raised in the step's prefill, ending the row beside it."""
    from prefixtune.prefix import group_width, groups_of

    model = tiny_model(family, seed=1)
    spec = model_spec(model)
    widths = {g: group_width(spec, n) for g, n in groups_of(spec).items()}
    engine = Engine(model, tokenizer, max_batch=2, max_len=512, dtype="fp32")
    engine.add_request(Request([5, 6], max_tokens=3, ignore_eos=True, request_id="ok"))
    bad = [{g: torch.zeros(1, 4, w) for g, w in widths.items()}, {g: torch.zeros(w) for g, w in widths.items()}]
    if len(widths) > 1:  # groups of different lengths
        bad.append({g: torch.zeros(4 + i, w) for i, (g, w) in enumerate(widths.items())})
    for prefix in bad:
        with pytest.raises(ValueError, match="length, width"):
            engine.add_request(Request([5, 6], prefix=prefix, max_tokens=3))
    with pytest.raises(ValueError, match="got Tensor"):  # P itself, not its groups
        engine.add_request(Request([5, 6], prefix=torch.zeros(4, next(iter(widths.values()))), max_tokens=3))
    assert len(tokens_of(run(engine, {0: []})["ok"])) == 3


def test_a_request_id_names_one_live_request(tokenizer):
    """Two live requests under one id shared their events: each output got both rows' tokens, interleaved."""
    from prefixtune.engine import Replicas

    model = tiny_model("llama", seed=1)
    engine = Engine(model, tokenizer, max_batch=4, max_len=64, dtype="fp32")
    a, b = ids(tokenizer, ["hello there", "q"])
    with pytest.raises(ValueError, match="unique"):
        engine.generate([Request(a, max_tokens=3, request_id="x"), Request(b, max_tokens=3, request_id="x")])
    assert not engine.has_work()
    engine.add_request(Request(a, max_tokens=3, ignore_eos=True, request_id="x", n=2, temperature=1.0, seed=1))
    with pytest.raises(ValueError, match="'x' is in use"):
        engine.add_request(Request(b, max_tokens=3, request_id="x"))
    events = run(engine, {0: []})
    assert sorted(e.index for e in events["x"] if e.finished) == [0, 1]
    # finished (or cancelled), an id may be used again
    engine.add_request(Request(b, max_tokens=30, beams=2, request_id="x"))
    run(engine, {0: []}, cancel_at={1: ["x"]})
    out = engine.generate([Request(b, max_tokens=3, ignore_eos=True, request_id="x")])
    assert out[0].choices[0].token_ids == alone(model, tokenizer, b, None, 3)
    replicas = Replicas(model, tokenizer, replicas=2, max_batch=4, max_len=64, dtype="fp32")
    try:
        replicas.add_request(Request(a, max_tokens=3, request_id="y"))
        with pytest.raises(ValueError, match="'y' is in use"):  # it would go to the other replica
            replicas.add_request(Request(b, max_tokens=3, request_id="y"))
    finally:
        replicas.close()


@pytest.mark.parametrize("setting", [{"max_prefill_tokens": 0}, {"max_prefill_tokens": -5}, {"max_batch": 0},
                                     {"max_batch": 2.5}, {"max_len": 0}, {"block_size": 0}, {"tenant_step_rows": -1}])
def test_an_engine_sized_below_one_row_is_a_value_error_naming_the_setting(setting, tokenizer):
    """max_prefill_tokens 0 built an engine that never admitted a row (generate never returned); the others
    raised in a step (or a ZeroDivisionError at build)."""
    model = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match=next(iter(setting))):
        Engine(model, tokenizer, **{"max_batch": 2, "max_len": 64, "dtype": "fp32", **setting})


def test_a_packed_bf16_matmul_gives_each_row_its_own_bits_past_32_rows():
    """The lean step's premise: a row's bf16 bits do not depend on how many rows share its matmul. On an
    AVX10.1/AMX Xeon oneDNN broke it from 33 rows (a prefill's tokens), so a mixed batch's first token
    differed from the row decoded alone; `_Linear` now runs more than ROW_BLOCK rows in blocks."""
    from prefixtune.engine.llama_fast import _Linear
    from prefixtune.precision import bf16_available

    if not bf16_available(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16")
    torch.manual_seed(0)
    linear = _Linear((torch.randn(960, 576) * 0.05).bfloat16(), 32)  # SmolLM2's fused q/k/v shape
    assert linear.rows_independent
    x = torch.randn(100, 576).bfloat16()
    alone = torch.cat([linear(x[r: r + 1]) for r in range(len(x))])
    for rows in (2, 32, 33, 40, 64, 100):
        assert torch.equal(linear(x[:rows]), alone[:rows]), rows
