"""The server on the engine scheduler (issue 13 phase 2): continuous batching through HTTP, rows that join
and leave mid-batch, cancellation, a PUT during decoding, seeded sampling, logprobs, and chat completions
with the openai client. The model is the tiny random Llama of test_serve, in fp32, so a row's greedy text
must equal decoding that row alone (`PrefixBank.generate_ids`: an offline engine of its own) exactly.
"""
from __future__ import annotations

import copy
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from prefixtune.bank import PrefixBank
from prefixtune.generation import DecodingConfig
from prefixtune.prefix_file import load_prefix_bytes
from prefixtune.serve import BackgroundServer, KeyRing, ServeSettings, create_app
from test_serve import (KEYS, PROMPTS, auth, client, expected, healthy, held_worker, make_server,  # noqa: F401
                        model, prefixes, real_tokenizer, upload)
from test_serve_hardening import completions, metric, wait_until

openai = pytest.importorskip("openai")
LONG = 60


def state(server):
    return server.server.config.app.state


def record_steps(server, slow_until: threading.Event | None = None) -> list[set]:
    """After each engine step: the request ids of the rows in it. Returns the (growing) list. Until
    `slow_until` is set, each step takes 20 ms more, so that rows surely overlap (never a timing to meet)."""
    engine = state(server).batcher.engine
    step, seen = engine.step, []

    def recorded():
        events = step()
        seen.append({row.request_id for row in engine.scheduler.running} | {e.request_id for e in events})
        if slow_until is not None and not slow_until.is_set():
            time.sleep(0.02)
        return events

    engine.step = recorded
    return seen


def sse_events(lines):
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: "):])


def stream_text(response, until_chunks: int | None = None, on_chunks=None) -> str:
    """The text of a completions stream; `on_chunks()` is called once after `until_chunks` text chunks."""
    text, chunks = "", 0
    for event in sse_events(response.iter_lines()):
        assert "error" not in event, event
        piece = event["choices"][0]["text"] if event["choices"] else ""
        text += piece
        chunks += bool(piece)
        if on_chunks is not None and chunks == until_chunks:
            on_chunks()
            on_chunks = None
    return text


def long_body(model_name: str, stream=True, max_tokens=LONG) -> dict:
    return {"model": model_name, "prompt": PROMPTS[0], "max_tokens": max_tokens, "ignore_eos": True, "stop": [],
            "stream": stream}


# -- continuous batching --------------------------------------------------------------------------
def test_rows_join_a_running_batch_and_each_equals_decoding_it_alone(make_server, model, real_tokenizer, prefixes):
    server = make_server()
    upload(server, "alice", "a", prefixes[0])
    upload(server, "bob", "b", prefixes[1])
    shorts_done = threading.Event()
    steps = record_steps(server, slow_until=shorts_done)
    shorts = [("alice", "a", PROMPTS[1], prefixes[0], 5), ("bob", "b", PROMPTS[2], prefixes[1], 9),
              ("bob", "tiny-llama", PROMPTS[3], None, 3)]
    got = {}

    def ask(job):
        tenant, name, prompt, _, max_tokens = job
        return client(server, tenant).completions.create(model=name, prompt=prompt, max_tokens=max_tokens,
                                                         stop=[]).choices[0].text

    def join_now():  # the long row is running: these arrive during its batch
        with ThreadPoolExecutor(len(shorts)) as pool:
            got["shorts"] = list(pool.map(ask, shorts))
        got["steps_when_shorts_done"] = len(steps)
        shorts_done.set()

    with httpx.stream("POST", f"{server.url}/v1/completions", json=long_body("a"), headers=auth("alice"),
                      timeout=60) as r:
        long_text = stream_text(r, until_chunks=3, on_chunks=join_now)
    assert long_text == expected(model, real_tokenizer, prefixes[0], PROMPTS[0], LONG, stop_at_newline=False,
                                 ignore_eos=True)
    for text, (_, _, prompt, data, max_tokens) in zip(got["shorts"], shorts):
        assert text == expected(model, real_tokenizer, data, prompt, max_tokens, stop_at_newline=False)
    # the short rows ran in the same steps as the long one, joined after it started, and left before it ended
    long_id = next(iter(steps[0]))
    assert max(len(s) for s in steps) >= 2 and all(long_id in s for s in steps[: got["steps_when_shorts_done"]])
    assert steps[-1] == {long_id}
    assert state(server).batcher.engine.stats["max_running"] >= 2


