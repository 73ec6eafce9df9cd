"""Beam search and the repetition controls in the engine: a beam request's output equals the oracle's
(test_generation.reference: the row alone, recomputed at every step, ranked by engine/beam.py) next to
greedy and sampled rows of other prefixes; the repetition controls act per row."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from conftest import ByteTokenizer, tiny_model
from prefixtune.engine import Engine, Request
from prefixtune.engine.beam import BeamGroup
from prefixtune.generation import DecodingConfig
from test_generation import SOURCES, ids, prefixes, reference

torch.set_num_threads(1)


def oracle(model, tokenizer, seqs, rows, **config):
    """The oracle's output for each row."""
    config = DecodingConfig(**{"stop_at_newline": False, **config})
    return [reference(model, tokenizer, s, p, config) for s, p in zip(seqs, rows)]


def end_early(model, tokenizer, seqs, rows, **config):
    """Make a token that beam search often emits the end-of-text token, so that some hypotheses
    end at a stop token and others run to max_new_tokens; returns the oracle's outputs then."""
    out = oracle(model, tokenizer, seqs, rows, **config)
    for token, _ in Counter(t for seq in out for t in seq).most_common(6):
        tokenizer.eos_token_id = token
        want = oracle(model, tokenizer, seqs, rows, **config)
        if any(len(w) < config["max_new_tokens"] for w in want) and any(len(w) == config["max_new_tokens"] for w in want):
            return want
    raise AssertionError("no token ends some hypotheses early")


@pytest.mark.parametrize("family,fast", [("llama", True), ("llama", False), ("gpt2", False)])
@pytest.mark.parametrize("controls", [{}, {"length_penalty": 0.6, "repetition_penalty": 1.3, "no_repeat_ngram_size": 2}])
def test_beam_rows_equal_the_oracles_beam_search_in_a_mixed_batch(family, fast, controls):
    tokenizer = ByteTokenizer()
    model = tiny_model(family, seed=1)
    p1, p2 = prefixes(model, tokenizer)
    seqs, rows = ids(tokenizer, SOURCES), [p1, p2, None, p2, p1]
    want = end_early(model, tokenizer, seqs, rows, max_new_tokens=12, num_beams=4, **controls)
    # 4 beams x 5 requests + a greedy and a sampled row of other prefixes, in 9 slots: beam groups wait
    # for 4 free slots, join and leave while the others run
    beam = [Request(s, prefix=p, max_tokens=12, beams=4, **controls) for s, p in zip(seqs, rows)]
    greedy = Request(seqs[1], prefix=p2, max_tokens=10, ignore_eos=True)
    sampled = Request(seqs[0], prefix=p1, max_tokens=10, temperature=0.9, seed=5, ignore_eos=True)
    engine = Engine(model, tokenizer, max_batch=9, max_len=64, dtype="fp32", fast=fast)
    outs = engine.generate([greedy, beam[0], sampled] + beam[1:])
    got = {o.request_id: o.choices[0] for o in outs}
    assert [got[r.request_id].token_ids for r in beam] == want
    for r, w in zip(beam, want):
        assert got[r.request_id].finish_reason == ("length" if len(w) == 12 else "stop")
        assert got[r.request_id].text == tokenizer.decode(w, skip_special_tokens=True)
    assert engine.stats["max_running"] <= 9 and engine.num_running == 0
    # the other rows are unaffected: each equals its own decoding alone
    alone = Engine(model, tokenizer, max_batch=1, max_len=64, dtype="fp32", fast=fast)
    for r in (greedy, sampled):
        again = Request(r.prompt, prefix=r.prefix, max_tokens=10, temperature=r.temperature, seed=r.seed,
                        ignore_eos=True)
        assert got[r.request_id].token_ids == alone.generate([again])[0].choices[0].token_ids


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_encoder_decoder_beams_fork_row_states_and_equal_the_oracles(family, tokenizer):
    """Encoder-decoders step row by row (`RowWise`): a beam that takes over another's hypothesis gets a
    copy of that row's decoder state."""
    model = tiny_model(family, seed=1)
    p1, p2 = prefixes(model, tokenizer)
    seqs, rows = ids(tokenizer, SOURCES), [p1, p2, None, p2, p1]
    want = oracle(model, tokenizer, seqs, rows, max_new_tokens=10, num_beams=3, no_repeat_ngram_size=2)
    engine = Engine(model, tokenizer, max_batch=7, max_len=64, dtype="fp32")
    assert engine.path == "rowwise"
    outs = engine.generate([Request(s, prefix=p, max_tokens=10, beams=3, no_repeat_ngram_size=2)
                            for s, p in zip(seqs, rows)])
    assert [o.choices[0].token_ids for o in outs] == want
    assert not engine.backend.states  # every row's state released


