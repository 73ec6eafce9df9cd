"""Paged keys/values: blocks taken by traffic, a prefix's blocks shared read-only by every row using it,
forks copy-on-write, rows' bits those of the row alone; chunked prefill within a step's budget."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from prefixtune.engine import Engine, Request
from prefixtune.engine.kv import PagedKV, prefix_to_kv
from prefixtune.engine.scheduler import Row, Scheduler
from prefixtune.engine.stops import StopState
from test_generation import SOURCES, ids, prefixes

torch.set_num_threads(1)
LAYERS, HEADS, DIM = 2, 2, 4


def _kv(**kw):
    return PagedKV(LAYERS, 4, HEADS, DIM, 64, torch.float32, block_size=4, **kw)


def _prefix(length, seed=0):
    return torch.randn(length, LAYERS * 2 * HEADS * DIM, generator=torch.Generator().manual_seed(seed))


def _entries(kv, slot, layer=0):
    entries, starts = kv.gather(layer, [slot])
    return entries[:, :, : kv.length(slot)]


def test_rows_with_one_prefix_share_its_full_blocks_and_free_theirs_when_they_leave():
    kv = _kv(cached_prefixes=1)
    assert kv.blocks_in_use == 0 and kv.num_blocks == 1  # nothing but the zero block before traffic
    p = _prefix(10)
    kv.attach_prefix(0, p)
    kv.attach_prefix(1, p)
    t0, t1 = kv.tables[0], kv.tables[1]
    assert t0[:2] == t1[:2] and t0[2] != t1[2]          # two full blocks shared, the partial one copied
    assert kv.blocks_in_use == 3 + 2                     # the prefix's 3 blocks once, and one copy per row
    expected = prefix_to_kv(p, HEADS, DIM, torch.float32)[0]
    assert torch.equal(_entries(kv, 0), expected) and torch.equal(_entries(kv, 1), expected)
    # a row's own token goes into its own block; the other row's entries do not change
    index = kv.write_index([0], [10])
    kv.flat(0).index_copy_(0, index, torch.ones(2 * HEADS, DIM))
    assert torch.equal(_entries(kv, 1), expected) and kv.length(0) == 11
    kv.release(0)
    kv.release(1)
    assert kv.blocks_in_use == 3                         # the cached prefix alone
    kv.attach_prefix(2, _prefix(3, seed=1))              # the LRU holds one prefix: the first is dropped
    kv.release(2)
    assert kv.blocks_in_use == 1


def test_the_prefix_lru_never_drops_a_prefix_a_row_still_shares():
    """Past the LRU's size the oldest prefix went whatever its use: a running row's prefix was dropped, and the
    next row using it wrote a copy of its blocks instead of sharing them."""
    kv = _kv(cached_prefixes=1)
    p, q, r = _prefix(10), _prefix(10, seed=1), _prefix(10, seed=2)
    kv.attach_prefix(0, p)                               # row 0 runs with p: two full blocks shared
    kv.attach_prefix(1, q)                               # over the LRU's size, but p is in use: it stays
    kv.release(1)
    kv.attach_prefix(2, p)
    assert kv.tables[2][:2] == kv.tables[0][:2]          # shared, not written again
    assert list(kv.prefixes) == [id(p)]                  # q, which no row uses, went instead
    assert kv.blocks_in_use == 3 + 2                     # p cached once, a copied last block per row
    kv.release(0)
    kv.release(2)
    kv.attach_prefix(3, r)                               # nothing in use: back to the LRU's size
    kv.release(3)
    assert list(kv.prefixes) == [id(r)] and kv.blocks_in_use == 3


def test_fork_shares_full_blocks_and_copies_only_the_last():
    kv = _kv()
    kv.reserve(0, 10)
    for layer in range(LAYERS):
        kv.flat(layer).copy_(torch.randn_like(kv.flat(layer)))
    before = _entries(kv, 0).clone()
    kv.fork(0, 1, 10)
    assert kv.tables[1][:2] == kv.tables[0][:2] and kv.tables[1][2] != kv.tables[0][2]
    assert torch.equal(_entries(kv, 1), before)
    kv.flat(0).index_copy_(0, kv.write_index([1], [10]), torch.zeros(2 * HEADS, DIM))  # dst writes on
    assert torch.equal(_entries(kv, 0), before)                                         # src unchanged
    kv.move(1, 0)                                        # dst takes src's place: src's blocks are released
    assert kv.tables.get(1) is None and kv.blocks_in_use == 3


def test_a_server_sized_engine_allocates_by_traffic():
    model = tiny_model("llama", seed=1)
    engine = Engine(model, max_batch=32, max_len=1536, dtype="fp32")
    assert engine.kv.nbytes <= engine.kv.nbytes_per_block       # one zero block, whatever the limits
    engine.generate([Request([3, 4, 5], max_tokens=4, ignore_eos=True)])
    small = engine.kv.nbytes
    assert 0 < small < 0.01 * 32 * 1536 / engine.kv.block_size * engine.kv.nbytes_per_block  # 1% of the worst case
    engine.generate([Request([3 + i % 50] * 300, max_tokens=4, ignore_eos=True) for i in range(8)])
    assert engine.kv.nbytes > small and engine.kv.blocks_in_use == 0  # grew with traffic; rows gave theirs back


@pytest.mark.parametrize("exact", [True, False])
def test_rows_sharing_a_prefix_get_the_bits_of_the_row_alone(tokenizer, exact):
    """bf16 logprobs (the step's logits) of each row in a mixed batch equal the row alone, bit for bit,
    with a prefix longer than a block (its full blocks shared). bf16: oneDNN's bf16 matmuls give a row
    its bits whatever the batch; fp32 matmuls here do not (a last-bit difference, the same before paging)."""
    from prefixtune.precision import bf16_available

    if not bf16_available(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16")
    model = tiny_model("llama", seed=1)
    p1, p2 = prefixes(model, tokenizer, lengths=(19, 6))
    seqs = ids(tokenizer, SOURCES)
    rows = [(seqs[1], p1), (seqs[2], p1), (seqs[3], None), (seqs[4], p2), (seqs[0], p1)]

    def request(seq, p):
        return Request(seq, prefix=p, max_tokens=10, ignore_eos=True, logprobs=True)

    engine = Engine(model, tokenizer, max_batch=4, max_len=96, dtype="bf16", block_size=8, exact=exact)
    together = engine.generate([request(s, p) for s, p in rows])
    assert len(engine.kv.prefixes) == 2
    for (s, p), out in zip(rows, together):
        solo = Engine(model, tokenizer, max_batch=4, max_len=96, dtype="bf16", block_size=8, exact=exact)
        ref = solo.generate([request(s, p)])[0].choices[0]
        assert out.choices[0].token_ids == ref.token_ids
        if exact:
            assert out.choices[0].logprobs == ref.logprobs


@pytest.mark.parametrize("fast", [True, False])
def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps_within_the_budget(tokenizer, fast):
    """fp32: a prompt prefilled in chunks of a 16-token budget gives the tokens it gets prefilled whole,
    no step prefills more than 16 tokens, and a running row gets a token at every step meanwhile."""
    model = tiny_model("llama", seed=1)
    p1, _ = prefixes(model, tokenizer, lengths=(19, 6))
    long_prompt = ids(tokenizer, [" | ".join(SOURCES)])[0]
    assert len(long_prompt) > 60

    def requests():
        return [Request(ids(tokenizer, ["hello there"])[0], max_tokens=12, ignore_eos=True, request_id="short"),
                Request(long_prompt, prefix=p1, max_tokens=8, ignore_eos=True, request_id="long", logprobs=True),
                Request(long_prompt, max_tokens=8, ignore_eos=True, request_id="long-plain", logprobs=True)]

    whole = Engine(model, tokenizer, max_batch=4, max_len=160, dtype="fp32", fast=fast)
    outputs = whole.generate(requests())
    expected = [o.choices[0].token_ids for o in outputs]
    assert whole.stats["max_step_prefill_tokens"] > 60

    engine = Engine(model, tokenizer, max_batch=4, max_len=160, dtype="fp32", fast=fast, max_prefill_tokens=16)
    prefilled, backend_prefill = [], engine.backend.prefill
    engine.backend.prefill = lambda batch, totals: prefilled.append(sum(len(t) for _, _, t in batch)) or backend_prefill(batch, totals)
    reqs = requests()
    for r in reqs:
        engine.add_request(r)
    got, short_every_step, logprobs = {r.request_id: [] for r in reqs}, [], {}
    while engine.has_work():
        events = engine.step()
        for e in events:
            if e.token is not None:
                got[e.request_id].append(e.token)
                logprobs.setdefault(e.request_id, []).append(e.logprob)
        if engine.scheduler.prefilling and 0 < len(got["short"]) < 12:
            short_every_step.append(any(e.request_id == "short" and e.token is not None for e in events))
    assert max(prefilled) == 16 and engine.stats["max_step_prefill_tokens"] == 16
    assert [got[r.request_id] for r in reqs] == expected
    for r, o in zip(reqs[1:], outputs[1:]):  # the chunked prefill's logits: the whole prefill's (fp32 matmuls
        assert logprobs[r.request_id][0] == pytest.approx(o.choices[0].logprobs[0], abs=1e-5)  # vary in the last bit)
    assert short_every_step and all(short_every_step)   # decode went on while the long prompts were prefilled
    assert not engine.kv.tables                          # every row gave its blocks back


def test_a_row_cancelled_while_its_prompt_is_prefilled_in_chunks_gives_its_blocks_back(tokenizer):
    model = tiny_model("llama", seed=1)
    engine = Engine(model, tokenizer, max_batch=2, max_len=160, dtype="fp32", max_prefill_tokens=8)
    engine.add_request(Request(list(range(3, 60)), max_tokens=4, request_id="long"))
    engine.step()
    engine.step()
    assert engine.scheduler.prefilling and engine.kv.blocks_in_use > 0
    engine.cancel("long")
    events = engine.step()
    assert [e.finish_reason for e in events] == ["cancelled"] and events[0].token is None
    assert not engine.has_work() and engine.kv.blocks_in_use == 0 and not engine.kv.tables


def test_at_the_cap_a_cached_prefix_no_row_uses_gives_its_blocks_back():
    kv = PagedKV(LAYERS, 1, HEADS, DIM, 8, torch.float32, block_size=4)   # one row of 8: 3 blocks at most
    kv.attach_prefix(0, _prefix(8))
    kv.release(0)
    assert len(kv.prefixes) == 1 and kv.blocks_in_use == 2
    kv.reserve(0, 12)                                  # 3 blocks: only by dropping the cached prefix
    assert not kv.prefixes and kv.blocks_in_use == 3 == kv.num_blocks - 1
    with pytest.raises(RuntimeError, match="full"):
        kv.reserve(0, 16)


def test_rows_of_one_length_attend_in_one_call_with_the_bits_of_each_alone(tokenizer):
    """bf16: one prompt under four prefixes of one length (equal lengths every step: one attention call
    for the four) gives each row the logprobs of the row alone, bit for bit."""
    from prefixtune.precision import bf16_available

    if not bf16_available(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16")
    model = tiny_model("llama", seed=1)
    ps = prefixes(model, tokenizer, lengths=(7, 7)) + prefixes(model, tokenizer, lengths=(7, 7))[::-1]
    seq = ids(tokenizer, SOURCES[1:2])[0]
    ps[2] = {g: t * 0.5 for g, t in ps[2].items()}
    ps[3] = {g: -t for g, t in ps[3].items()}

    def request(p):
        return Request(seq, prefix=p, max_tokens=12, ignore_eos=True, logprobs=True)

    engine = Engine(model, tokenizer, max_batch=4, max_len=96, dtype="bf16", block_size=8)
    together = [o.choices[0] for o in engine.generate([request(p) for p in ps])]
    assert len({tuple(c.token_ids) for c in together}) > 1      # the prefixes make the rows differ
    for p, got in zip(ps, together):
        alone = Engine(model, tokenizer, max_batch=4, max_len=96, dtype="bf16", block_size=8)
        ref = alone.generate([request(p)])[0].choices[0]
        assert got.token_ids == ref.token_ids and got.logprobs == ref.logprobs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_padded_attention_call_gives_each_row_the_bits_of_the_row_alone(dtype):
    """What exact decoding rests on (llama_fast.decode): rows of many lengths read from their blocks, padded
    to the step's span (zeros past a row's blocks, masked), in one SDPA call, get bit for bit what each gets
    alone, padded to its own blocks. SmolLM2's shapes (3 kv heads of 3 queries, head_dim 64), one thread."""
    import torch.nn.functional as F

    heads, rep, dim, bs = 3, 3, 64, 16
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (32,), generator=gen).tolist() + [1, 16, 17, 199]
    kv = PagedKV(1, len(lengths), heads, dim, 256, dtype, block_size=bs)
    for slot, n in enumerate(lengths):
        kv.reserve(slot, n)
        index = kv.write_index([slot] * n, list(range(n)))
        kv.flat(0).index_copy_(0, index, torch.randn(n * 2 * heads, dim, generator=gen).to(dtype))
    q = torch.randn(len(lengths), heads, rep, dim, generator=gen).to(dtype)

    def attend(slots):
        span = kv.span(max(lengths[s] for s in slots))
        keys, values = kv.padded(0, kv.padded_index(slots, span), len(slots), span)
        visible = torch.arange(span)[None, :] < torch.tensor([lengths[s] for s in slots])[:, None]
        mask = torch.zeros(len(slots), 1, 1, span, dtype=dtype).masked_fill_(~visible[:, None, None], float("-inf"))
        return F.scaled_dot_product_attention(q[slots], keys, values, attn_mask=mask, scale=dim ** -0.5)

    together = attend(list(range(len(lengths))))
    for slot in range(len(lengths)):
        assert torch.equal(together[slot], attend([slot])[0]), lengths[slot]