def test_a_beam_request_decodes_beside_the_other_rows_without_pausing_them(make_server, model, real_tokenizer,
                                                                            prefixes):
    """Beam search is engine rows: while a beam-4 request of one tenant decodes, another tenant's streamed
    greedy row gets a token at every step (no step without it), and both answers equal today's decoding."""
    server = make_server()
    upload(server, "alice", "a", prefixes[0])
    upload(server, "bob", "b", prefixes[1])
    done = threading.Event()
    steps = record_steps(server, slow_until=done)
    got = {}

    def beam():
        got["beam"] = client(server, "bob").completions.create(
            model="b", prompt=PROMPTS[1], max_tokens=20, stop=[], extra_body={"num_beams": 4, "ignore_eos": True})

    def start_beam():
        got["thread"] = threading.Thread(target=beam)
        got["thread"].start()

    with httpx.stream("POST", f"{server.url}/v1/completions", json=long_body("a"), headers=auth("alice"),
                      timeout=60) as r:
        greedy = stream_text(r, until_chunks=3, on_chunks=start_beam)
    got["thread"].join(60)
    done.set()
    assert greedy == expected(model, real_tokenizer, prefixes[0], PROMPTS[0], LONG, stop_at_newline=False,
                              ignore_eos=True)
    assert got["beam"].choices[0].text == expected(model, real_tokenizer, prefixes[1], PROMPTS[1], 20,
                                                   stop_at_newline=False, num_beams=4, ignore_eos=True)
    greedy_id = next(iter(steps[0]))
    together = [s for s in steps if len(s) == 2 and greedy_id in s]  # the greedy row and the beam request's rows
    assert len(together) >= 19  # every step of the beam search also decoded the greedy row
    assert state(server).batcher.engine.stats["max_running"] == 5


def test_a_dropped_stream_leaves_and_the_others_are_unaffected(make_server, model, real_tokenizer, prefixes):
    server = make_server()
    upload(server, "alice", "a", prefixes[0])
    upload(server, "alice", "b", prefixes[2])
    result = {}

    def other():
        with httpx.stream("POST", f"{server.url}/v1/completions", json=long_body("b", max_tokens=40),
                          headers=auth("alice"), timeout=60) as r:
            result["other"] = stream_text(r)

    with held_worker(server, at_token=4) as worker:  # both rows run when the worker is held
        with httpx.stream("POST", f"{server.url}/v1/completions", json=long_body("a", max_tokens=300),
                          headers=auth("alice"), timeout=60) as r:
            thread = threading.Thread(target=other)
            thread.start()
            assert worker.reached.wait(30)
        assert wait_until(lambda: worker.jobs[0].future.cancelled())  # the dropped stream cancelled its row
        worker.release.set()
        thread.join(60)
    assert wait_until(lambda: metric(server, completions("cancelled")) == 1)
    assert result["other"] == expected(model, real_tokenizer, prefixes[2], PROMPTS[0], 40, stop_at_newline=False,
                                       ignore_eos=True)
    assert metric(server, completions("ok")) == 1
    assert worker.tokens <= 4 + 40  # the dropped row (max_tokens 300) left at the step after it was cancelled
    assert wait_until(lambda: not state(server).batcher.engine.has_work())
    assert healthy(server)


def test_a_put_replacing_a_prefix_affects_only_rows_admitted_after_it(make_server, model, real_tokenizer, prefixes):
    server = make_server()
    upload(server, "alice", "p", prefixes[0])
    got = {}

    def replace_and_ask():  # the first row is running (it streams): replace its prefix, then ask again
        assert upload(server, "alice", "p", prefixes[3]).status_code == 200
        got["after"] = client(server, "alice").completions.create(model="p", prompt=PROMPTS[1], max_tokens=8,
                                                                  stop=[]).choices[0].text

    with httpx.stream("POST", f"{server.url}/v1/completions", json=long_body("p"), headers=auth("alice"),
                      timeout=60) as r:
        before = stream_text(r, until_chunks=2, on_chunks=replace_and_ask)
    assert before == expected(model, real_tokenizer, prefixes[0], PROMPTS[0], LONG, stop_at_newline=False,
                              ignore_eos=True)
    assert got["after"] == expected(model, real_tokenizer, prefixes[3], PROMPTS[1], 8, stop_at_newline=False)