def test_a_beam_group_reserves_its_slots_and_forks_caches_when_hypotheses_cross(tokenizer):
    """Beams that take over another beam's hypothesis decode from a fork of its cache: a wrong fork (or
    none) would change the tokens. With 5 slots, a 3-beam group never runs beside two others."""
    model = tiny_model("llama", seed=4)
    p1, p2 = prefixes(model, tokenizer, lengths=(2, 5))
    seqs = ids(tokenizer, SOURCES)
    rows = [p1, p2, None, p1, p2]
    engine = Engine(model, tokenizer, max_batch=5, max_len=64, dtype="fp32")
    forks = []
    real = engine.backend.fork
    engine.backend.fork = lambda src, dst, n: forks.append((src, dst, n)) or real(src, dst, n)
    outs = engine.generate([Request(s, prefix=p, max_tokens=10, beams=3) for s, p in zip(seqs, rows)])
    assert [o.choices[0].token_ids for o in outs] == oracle(model, tokenizer, seqs, rows, max_new_tokens=10,
                                                           num_beams=3)
    assert engine.stats["max_running"] == 3  # a second group would need 6 slots
    assert len(forks) > 2 * len(seqs)  # beyond the expansion from the first row: hypotheses crossed


def test_a_beam_request_is_checked_and_cancelled_as_one(tokenizer):
    model = tiny_model("llama", seed=1)
    engine = Engine(model, tokenizer, max_batch=4, max_len=64, dtype="fp32")
    seq = ids(tokenizer, ["hello there"])[0]
    for bad in ({"temperature": 0.7}, {"n": 2}, {"logprobs": True}, {"beams": 0}, {"repetition_penalty": 0},
                {"no_repeat_ngram_size": -1}):
        with pytest.raises(ValueError):
            Request(seq, **{"beams": 3, **bad})
    with pytest.raises(ValueError, match="max_batch"):
        engine.add_request(Request(seq, max_tokens=8, beams=5))
    rid = engine.add_request(Request(seq, max_tokens=30, beams=4, ignore_eos=True))
    events = [e for _ in range(3) for e in engine.step()]
    assert engine.num_running == 4 and not events  # nothing is output before the search ends
    engine.cancel(rid)
    events = engine.step()
    assert [(e.request_id, e.token, e.finish_reason) for e in events] == [(rid, None, "cancelled")]
    assert engine.num_running == 0 and not engine.has_work()


@pytest.mark.parametrize("controls", [{"repetition_penalty": 1.5}, {"no_repeat_ngram_size": 1},
                                      {"no_repeat_ngram_size": 2, "repetition_penalty": 0.7}])
def test_repetition_controls_on_greedy_rows_equal_the_oracles(controls, tokenizer):
    model = tiny_model("llama", seed=1)
    p1, p2 = prefixes(model, tokenizer)
    seqs, rows = ids(tokenizer, SOURCES), [p1, p2, None, p2, p1]
    want = oracle(model, tokenizer, seqs, rows, max_new_tokens=14, ignore_eos=True, **controls)
    plain = oracle(model, tokenizer, seqs, rows, max_new_tokens=14, ignore_eos=True)
    assert want != plain  # the controls change these outputs
    engine = Engine(model, tokenizer, max_batch=3, max_len=64, dtype="fp32")
    # a plain row in the same batch keeps its own tokens
    outs = engine.generate([Request(s, prefix=p, max_tokens=14, ignore_eos=True, **controls)
                            for s, p in zip(seqs, rows)] + [Request(seqs[4], prefix=p1, max_tokens=14, ignore_eos=True)])
    assert [o.choices[0].token_ids for o in outs] == want + [plain[4]]