@pytest.mark.parametrize("threads", [1, 2])
def test_a_mixed_batch_gets_each_rows_bits_alone_at_one_and_two_threads(tokenizer, threads):
    """The engine's exact bf16 decode (one padded attention call per layer, block size 8 but rows padded to
    16: 8 is not enough, measured): logprobs of rows of different lengths and prefixes, batched, equal each
    row alone bit for bit, also at 2 threads (the server's and the 2-core benchmark's setting)."""
    from prefixtune.precision import bf16_available

    if not bf16_available(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16")
    model = tiny_model("llama", seed=4)
    p1, p2 = prefixes(model, tokenizer, lengths=(19, 3))
    seqs = ids(tokenizer, SOURCES)
    rows = [(seqs[0], p1), (seqs[1], None), (seqs[2], p2), (seqs[3], p1), (seqs[4], p2)]

    def request(seq, p):
        return Request(seq, prefix=p, max_tokens=12, ignore_eos=True, logprobs=True)

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        engine = Engine(model, tokenizer, max_batch=8, max_len=128, dtype="bf16", block_size=8)
        together = engine.generate([request(s, p) for s, p in rows])
        for (s, p), out in zip(rows, together):
            ref = engine.generate([request(s, p)])[0].choices[0]
            assert out.choices[0].token_ids == ref.token_ids
            assert out.choices[0].logprobs == ref.logprobs
    finally:
        torch.set_num_threads(before)