def test_the_prefill_budget_holds_per_step_and_given_up_rows_are_never_prefilled(make_server, model,
                                                                                 real_tokenizer, prefixes):
    server = make_server(max_batch_tokens=16)  # prompts of 10, 15, 3, 10 tokens (with the template)
    upload(server, "alice", "e2e", prefixes[0])
    backend = state(server).batcher.engine.backend
    prefill, admitted = backend.prefill, []
    backend.prefill = lambda batch, *rest: (admitted.append([len(prompt) for _, _, prompt in batch]), prefill(batch, *rest))[1]
    out = client(server, "alice").completions.create(model="e2e", prompt=PROMPTS, max_tokens=4, stop=[])
    assert admitted == [[10], [15], [3, 10]]
    assert [c.text for c in out.choices] == [expected(model, real_tokenizer, prefixes[0], p, 4, stop_at_newline=False)
                                             for p in PROMPTS]
    backend.prefill = prefill
    slow = make_server(store=state(server).settings.store_dir, max_batch_tokens=16, request_timeout_s=0.5)
    with held_worker(slow, at_token=1) as worker:
        r = {}
        asker = threading.Thread(target=lambda: r.update(r=httpx.post(
            f"{slow.url}/v1/completions", json={**long_body("e2e", stream=False), "prompt": PROMPTS},
            headers=auth("alice"), timeout=60)))
        asker.start()
        assert worker.reached.wait(30)
        assert wait_until(lambda: all(job.future.cancelled() for job in worker.jobs))
        worker.release.set()
        asker.join(60)
        assert wait_until(lambda: metric(slow, completions("cancelled")) == len(PROMPTS))
    assert r["r"].status_code == 503
    assert worker.calls == 1  # the waiting rows left before their prefill


def test_encoding_new_prompts_never_pauses_the_running_rows_for_long(model, real_tokenizer, tmp_path):
    """The worker encodes new prompts between steps, and 31 prompts of 32,768 characters take it seconds: while
    rows run it encodes for at most ADMIT_BUDGET_S before the next step. Here each encoding takes 1 s of a fake
    clock: the running row steps between any two of them (it waited for all five, in one block)."""
    from prefixtune.serve.engine_worker import EngineWorker
    from prefixtune.serve.jobs import Job

    bank = PrefixBank(model, real_tokenizer)
    worker = EngineWorker(bank, ServeSettings(store_dir=tmp_path / "store", dtype="fp32"))
    now, log, first = [0.0], [], threading.Event()
    worker.clock = lambda: now[0]
    encode, step = bank.encode, worker.engine.step

    def slow_encode(*args, **kwargs):
        now[0] += 1.0
        log.append("encode")
        return encode(*args, **kwargs)

    def logged_step():
        log.append("step")
        return step()

    def on_token(*_):  # the worker waits at the running row's first token until the new jobs are queued
        if not first.is_set():
            first.set()
            queued.wait(30)

    bank.encode, worker.engine.step = slow_encode, logged_step
    queued = threading.Event()
    worker.start()
    try:
        running = Job(None, PROMPTS[0], max_new_tokens=40, ignore_eos=True, stop_at_newline=False, on_token=on_token)
        worker.submit([running])
        assert first.wait(30)
        new = [Job(None, p, max_new_tokens=2, stop_at_newline=False) for p in PROMPTS + PROMPTS[:1]]
        start = len(log)
        worker.submit(new)
        queued.set()
        for job in new + [running]:
            job.future.result(60)
    finally:
        worker.stop()
    later = log[start:]
    assert later.count("encode") == len(new)
    assert all(later[i + 1] == "step" for i, event in enumerate(later) if event == "encode"), later