def test_repetition_controls_on_sampled_rows_act_per_row(tokenizer):
    """A sampled row with a penalty draws from its penalised logits: the n-gram ban holds in its output,
    its tokens equal the same request alone, and its logprobs stay the model's (raw logits)."""
    model = tiny_model("llama", seed=2)
    (p1,) = prefixes(model, tokenizer, lengths=(3,))
    seq = ids(tokenizer, ["abc"])[0]

    def req(**kw):
        return Request(seq, prefix=p1, max_tokens=40, temperature=1.5, ignore_eos=True, **{"seed": 11, **kw})

    engine = Engine(model, tokenizer, max_batch=4, max_len=96, dtype="fp32")
    banned, free, other = engine.generate([req(no_repeat_ngram_size=1, logprobs=True), req(), req(seed=3)])
    tokens = banned.choices[0].token_ids
    assert len(set(tokens)) == len(tokens) == 40  # no token twice
    assert len(set(free.choices[0].token_ids)) < 40  # without the ban this row repeats
    alone = Engine(model, tokenizer, max_batch=1, max_len=96, dtype="fp32").generate([req(no_repeat_ngram_size=1)])
    assert alone[0].choices[0].token_ids == tokens
    assert all(lp > float("-inf") for lp in banned.choices[0].logprobs)  # raw logprobs, not the ban's -inf


@pytest.mark.slow
def test_smollm2_beam5_in_a_mixed_batch_equals_each_request_alone_on_the_hf_path_in_fp32(data_root):
    """The embedded model, three random prefixes: beam-5 outputs of six E2E inputs from the lean step,
    next to greedy and sampled rows, equal each request alone on the HF path (HFDecoder) in fp32. (The
    oracle, recomputing every hypothesis at every step, agreed too, in 380 s: too slow to keep.)"""
    from test_engine import smollm2_rows

    model, tokenizer, spec, ps, seqs = smollm2_rows(data_root, torch.float32)
    rows = [ps[0], ps[1], None, ps[2], ps[0], ps[1]]
    from prefixtune.generation import stop_ids

    newline = sorted(stop_ids(tokenizer, True, ignore_eos=True))
    beams = lambda: [Request(s, prefix=p, max_tokens=24, beams=5, stop_token_ids=newline)  # noqa: E731
                     for s, p in zip(seqs, rows)]
    engine = Engine(model, tokenizer, max_batch=32, max_len=256, dtype="fp32")
    assert engine.path == "llama_fast"
    others = [Request(seqs[0], prefix=ps[2], max_tokens=24), Request(seqs[1], prefix=None, max_tokens=24,
                                                                      temperature=0.8, seed=1)]
    outs = engine.generate(others + beams())
    hf = Engine(model, tokenizer, max_batch=5, max_len=256, dtype="fp32", fast=False)
    want = [hf.generate([r])[0].choices[0].token_ids for r in beams()]
    assert [o.choices[0].token_ids for o in outs[2:]] == want
    assert len(set(map(tuple, want))) > 1


def test_a_tenant_over_its_share_loses_a_greedy_row_never_a_beam_row(tokenizer):
    """Tenant a holds all 6 slots (a beam-4 group and two greedy rows) when tenant b arrives. The preempted
    row is a greedy one (beam rows have no output of their own, so without the rule one would go first):
    the beam output still equals the oracle's, the greedy rows resume exactly, and b is served."""
    model = tiny_model("llama", seed=2)
    p1, p2 = prefixes(model, tokenizer)
    seqs = ids(tokenizer, SOURCES)
    beam = Request(seqs[1], prefix=p1, max_tokens=16, beams=4, ignore_eos=True, tenant="a")
    greedy = [Request(s, prefix=p2, max_tokens=16, ignore_eos=True, tenant="a") for s in seqs[2:4]]
    late = Request(seqs[0], max_tokens=3, ignore_eos=True, tenant="b")
    engine = Engine(model, tokenizer, max_batch=6, max_len=96, dtype="fp32")
    events, step = {}, 0
    for r in [beam] + greedy:
        engine.add_request(r)
    while engine.has_work():
        if step == 4:
            assert engine.num_running == 6
            engine.add_request(late)
        for e in engine.step():
            events.setdefault(e.request_id, []).append(e)
        step += 1
    assert engine.scheduler.preemptions >= 1
    got = lambda r: [e.token for e in events[r.request_id] if e.token is not None]  # noqa: E731
    assert got(beam) == oracle(model, tokenizer, [seqs[1]], [p1], max_new_tokens=16, num_beams=4, ignore_eos=True)[0]
    alone = Engine(model, tokenizer, max_batch=1, max_len=96, dtype="fp32")
    for r in greedy:
        again = Request(r.prompt, prefix=r.prefix, max_tokens=16, ignore_eos=True)
        assert got(r) == alone.generate([again])[0].choices[0].token_ids
    assert len(got(late)) == 3


