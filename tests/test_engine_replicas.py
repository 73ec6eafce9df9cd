"""Replicas (engine/replicas.py): N engines over one copy of the weights, stepped concurrently. A row's
tokens equal one engine's (bf16: a row's bits do not depend on its batch, so neither on its replica),
the weights are not copied, a request goes whole to the replica with the fewest rows, and cancelling
reaches the replica holding the request."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from prefixtune.engine import Engine, Replicas, Request, make_engine
from test_generation import SOURCES, ids, prefixes

torch.set_num_threads(1)


def bf16_or_skip():
    from prefixtune.precision import bf16_available

    if not bf16_available(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16: fp32 rows are not batch-invariant, so replicas change bits")


def mixed_requests(tokenizer, ps):
    """Greedy rows under mixed prefixes, seeded sampling with two choices, and a beam-5 request."""
    seqs = ids(tokenizer, SOURCES + ["q", "the last one"])
    plan = [ps[0], ps[1], None, ps[1], ps[0], None, ps[0]]
    out = [Request(s, prefix=p, max_tokens=7 + i, ignore_eos=True, logprobs=True, request_id=f"g{i}")
           for i, (s, p) in enumerate(zip(seqs, plan))]
    out.append(Request(seqs[1], prefix=ps[1], max_tokens=9, ignore_eos=True, temperature=0.9, seed=7, n=2,
                       request_id="sampled"))
    out.append(Request(seqs[3], prefix=ps[0], max_tokens=8, ignore_eos=True, beams=5, request_id="beam"))
    return out


def tokens(outputs):
    return [[c.token_ids for c in o.choices] for o in outputs]


@pytest.mark.parametrize("exact", [True, False])
def test_replicas_give_every_row_one_engines_tokens(tokenizer, exact):
    bf16_or_skip()
    model = tiny_model("llama", seed=1)
    ps = prefixes(model, tokenizer, lengths=(19, 6))
    one = Engine(model, tokenizer, max_batch=12, max_len=96, dtype="bf16", block_size=8, exact=exact)
    want = one.generate(mixed_requests(tokenizer, ps))
    replicas = Replicas(model, tokenizer, replicas=2, max_batch=12, max_len=96, dtype="bf16", block_size=8,
                        exact=exact)
    got = replicas.generate(mixed_requests(tokenizer, ps))
    assert tokens(got) == tokens(want)
    assert [o.choices[0].logprobs for o in got[:7]] == [o.choices[0].logprobs for o in want[:7]]
    assert all(e.stats["decode_tokens"] > 0 for e in replicas.engines)  # both replicas decoded rows
    assert len({tuple(t[0]) for t in tokens(want)}) > 3  # the rows differ: a mix-up would show
    assert not replicas.has_work() and replicas._rows == [0, 0] and not replicas._where
    replicas.close()


def test_replicas_share_one_copy_of_the_weights(tokenizer):
    bf16_or_skip()
    model = tiny_model("llama", seed=1)
    replicas = make_engine(model, tokenizer, replicas=3, max_batch=8, max_len=64, dtype="bf16")
    a, b, c = (e.backend for e in replicas.engines)
    assert replicas.path == "llama_fast" and replicas.max_batch == 9 and replicas.per_replica == 3
    for other in (b, c):
        assert other.kv is not a.kv and other.kv.max_batch == 3
        assert other.embed.data_ptr() == a.embed.data_ptr() and other.cos.data_ptr() == a.cos.data_ptr()
        for la, lo in zip(a.layers, other.layers):
            assert lo.qkv is la.qkv and lo.down is la.down and lo.ln1.data_ptr() == la.ln1.data_ptr()
    replicas.close()
    hf = make_engine(model, tokenizer, replicas=2, max_batch=8, max_len=64, dtype="bf16", fast=False)
    assert hf.path == "hf" and hf.engines[1].backend.model is hf.engines[0].backend.model  # converted once
    assert hf.engines[0].backend.model is not model and next(hf.engines[0].backend.model.parameters()).dtype == torch.bfloat16
    hf.close()
    assert isinstance(make_engine(model, tokenizer, max_batch=8, max_len=64), Engine)
    with pytest.raises(ValueError, match="replicas"):
        make_engine(model, tokenizer, replicas=0)


def test_requests_go_to_the_replica_with_fewest_rows_and_a_beam_group_stays_whole(tokenizer):
    model = tiny_model("llama", seed=1)
    replicas = Replicas(model, tokenizer, replicas=2, max_batch=12, max_len=64, dtype="fp32")
    seq = ids(tokenizer, ["hello there"])[0]
    replicas.add_request(Request(seq, max_tokens=4, beams=5, request_id="beam"))
    for i in range(7):
        replicas.add_request(Request(seq, max_tokens=4, request_id=f"r{i}"))
    where = {rid: w[0] for rid, w in replicas._where.items()}
    assert where["beam"] == 0 and [where[f"r{i}"] for i in range(7)] == [1, 1, 1, 1, 1, 0, 1]
    assert replicas._rows == [6, 6]
    with pytest.raises(ValueError, match="a replica's max_batch 6"):
        replicas.add_request(Request(seq, max_tokens=4, beams=7))
    while replicas.has_work():
        replicas.step()
    assert replicas._rows == [0, 0]
    replicas.close()


def test_cancel_reaches_the_request_in_any_replica(tokenizer):
    model = tiny_model("llama", seed=1)
    replicas = Replicas(model, tokenizer, replicas=2, max_batch=4, max_len=64, dtype="fp32")
    seq = ids(tokenizer, ["hello there"])[0]
    for i in range(4):
        replicas.add_request(Request(seq, max_tokens=30, ignore_eos=True, request_id=f"r{i}"))
    events: dict[str, list] = {}
    for step in range(40):
        if step == 3:
            replicas.cancel("r1")  # in replica 1
            replicas.cancel("r2")  # in replica 0
            replicas.cancel("unknown")
        for e in replicas.step():
            events.setdefault(e.request_id, []).append(e)
        if not replicas.has_work():
            break
    reasons = {rid: ev[-1].finish_reason for rid, ev in events.items()}
    assert reasons == {"r0": "length", "r1": "cancelled", "r2": "cancelled", "r3": "length"}
    assert sum(e.token is not None for e in events["r1"]) < 30
    assert replicas._rows == [0, 0] and not replicas._where
    replicas.close()


def test_an_error_in_one_replica_reaches_the_caller_after_every_replica_stepped(tokenizer):
    model = tiny_model("llama", seed=1)
    replicas = Replicas(model, tokenizer, replicas=2, max_batch=4, max_len=64, dtype="fp32")
    seq = ids(tokenizer, ["hello there"])[0]
    for i in range(2):
        replicas.add_request(Request(seq, max_tokens=5, request_id=f"r{i}"))

    def broken():
        raise RuntimeError("boom")

    replicas.engines[1].step = broken
    with pytest.raises(RuntimeError, match="boom"):
        replicas.step()
    assert replicas.engines[0].stats["steps"] == 1
    replicas.close()


@pytest.mark.slow
def test_smollm2_bf16_replicas_equal_one_engine(data_root):
    """The embedded model in bf16, mixed prefixes, greedy and a beam-5 request: two replicas give one
    engine's tokens."""
    bf16_or_skip()
    from test_engine import smollm2_rows

    model, tokenizer, spec, ps, seqs = smollm2_rows(data_root, torch.bfloat16)
    rows = [ps[0], ps[1], None, ps[2], ps[0], ps[1]]

    def requests():
        return ([Request(s, prefix=p, max_tokens=12, ignore_eos=True) for s, p in zip(seqs, rows)]
                + [Request(seqs[2], prefix=ps[2], max_tokens=12, beams=5)])

    want = Engine(model, tokenizer, max_batch=12, max_len=256).generate(requests())
    replicas = Replicas(model, tokenizer, replicas=2, max_batch=12, max_len=256)
    assert tokens(replicas.generate(requests())) == tokens(want)
    replicas.close()