def test_failures_stay_with_their_rows_and_the_engine_recovers(make_server, prefixes):
    server = make_server()
    upload(server, "alice", "good", prefixes[0])
    upload(server, "alice", "bad", prefixes[1])
    app = state(server)
    bad_id, get = app.store.resolve("alice", "bad"), app.bank.get

    def flaky(bank_id):
        if bank_id == bad_id:
            raise RuntimeError("boom")
        return get(bank_id)

    app.bank.get = flaky
    oa = client(server, "alice")
    try:
        with ThreadPoolExecutor(3) as pool:
            # raw prompts: the prefix is looked up only to start the row, not for its template
            statuses = list(pool.map(lambda m: _status(oa, m, raw=True), ["good", "bad", "good"]))
    finally:
        app.bank.get = get
    assert statuses == [200, 500, 200]
    engine = app.batcher.engine
    engine.step = lambda: (_ for _ in ()).throw(RuntimeError("a broken step"))  # the running rows fail ...
    assert _status(oa, "good") == 500
    assert app.batcher.engine is not engine  # ... and a clean engine takes over
    assert healthy(server) and _status(oa, "good") == 200 and _status(oa, "bad") == 200


def _status(oa, name, raw=False) -> int:
    try:
        oa.completions.create(model=name, prompt="abc", max_tokens=2, extra_body={"raw": raw})
        return 200
    except openai.APIStatusError as e:
        return e.status_code


# -- sampling and logprobs ----------------------------------------------------------------------------
def test_the_same_seed_gives_the_same_text_whatever_else_is_in_the_batch(make_server, prefixes):
    server = make_server()
    upload(server, "alice", "a", prefixes[0])
    upload(server, "alice", "b", prefixes[1])
    oa = client(server, "alice")
    sampled = {"model": "a", "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 1.0, "top_p": 0.95,
               "seed": 7, "stop": [], "extra_body": {"top_k": 200, "ignore_eos": True}}
    alone = oa.completions.create(**sampled).choices[0].text
    assert oa.completions.create(**sampled).choices[0].text == alone
    companions = [dict(sampled, seed=11), dict(sampled, model="b", prompt=PROMPTS[0], temperature=0.7),
                  {"model": "b", "prompt": PROMPTS[2], "max_tokens": 30, "stop": []},
                  {"model": "tiny-llama", "prompt": PROMPTS[3], "max_tokens": 20, "temperature": 1.2, "stop": []}]
    done = threading.Event()
    steps = record_steps(server, slow_until=done)
    with ThreadPoolExecutor(len(companions) + 1) as pool:
        busy = [pool.submit(lambda c=c: oa.completions.create(**c)) for c in companions]
        assert wait_until(lambda: len(steps) >= 2)  # the companions are decoding when the seeded request joins
        together = pool.submit(lambda: oa.completions.create(**dict(sampled, n=2))).result()
        done.set()
        others = [f.result().choices[0].text for f in busy]
    assert max(len(s) for s in steps) >= 2
    assert together.choices[0].text == alone
    assert together.choices[1].text == oa.completions.create(**dict(sampled, seed=8)).choices[0].text  # seed + 1
    assert others[0] != alone  # another seed, another text


def test_logprobs_in_completions_plain_and_streamed(make_server):
    server = make_server()
    oa = client(server, "alice")
    out = oa.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=6, stop=[], logprobs=3,
                                extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and chosen <= 0 and chosen == pytest.approx(max(top.values()))  # greedy: the top one
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    pieces = list(oa.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=6, stop=[], logprobs=2,
                                        stream=True, extra_body={"ignore_eos": True}))
    streamed = [t for p in pieces if p.choices and p.choices[0].logprobs for t in p.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs)
    assert "".join(p.choices[0].text for p in pieces if p.choices) == out.choices[0].text


# -- chat ----------------------------------------------------------------------------------------------
MESSAGES = [{"role": "system", "content": "You write one short sentence."},
            {"role": "user", "content": "Describe The Eagle, a coffee shop by the river."}]


def expected_chat(model, tokenizer, data, messages, max_tokens) -> str:
    bank = PrefixBank(model, tokenizer)
    pid = None
    if data is not None:
        bank.add("p", load_prefix_bytes(data, bank.spec))
        pid = "p"
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
    out = bank.generate_ids([ids], [pid], DecodingConfig(max_new_tokens=max_tokens, stop_at_newline=False))[0]
    return tokenizer.decode(out, skip_special_tokens=True)