@pytest.mark.parametrize("fast", [True, False])
def test_beams_that_die_and_come_back_equal_the_oracles(fast, tokenizer, monkeypatch):
    """Most tokens made stop tokens: often fewer than k candidates continue, so beams die (their rows idle)
    and come back later (an idle row takes a hypothesis by a fork). The outputs still equal the oracle's."""
    import prefixtune.generation as generation

    model = tiny_model("llama", seed=3)
    p1, p2 = prefixes(model, tokenizer)
    seqs, rows = ids(tokenizer, SOURCES), [p1, p2, None, p2, p1]
    plain = oracle(model, tokenizer, seqs, rows, max_new_tokens=10, num_beams=4, ignore_eos=True)
    kept = {t for seq in plain for t in seq}  # the tokens beams like, and a few more, stay; the rest stop
    stops = frozenset(range(tokenizer.vocab_size)) - kept - set(range(100, 110))
    monkeypatch.setattr(generation, "_newline_ids", lambda tok: stops)
    want = oracle(model, tokenizer, seqs, rows, max_new_tokens=10, num_beams=4, ignore_eos=True, stop_at_newline=True)
    engine = Engine(model, tokenizer, max_batch=8, max_len=64, dtype="fp32", fast=fast)
    dead = []
    rank = BeamGroup.rank

    def counted(group, logprobs):
        chosen = rank(group, logprobs)
        dead.append(0 < len(chosen) < group.k)
        return chosen

    monkeypatch.setattr(BeamGroup, "rank", counted)
    outs = engine.generate([Request(s, prefix=p, max_tokens=10, beams=4, stop_token_ids=sorted(stops),
                                    ignore_eos=True) for s, p in zip(seqs, rows)])
    assert [o.choices[0].token_ids for o in outs] == want
    assert any(dead)  # some steps ran with dead beams


@pytest.mark.parametrize("fast", [True, False])
def test_a_beam_request_prefilled_in_chunks_keeps_its_slots_and_equals_the_oracles(fast):
    """Chunked prefill (paged KV) holds a beam request's first row over several steps: the slots its beams
    fork into stay reserved meanwhile (other rows fill every other place), and the forks share the
    prompt's full blocks copy-on-write."""
    tokenizer = ByteTokenizer()
    model = tiny_model("llama", seed=1)
    p1, p2 = prefixes(model, tokenizer)
    long_source = [SOURCES[1] + " | " + SOURCES[4], SOURCES[4] + " " + SOURCES[2]]  # prompts of many chunks of 8
    seqs, rows = ids(tokenizer, long_source), [p1, p2]
    want = oracle(model, tokenizer, seqs, rows, max_new_tokens=10, num_beams=3)
    beam = [Request(s, prefix=p, max_tokens=10, beams=3) for s, p in zip(seqs, rows)]
    # short prompts: they fit in what a step's budget has left after a leader's last chunk, and so are
    # admitted while the leader's beams have not forked yet
    greedy = [Request(s[:2], prefix=p2, max_tokens=20, ignore_eos=True) for s in ids(tokenizer, SOURCES)]
    assert all(len(s) % 8 for s in seqs)
    engine = Engine(model, tokenizer, max_batch=5, max_len=256, dtype="fp32", fast=fast, max_prefill_tokens=8)
    outs = engine.generate(beam[:1] + greedy + beam[1:])
    got = {o.request_id: o.choices[0].token_ids for o in outs}
    assert [got[r.request_id] for r in beam] == want
    assert engine.stats["max_step_prefill_tokens"] <= 8 and engine.stats["max_running"] <= 5
    alone = Engine(model, tokenizer, max_batch=1, max_len=256, dtype="fp32", fast=fast)
    for r in greedy:
        again = Request(r.prompt, prefix=r.prefix, max_tokens=20, ignore_eos=True)
        assert got[r.request_id] == alone.generate([again])[0].choices[0].token_ids
    # every row gave its blocks back (forked blocks included): what is left is the cached prefixes' own
    assert not engine.kv.tables
    assert engine.kv.blocks_in_use == sum(len(blocks) for _, blocks, _ in engine.kv.prefixes.values())