def test_offline_decoding_on_two_threads_uses_replicas_and_gives_the_same_tokens(tokenizer):
    """decode_ids with torch on 2 threads and 32 bf16 rows decodes on 2 replicas (16 rows each); the
    tokens equal one engine's on one thread. fp32, or too few rows for two replicas: one engine."""
    bf16_or_skip()
    from prefixtune.engine.offline import EngineCache, decode_ids
    from prefixtune.generation import DecodingConfig

    model = tiny_model("llama", seed=1)
    ps = prefixes(model, tokenizer, lengths=(19, 6))
    seqs = ids(tokenizer, SOURCES) * 7
    rows = [ps[i % 3] if i % 3 < 2 else None for i in range(len(seqs))]
    config = DecodingConfig(max_new_tokens=6, dtype="bf16", stop_at_newline=False)
    want = decode_ids(model, tokenizer, seqs, rows, config, engines=EngineCache(model, tokenizer))
    cache = EngineCache(model, tokenizer)
    torch.set_num_threads(2)
    try:
        got = decode_ids(model, tokenizer, seqs, rows, config, engines=cache)
        assert isinstance(cache._engine, Replicas) and len(cache._engine.engines) == 2
        assert cache.replicas(torch.float32, 32, 1) == 1 and cache.replicas(torch.bfloat16, 20, 1) == 1
        assert cache.replicas(torch.bfloat16, 32, 5) == 2 and cache.replicas(torch.bfloat16, 32, 17) == 1
    finally:
        torch.set_num_threads(1)
        cache.clear()
    assert got == want and len(set(map(tuple, want))) > 3


def test_offline_decoding_off_the_lean_llama_step_keeps_one_engine_on_two_threads(tokenizer):
    """GPT-2 decodes on the HF path, whose bf16 rows may depend on their batch: replicas would make its
    outputs depend on the thread count, so offline decoding keeps one engine there."""
    from prefixtune.engine.offline import EngineCache

    cache = EngineCache(tiny_model("gpt2"), tokenizer)
    torch.set_num_threads(2)
    try:
        assert cache.replicas(torch.bfloat16, 32, 1) == 1
    finally:
        torch.set_num_threads(1)