def test_a_chat_prompt_is_tokenized_off_the_event_loop(make_server, monkeypatch):
    """Rendering and tokenizing 32K characters of messages takes a tenth of a second: on the event loop it
    paused every connection of the server (health checks, streams) meanwhile."""
    import asyncio

    from prefixtune.serve import chat

    on_loop, render = [], chat.chat_prompt_ids

    def recorded(*args):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # a worker thread has no running loop
            on_loop.append(False)
        return render(*args)

    monkeypatch.setattr(chat, "chat_prompt_ids", recorded)
    server = make_server()
    out = client(server, "alice").chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=2)
    assert out.choices and on_loop == [False]


def test_chat_through_the_openai_client_plain_and_streamed(make_server, model, real_tokenizer, prefixes):
    server = make_server()
    upload(server, "alice", "e2e", prefixes[1])
    oa = client(server, "alice")
    for name, data in (("tiny-llama", None), ("e2e", prefixes[1])):
        want = expected_chat(model, real_tokenizer, data, MESSAGES, 12)
        out = oa.chat.completions.create(model=name, messages=MESSAGES, max_tokens=12)
        assert out.object == "chat.completion" and out.model == name
        assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == want
        assert 0 < out.usage.completion_tokens <= 12 and out.usage.prompt_tokens > 20
    assert want != expected_chat(model, real_tokenizer, None, MESSAGES, 12)  # the prefix is used

    chunks = list(oa.chat.completions.create(model="e2e", messages=MESSAGES, max_completion_tokens=12, stream=True,
                                             stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # token by token
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0

    sampled = dict(model="e2e", messages=MESSAGES, max_tokens=8, temperature=1.0, seed=3, n=2, logprobs=True,
                   top_logprobs=2)
    first, again = oa.chat.completions.create(**sampled), oa.chat.completions.create(**sampled)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    content = first.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_chat_requests_are_checked_strictly(make_server):
    server = make_server()
    url, h = f"{server.url}/v1/chat/completions", auth("alice")
    base = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    bad = [{**base, "messages": []}, {**base, "messages": [{"role": "wizard", "content": "hi"}]},
           {**base, "messages": [{"role": "user", "content": 5}]},
           {**base, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
           {**base, "messages": [{"role": "user"}]}, {**base, "messages": "hi"},
           {**base, "tools": [{"type": "function"}]}, {**base, "temperature": 3},
           {**base, "max_tokens": 100_000}, {**base, "top_logprobs": 2}, {**base, "model": "nope"},
           {**base, "stop": [""]}]
    for body in bad:
        r = httpx.post(url, json=body, headers=h, timeout=30)
        assert r.status_code in (400, 404), (body, r.status_code, r.text)
        assert r.json()["error"]["message"]
    assert httpx.post(url, json=base, headers=h, timeout=30).status_code == 200
    long = httpx.post(url, json={**base, "messages": [{"role": "user", "content": "word " * 600}]}, headers=h,
                      timeout=30)
    message = long.json()["error"]["message"]  # not "send truncate_prompt_tokens": chat refuses that field
    assert long.status_code == 400 and "the limit is 512. Shorten the messages" in message, message
    assert httpx.post(url, json={**base, "truncate_prompt_tokens": 8}, headers=h, timeout=30).status_code == 400
    assert healthy(server)


def test_chat_without_a_chat_template_is_a_clear_400(model, real_tokenizer, tmp_path):
    plain = copy.deepcopy(real_tokenizer)
    plain.chat_template = None
    keys = KeyRing([(KEYS["alice"], "alice")])
    body = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 4}
    app = create_app(model, plain, ServeSettings(store_dir=tmp_path / "a", dtype="fp32"), keys)
    with BackgroundServer(app) as server:
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=auth("alice"), timeout=30)
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]


def test_settings_and_cli_have_one_scheduler_and_name_the_dtype():
    with pytest.raises(TypeError, match="scheduler"):  # the window scheduler is gone, and its option
        ServeSettings(store_dir="x", scheduler="window")
    with pytest.raises(ValueError, match="dtype"):
        ServeSettings(store_dir="x", dtype="fp16")
    from typer.testing import CliRunner

    from prefixtune.cli import app

    text = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    assert "--scheduler" not in text and "--batch-window-ms" not in text and "--dtype" in text