# -- issue 26: a beam tenant must not slow a greedy tenant --------------------------------------------
def test_a_beam_tenant_decodes_one_group_per_step_beside_a_greedy_tenant(tokenizer):
    """Tenant a's two beam-5 requests hold 10 rows; tenant b's greedy row arrives beside them. While b runs,
    a step decodes b's row and one of a's groups (a's step share: 5 rows, not 10), the groups taking turns,
    so b's step costs what 6 rows cost, not 11, and b gets a token at every step (as many steps as alone).
    The beams, decoded every other step meanwhile, still equal the oracle's beam search; b's tokens equal b's
    alone."""
    from test_engine import run

    model = tiny_model("llama", seed=2)
    p1, p2 = prefixes(model, tokenizer)
    seqs = ids(tokenizer, SOURCES)
    beams = [Request(seqs[i], prefix=p1, max_tokens=20, beams=5, ignore_eos=True, tenant="a") for i in (1, 2)]
    greedy = Request(seqs[0], prefix=p2, max_tokens=8, ignore_eos=True, tenant="b")
    engine = Engine(model, tokenizer, max_batch=12, max_len=96, dtype="fp32")
    decoded, real = [], engine.backend.decode

    def counting(tokens, positions, slots=None):
        tenants = Counter(r.tenant for r in engine.scheduler.running if r.slot in slots)
        decoded.append((tenants["a"], tenants["b"]))
        return real(tokens, positions, slots)

    engine.backend.decode = counting
    events = run(engine, {0: beams, 4: [greedy]})
    with_b = [a for a, b in decoded if b]
    assert len(with_b) == 8 - 1 and all(a == 5 for a in with_b)  # b's first token comes from its prefill
    assert max(a for a, _ in decoded) == 10  # alone, a decodes all its rows
    got = lambda r: [e.token for e in events[r.request_id] if e.token is not None]  # noqa: E731
    for r in beams:
        assert got(r) == oracle(model, tokenizer, [r.prompt], [p1], max_new_tokens=20, num_beams=5, ignore_eos=True)[0]
    alone = Engine(model, tokenizer, max_batch=1, max_len=96, dtype="fp32")
    again = Request(greedy.prompt, prefix=p2, max_tokens=8, ignore_eos=True)
    assert got(greedy) == alone.generate([again])[0].choices[0].token_ids


def test_tenants_of_equal_rows_are_never_held_back_and_a_busy_tenants_rows_take_turns():
    from prefixtune.engine.scheduler import Scheduler
    from test_engine import _row

    scheduler = Scheduler(max_batch=32, max_prefill_tokens=2048, tenant_step_rows=4)
    for row in [_row("a", 5) for _ in range(8)] + [_row("b", 5) for _ in range(8)]:
        scheduler.place(row)
    assert len(scheduler.decode_rows()) == 16 and scheduler.held_back == 0  # equals: every row, every step
    for row in [r for r in scheduler.running if r.tenant == "b"][1:]:
        scheduler.remove(row)
    # a (8 rows) beside b (1 row): a decodes 4 a step, the 4 decoded least recently, so each row every other step
    seen = Counter()
    for _ in range(4):
        rows = scheduler.decode_rows()
        assert sorted(Counter(r.tenant for r in rows).items()) == [("a", 4), ("b", 1)]
        seen.update(id(r) for r in rows if r.tenant == "a")
    assert sorted(seen.values()) == [2] * 8 and scheduler.held_back == 4 * 4
    for row in [r for r in scheduler.running if r.tenant == "b"]:
        scheduler.remove(row)
    assert len(scheduler.decode_rows()) == 8  # alone again: all its rows