def test_stop_strings_end_the_row_and_streams_add_up(make_server, model, real_tokenizer):
    server = make_server()
    oa = client(server, "alice")
    full = expected(model, real_tokenizer, None, PROMPTS[2], 20, stop_at_newline=False, ignore_eos=True)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    want = full[: full.find(stop)]
    kwargs = dict(model="tiny-llama", prompt=PROMPTS[2], max_tokens=20, stop=[stop], extra_body={"ignore_eos": True})
    plain = oa.completions.create(**kwargs)
    assert plain.choices[0].text == want and plain.choices[0].finish_reason == "stop"
    pieces = list(oa.completions.create(**kwargs, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == want
    assert pieces[-1].choices[0].finish_reason == "stop"
    assert plain.usage.completion_tokens < 20  # the row ended at the stop string, not at max_tokens


def test_batch_peaks_count_rows_and_prefixes_of_one_step():
    from prefixtune.serve.prometheus import Metrics

    m = Metrics()
    m.batch(3, 2, 0.1)
    m.batch(1, 1, 0.1)
    text = m.render()
    assert "prefixtune_batch_size_max 3\n" in text and "prefixtune_batch_prefixes_max 2\n" in text
    assert "prefixtune_batches_total 2\n" in text and "prefixtune_batch_size_sum 4\n" in text


def test_two_prefixes_decoded_together_show_in_the_metrics(make_server, prefixes):
    server = make_server()
    for tenant, i in (("alice", 0), ("bob", 1)):
        assert upload(server, tenant, "e2e", prefixes[i]).status_code == 201
    with held_worker(server, at_token=1) as held, ThreadPoolExecutor(2) as pool:
        try:  # the worker waits after alice's first token, so bob's request joins the running batch
            first = pool.submit(lambda: client(server, "alice").completions.create(
                model="e2e", prompt=PROMPTS[0], max_tokens=6, stop=[]))
            assert held.reached.wait(30)
            second = pool.submit(lambda: client(server, "bob").completions.create(
                model="e2e", prompt=PROMPTS[1], max_tokens=6, stop=[]))
            time.sleep(0.5)
        finally:
            held.release.set()
        first.result(30), second.result(30)
    assert metric(server, "prefixtune_batch_size_max") == 2
    assert metric(server, "prefixtune_batch_prefixes_max") == 2


def test_a_server_with_two_replicas_answers_every_row_as_alone(make_server, model, real_tokenizer, prefixes):
    """replicas=2 (what `--threads 2` gives): rows of two tenants, with and without prefixes, a beam request
    and a cancelled stream spread over both replicas; each answer equals decoding its row alone."""
    from prefixtune.engine import Replicas

    server = make_server(replicas=2, max_batch_size=8)
    engine = state(server).batcher.engine
    assert isinstance(engine, Replicas) and len(engine.engines) == 2 and engine.max_batch == 8
    upload(server, "alice", "a", prefixes[0])
    upload(server, "bob", "b", prefixes[1])
    jobs = [("alice", "a", PROMPTS[0], prefixes[0], {}), ("bob", "b", PROMPTS[1], prefixes[1], {}),
            ("alice", "tiny-llama", PROMPTS[2], None, {}), ("bob", "b", PROMPTS[0], prefixes[1], {"num_beams": 3}),
            ("alice", "a", PROMPTS[1], prefixes[0], {})]
    barrier = threading.Barrier(len(jobs))

    def ask(job):
        tenant, name, prompt, _, extra = job
        barrier.wait()
        return client(server, tenant).completions.create(model=name, prompt=prompt, max_tokens=10, stop=[],
                                                         extra_body=extra).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(ask, jobs))
    for text, (_, _, prompt, data, extra) in zip(got, jobs):
        assert text == expected(model, real_tokenizer, data, prompt, 10, stop_at_newline=False, **extra)
    assert all(e.stats["decode_tokens"] > 0 for e in engine.engines)  # both replicas decoded
    with httpx.stream("POST", f"{server.url}/v1/completions", json=long_body("a"), headers=auth("alice"),
                      timeout=60) as r:
        stream_text(r, until_chunks=2)  # leaves early: the row is cancelled in its replica
    assert wait_until(lambda: not engine.has_work() and not engine._where, 30)
