"""The server: OpenAI client, mixed batches across tenants, isolation tried as an attacker, fuzzed uploads,
quotas, restarts, overload, and a server that survives bad requests.

Every test starts uvicorn on a free loopback port (127.0.0.1 only) in a daemon thread and stops it itself.
The model is a tiny random Llama with the embedded model's real tokenizer.
"""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

from conftest import REPO, tiny_model
from prefixtune.bank import PrefixBank
from prefixtune.generation import DecodingConfig
from prefixtune.prefix_file import prefix_to_bytes
from prefixtune.models import model_spec
from prefixtune.prefix import PrefixConfig, build_prefix_encoder
from prefixtune.serve import BackgroundServer, KeyRing, ServeSettings, create_app, tenant_dir_name
from prefixtune.serve.completions import Finisher, Stops
from prefixtune.serve.server import serve_process

openai = pytest.importorskip("openai")

KEYS = {"alice": "sk-alice-0123456789abcdef", "bob": "sk-bob-fedcba9876543210"}
PROMPTS = ["name : The Eagle | Type : coffee shop", "name : Zizzi | food : Thai | area : riverside",
           "hello there", "name : Aromi | price : cheap"]


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_tokenizer():
    from prefixtune.models import load_base_model

    _, tokenizer = load_base_model("smollm2-135m")
    return tokenizer


@pytest.fixture(scope="module")
def model(real_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefixtune.models import freeze

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                         intermediate_size=64, vocab_size=len(real_tokenizer), max_position_embeddings=1024,
                         eos_token_id=real_tokenizer.eos_token_id, pad_token_id=real_tokenizer.pad_token_id)
    m = LlamaForCausalLM(config)
    m.config._name_or_path = "tiny-llama"
    return freeze(m)


def make_prefix(model, tokenizer, seed: int, length: int = 4) -> bytes:
    spec = model_spec(model)
    enc = build_prefix_encoder(model, tokenizer, spec, PrefixConfig(prefix_len=length, mlp_dim=16), seed=seed)
    with torch.no_grad():  # scaled up: different prefixes give clearly different tokens
        p = {g: t * 5 for g, t in enc().items()}
    return prefix_to_bytes(p, spec, "tiny-llama")


@pytest.fixture(scope="module")
def prefixes(model, real_tokenizer):
    return {i: make_prefix(model, real_tokenizer, seed=100 + i, length=3 + i) for i in range(4)}


@pytest.fixture
def make_server(model, real_tokenizer, tmp_path):
    """make_server(**settings) -> a started BackgroundServer; all are stopped at the end of the test."""
    started = []

    def make(store=None, **overrides):
        settings = ServeSettings(store_dir=store or tmp_path / "store", **{"dtype": "fp32", **overrides})
        app = create_app(model, real_tokenizer, settings, KeyRing([(k, t) for t, k in KEYS.items()]))
        server = BackgroundServer(app).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def auth(tenant: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def client(server, tenant: str):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS[tenant], max_retries=0, timeout=60)


def upload(server, tenant: str, name: str, data: bytes, **headers) -> httpx.Response:
    return httpx.put(f"{server.url}/v1/prefixes/{name}", content=data, headers={**auth(tenant), **headers},
                     timeout=60)


def expected(model, tokenizer, data: bytes | None, prompt: str, max_tokens: int, stop_at_newline=True, **decoding):
    """What decoding this one row alone gives, through the same bank code path."""
    from prefixtune.prefix_file import load_prefix_bytes

    bank = PrefixBank(model, tokenizer)
    pid = None
    if data is not None:
        bank.add("p", load_prefix_bytes(data, bank.spec))
        pid = "p"
    ids = bank.generate_ids([bank.encode(prompt, pid)], [pid],
                            DecodingConfig(max_new_tokens=max_tokens, stop_at_newline=stop_at_newline,
                                           **decoding))[0]
    return tokenizer.decode(ids, skip_special_tokens=True)


@contextmanager
def held_worker(server, at_token: int):
    """Holds the decoding worker when it emits its `at_token`-th token, until `release` is set; counts the
    tokens it emits and the engine steps that prefill, and records the jobs submitted."""
    batcher = server.server.config.app.state.batcher
    state = SimpleNamespace(reached=threading.Event(), release=threading.Event(), tokens=0, jobs=[], calls=0)
    submit, engine = batcher.submit, batcher.engine
    step, prefill = engine.step, engine.backend.prefill

    def gated_step():
        events = step()
        for _ in range(sum(e.token is not None for e in events)):
            state.tokens += 1
            if state.tokens == at_token:
                state.reached.set()
                state.release.wait(60)
        return events

    def counted_prefill(batch, *args):
        state.calls += 1
        return prefill(batch, *args)

    engine.step, engine.backend.prefill = gated_step, counted_prefill
    batcher.submit = lambda jobs: (state.jobs.extend(jobs), submit(jobs))[1]
    try:
        yield state
    finally:
        state.release.set()
        batcher.submit, engine.step, engine.backend.prefill = submit, step, prefill


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def healthy(server) -> bool:
    r = httpx.get(f"{server.url}/health", timeout=30)
    return r.status_code == 200 and r.json()["worker_alive"]


# -- OpenAI compatibility ------------------------------------------------------------------------
def test_openai_client_models_completions_and_stream(make_server, model, real_tokenizer, prefixes):
    server = make_server()
    assert upload(server, "alice", "e2e", prefixes[0]).status_code == 201
    oa = client(server, "alice")
    assert [m.id for m in oa.models.list()] == ["tiny-llama", "e2e"]
    assert oa.models.retrieve("e2e").id == "e2e"

    out = oa.completions.create(model="e2e", prompt=PROMPTS[0], max_tokens=10, stop=[])
    want = expected(model, real_tokenizer, prefixes[0], PROMPTS[0], 10, stop_at_newline=False)
    assert out.choices[0].text == want and out.object == "text_completion" and out.model == "e2e"
    assert out.usage.completion_tokens == 10 and out.choices[0].finish_reason == "length"
    assert out.usage.total_tokens == out.usage.prompt_tokens + 10

    many = oa.completions.create(model="e2e", prompt=PROMPTS, max_tokens=6)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert [c.text for c in many.choices] == [expected(model, real_tokenizer, prefixes[0], p, 6) for p in PROMPTS]

    base = oa.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=10, stop=[])
    assert base.choices[0].text == expected(model, real_tokenizer, None, PROMPTS[0], 10, stop_at_newline=False)
    assert base.choices[0].text != out.choices[0].text  # the prefix is used

    pieces = list(oa.completions.create(model="e2e", prompt=PROMPTS[0], max_tokens=10, stop=[], stream=True,
                                        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in pieces if c.choices)
    assert text == want
    assert sum(1 for c in pieces if c.choices and c.choices[0].text) > 1  # token by token, not one blob
    assert [c.choices[0].finish_reason for c in pieces if c.choices][-1] == "length"
    assert pieces[-1].usage.completion_tokens == 10

    beams = oa.completions.create(model="e2e", prompt=PROMPTS[1], max_tokens=6, stop=[], extra_body={"num_beams": 3})
    assert beams.choices[0].text == expected(model, real_tokenizer, prefixes[0], PROMPTS[1], 6, stop_at_newline=False,
                                             num_beams=3)
    streamed = list(oa.completions.create(model="e2e", prompt=PROMPTS[1], max_tokens=6, stop=[], stream=True,
                                          extra_body={"num_beams": 3}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == beams.choices[0].text

    controls = {"no_repeat_ngram_size": 1, "repetition_penalty": 1.5}
    controlled = oa.completions.create(model="e2e", prompt=PROMPTS[0], max_tokens=10, stop=[], extra_body=controls)
    assert controlled.choices[0].text == expected(model, real_tokenizer, prefixes[0], PROMPTS[0], 10,
                                                  stop_at_newline=False, **controls)
    assert controlled.choices[0].text != want  # the random model repeats tokens; the controls forbid it


def test_openai_client_errors_are_clear(make_server, prefixes):
    server = make_server()
    upload(server, "alice", "e2e", prefixes[0])
    oa = client(server, "alice")
    assert len(oa.completions.create(model="e2e", prompt="x", temperature=0.7, n=2, max_tokens=2).choices) == 2
    with pytest.raises(openai.BadRequestError, match="temperature"):
        oa.completions.create(model="e2e", prompt="x", temperature=5)
    with pytest.raises(openai.BadRequestError, match="num_beams"):
        oa.completions.create(model="e2e", prompt="x", n=2, extra_body={"num_beams": 2})
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        oa.completions.create(model="e2e", prompt="x", logprobs=50)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oa.completions.create(model="e2e", prompt="x", max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="prompt"):
        oa.completions.create(model="e2e", prompt=[1, 2, 3])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        oa.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("nope")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert oa.completions.create(model="e2e", prompt="x", temperature=0, max_tokens=2).choices
    assert healthy(server)


def test_finisher_streams_add_up_and_stop_strings_cut(real_tokenizer):
    ids = real_tokenizer("The Eagle is a coffee shop. It is cheap.", add_special_tokens=False)["input_ids"]
    for stops in ([], ["shop"], ["It is", "."]):
        stream = Finisher(real_tokenizer, Stops(100, strings=stops))
        pieces = []
        for token in ids:
            stream.tokens.append(token)
            pieces.append(stream.delta())
            if stream.stopped:
                break
        pieces.append(stream.delta(final=True))
        whole = Finisher(real_tokenizer, Stops(100, strings=stops))
        whole.tokens = list(ids)
        assert "".join(pieces) == whole.delta(final=True)
        assert stream.finish_reason() == "stop"
    cut = Finisher(real_tokenizer, Stops(100, strings=["coffee"]))
    cut.tokens = list(ids)
    assert cut.delta(final=True) == "The Eagle is a "


# -- dynamic batching ------------------------------------------------------------------------------
def test_requests_from_two_tenants_decode_in_one_mixed_batch(make_server, model, real_tokenizer, prefixes):
    server = make_server()
    assert upload(server, "alice", "e2e", prefixes[1]).status_code == 201
    assert upload(server, "bob", "e2e", prefixes[2]).status_code == 201  # same name, another tenant
    jobs = [("alice", "e2e", PROMPTS[0], prefixes[1]), ("bob", "e2e", PROMPTS[0], prefixes[2]),
            ("alice", "e2e", PROMPTS[1], prefixes[1]), ("bob", "tiny-llama", PROMPTS[2], None)]
    barrier = threading.Barrier(len(jobs))

    def ask(job):
        tenant, name, prompt, _ = job
        barrier.wait()
        return client(server, tenant).completions.create(model=name, prompt=prompt, max_tokens=8,
                                                         stop=[]).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(ask, jobs))
    assert _metric(server, 'prefixtune_batch_size_bucket{le="1"}') < _metric(server, "prefixtune_batch_size_count")
    assert _metric(server, 'prefixtune_batch_prefixes_bucket{le="1"}') < _metric(server, "prefixtune_batch_prefixes_count")
    for text, (_, _, prompt, data) in zip(got, jobs):
        assert text == expected(model, real_tokenizer, data, prompt, 8, stop_at_newline=False)
    assert got[0] != got[1]  # same prompt, same prefix name, different tenants: different prefixes


def _metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith(name + " ") or (("{" in name) and line.startswith(name)):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_and_health(make_server, prefixes):
    server = make_server()
    upload(server, "alice", "secret-name", prefixes[0])
    client(server, "alice").completions.create(model="secret-name", prompt="x", max_tokens=3, stop=[])
    r = httpx.get(f"{server.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in ("prefixtune_requests_total", "prefixtune_batch_size_bucket", "prefixtune_queue_depth",
                 "prefixtune_generated_tokens_total", "prefixtune_worker_alive 1"):
        assert name in r.text
    assert _metric(server, "prefixtune_generated_tokens_total") >= 3
    assert "secret-name" not in r.text and "alice" not in r.text  # no tenant data in unauthenticated output
    body = httpx.get(f"{server.url}/health").json()
    assert body["status"] == "ok" and body["prefixes"] == 1
    assert httpx.get(f"{server.url}/docs").status_code == 200
    assert "/v1/completions" in httpx.get(f"{server.url}/openapi.json").json()["paths"]


def test_queue_full_is_429_and_timeouts_are_503(make_server, prefixes):
    server = make_server(max_queue=1)
    upload(server, "alice", "e2e", prefixes[0])
    oa = client(server, "alice")
    with pytest.raises(openai.BadRequestError, match="decodes 2 engine rows"):  # never fits: a 429 retried in vain
        oa.completions.create(model="e2e", prompt=["a", "b"], max_tokens=2)
    # a worker held up: requests beyond the queue get 429 at once, queued ones time out with 503
    server.stop()
    slow = make_server(store=server_store(server), max_queue=2, request_timeout_s=1.0)
    with held_worker(slow, at_token=1) as worker:
        oa = client(slow, "alice")
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(_status, oa, "e2e") for _ in range(6)]
            time.sleep(0.3)
            statuses = [f.result() for f in futures]
        worker.release.set()
    assert set(statuses) <= {429, 503} and 429 in statuses, statuses
    assert healthy(slow)
    assert oa.completions.create(model="e2e", prompt="x", max_tokens=2).choices  # and it works again


def server_store(server) -> Path:
    return server.server.config.app.state.settings.store_dir


def _status(oa, model) -> int:
    try:
        oa.completions.create(model=model, prompt="abc", max_tokens=2)
        return 200
    except openai.APIStatusError as e:
        return e.status_code


def test_bad_requests_never_take_the_server_down(make_server):
    server = make_server(max_json_bytes=4096)
    url, h = f"{server.url}/v1/completions", auth("alice")
    bodies = [b"{", b"null", b"[]", b'{"model": 1}', b'{"model": "tiny-llama"}', b'{"prompt": "x"}',
              b'{"model": "tiny-llama", "prompt": {"a": 1}}', b'{"model": "tiny-llama", "prompt": []}',
              b'{"model": "tiny-llama", "prompt": "x", "max_tokens": -1}',
              b'{"model": "tiny-llama", "prompt": "x", "max_tokens": "many"}',
              b'{"model": "tiny-llama", "prompt": "x", "stop": ["", "a"]}',
              b'{"model": "tiny-llama", "prompt": "x", "num_beams": 1000}',
              b'{"model": "tiny-llama", "prompt": "' + b"x" * 5000 + b'"}',
              b'{"model": "tiny-llama", "prompt": "\xff\xfe"}', b"[" * 100_000]
    for body in bodies:
        r = httpx.post(url, content=body, headers={**h, "Content-Type": "application/json"}, timeout=30)
        assert 400 <= r.status_code < 500, (body[:50], r.status_code, r.text)
        assert "error" in r.json()
    chunked = httpx.post(url, content=iter([b'{"model": "tiny-llama", "prompt": "', b"y" * 10_000, b'"}']),
                         headers={**h, "Content-Type": "application/json"}, timeout=30)
    assert 400 <= chunked.status_code < 500
    assert httpx.get(f"{server.url}/nope").status_code == 404
    assert httpx.delete(f"{server.url}/v1/models", headers=h).status_code == 405
    r = httpx.post(url, json={"model": "tiny-llama", "prompt": "", "raw": True}, headers=h, timeout=30)
    assert r.status_code == 400 and "no tokens" in r.json()["error"]["message"]
    assert healthy(server)


# -- tenants, tried as an attacker ----------------------------------------------------------------
def test_tenant_isolation_against_an_attacker(make_server, model, real_tokenizer, prefixes, tmp_path):
    server = make_server()
    assert upload(server, "alice", "secret", prefixes[0]).status_code == 201
    store = tmp_path / "store"
    alice_before = (store / tenant_dir_name("alice") / "secret.safetensors").read_bytes()
    oa_bob = client(server, "bob")
    url = server.url

    # bob cannot see, use, read or delete it, whatever he guesses
    assert [m.id for m in oa_bob.models.list()] == ["tiny-llama"]
    assert httpx.get(f"{url}/v1/prefixes", headers=auth("bob")).json()["data"] == []
    guesses = ["secret", "alice/secret", f"{tenant_dir_name('alice')}/secret", "../secret", "..", ".",
               f"../{tenant_dir_name('alice')}/secret", "secret.safetensors", "SECRET", "secret ", " secret",
               "secret\n", "secret%00", "*", "", "a" * 65, "é"]
    for guess in guesses:
        with pytest.raises((openai.NotFoundError, openai.BadRequestError)):
            oa_bob.completions.create(model=guess, prompt="x", max_tokens=2)
    raw_paths = ["secret", "..%2Fsecret", "%2e%2e", "%2e%2e%2f%2e%2e%2fsecret", "alice%2Fsecret",
                 f"{tenant_dir_name('alice')}%2Fsecret", "secret%2F", ".secret", "-secret"]
    for path in raw_paths:
        for method in ("GET", "DELETE"):
            r = httpx.request(method, f"{url}/v1/prefixes/{path}", headers=auth("bob"), timeout=30)
            assert r.status_code in (400, 404, 405), (method, path, r.status_code)
        r = httpx.put(f"{url}/v1/prefixes/{path}", content=prefixes[3], headers=auth("bob"), timeout=30)
        if path == "secret":
            assert r.status_code == 201  # his own prefix called "secret", not alice's
        else:
            assert r.status_code in (400, 404, 405), (path, r.status_code)

    # bob's "secret" is his; alice's is untouched and still hers
    assert (store / tenant_dir_name("alice") / "secret.safetensors").read_bytes() == alice_before
    oa_alice = client(server, "alice")
    got = oa_alice.completions.create(model="secret", prompt=PROMPTS[0], max_tokens=6, stop=[]).choices[0].text
    assert got == expected(model, real_tokenizer, prefixes[0], PROMPTS[0], 6, stop_at_newline=False)
    bobs = oa_bob.completions.create(model="secret", prompt=PROMPTS[0], max_tokens=6, stop=[]).choices[0].text
    assert bobs == expected(model, real_tokenizer, prefixes[3], PROMPTS[0], 6, stop_at_newline=False)
    assert httpx.delete(f"{url}/v1/prefixes/secret", headers=auth("bob")).status_code == 200
    assert [m.id for m in oa_alice.models.list()] == ["tiny-llama", "secret"]

    # nothing was ever written outside the store, and the store holds only hashed tenant directories
    assert sorted(p.name for p in store.iterdir()) == sorted({tenant_dir_name("alice"), tenant_dir_name("bob")})
    assert [p.name for p in tmp_path.iterdir()] == ["store"]

    # no key, a wrong key, a near-miss key, the wrong scheme: 401 everywhere that is not public
    for headers in ({}, {"Authorization": "Bearer sk-nobody"}, {"Authorization": f"Bearer {KEYS['alice']}x"},
                    {"Authorization": f"Bearer {KEYS['alice'][:-1]}"}, {"Authorization": "Bearer"},
                    {"Authorization": f"Basic {KEYS['alice']}"}, {"Authorization": KEYS["alice"]}):
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/prefixes"), ("GET", "/v1/prefixes/secret"),
                             ("DELETE", "/v1/prefixes/secret"), ("PUT", "/v1/prefixes/x"),
                             ("POST", "/v1/completions"), ("GET", "/v1/models/secret")):
            body = json.dumps({"model": "secret", "prompt": "x"}).encode() if method == "POST" else b""
            r = httpx.request(method, url + path, headers=headers, content=body or None, timeout=30)
            assert r.status_code == 401, (headers, method, path, r.status_code)
    assert httpx.get(f"{url}/v1/prefixes", headers=auth("alice")).json()["data"][0]["id"] == "secret"


def test_keys_from_env_and_file_are_compared_in_constant_time(tmp_path):
    ring = KeyRing.load(env={"PREFIXTUNE_API_KEYS": "k1:alice, k2:bob,k:with:colon:carol"})
    assert ring.authenticate("k1") == "alice" and ring.authenticate("k2") == "bob"
    assert ring.authenticate("k:with:colon") == "carol"
    assert ring.authenticate("k3") is None and ring.authenticate("") is None and ring.authenticate(None) is None
    (tmp_path / "keys.json").write_text(json.dumps({"j1": "alice"}))
    (tmp_path / "keys.txt").write_text("# comment\nt1:dave\nt2 erin\n")
    assert KeyRing.load(tmp_path / "keys.json", env={}).authenticate("j1") == "alice"
    lines = KeyRing.load(tmp_path / "keys.txt", env={})
    assert lines.tenants() == ["dave", "erin"]
    with pytest.raises(ValueError, match="two tenants"):
        KeyRing([("same", "a"), ("same", "b")])
    with pytest.raises(ValueError, match="invalid"):
        KeyRing([("k", "../etc")])
    import inspect

    from prefixtune.serve import tenants

    source = inspect.getsource(tenants.KeyRing.authenticate)
    assert "compare_digest" in source and "break" not in source and "return tenant" not in source


# -- uploads: validation, fuzzing, quotas, persistence ----------------------------------------------
def _fuzz_bodies(good: bytes, wrong_model: bytes) -> list[tuple[str, bytes]]:
    rng = random.Random(0)
    header_len = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8: 8 + header_len])
    bodies = [("random", rng.randbytes(n)) for n in (1, 7, 8, 9, 64, 1000, 5000)]
    bodies += [("truncated", good[:n]) for n in sorted({0, 8, 9, 40, header_len, header_len + 8, header_len + 9,
                                                          len(good) // 2, len(good) - 1})]
    bodies += [("huge header length", struct.pack("<Q", n) + good[8:]) for n in (2**63, 2**40, len(good))]
    bodies += [("json bomb", struct.pack("<Q", len(b)) + b) for b in
               (b"[" * 60_000, b'{"a":' * 12_000, b'"' + b"\\u0000" * 10_000 + b'"', b"1" * 5000)]
    flipped = bytearray(good)
    flipped[-3] ^= 0x55
    bodies.append(("bit flip", bytes(flipped)))
    for key, value in (("format", "other/1"), ("sha256", "0" * 64), ("fingerprint", "deadbeef")):
        meta = dict(header["__metadata__"], **{key: value})
        blob = json.dumps({**header, "__metadata__": meta}).encode()
        bodies.append((f"metadata {key}", struct.pack("<Q", len(blob)) + blob + good[8 + header_len:]))
    shape = json.dumps({**header, **{k: {**v, "shape": [10**9, 10**9]} for k, v in header.items()
                                     if k != "__metadata__"}}).encode()
    bodies.append(("lying shape", struct.pack("<Q", len(shape)) + shape + good[8 + header_len:]))
    bodies.append(("wrong model", wrong_model))
    from safetensors.torch import save

    bodies.append(("foreign safetensors", save({"w": torch.zeros(3)})))
    bodies.append(("nan prefix", _nan_prefix(good)))
    return bodies


def _nan_prefix(good: bytes) -> bytes:
    from prefixtune.prefix_file import load_prefix_bytes

    exported = load_prefix_bytes(good)
    spec_json = json.loads(exported.metadata["model_spec"])
    from prefixtune.models import ModelSpec

    spec = ModelSpec(**spec_json)
    p = {g: torch.full_like(t, float("nan")) for g, t in exported.p.items()}
    return prefix_to_bytes(p, spec, "tiny-llama")


def test_fuzzed_uploads_get_4xx_and_change_nothing(make_server, prefixes, tmp_path):
    server = make_server(max_upload_bytes=64 * 1024)
    good = prefixes[0]
    assert upload(server, "alice", "keep", good).status_code == 201
    store = tmp_path / "store"
    before, listing = snapshot(store), httpx.get(f"{server.url}/v1/prefixes", headers=auth("alice")).json()
    gpt2 = tiny_model("gpt2")
    from conftest import ByteTokenizer

    wrong = make_prefix(gpt2, ByteTokenizer(), seed=1)
    cases = _fuzz_bodies(good, wrong)
    cases.append(("oversized", good + b"\0" * 70_000))
    for name in ("keep", "new"):  # over an existing prefix and as a new one
        for label, body in cases:
            r = upload(server, "alice", name, body)
            assert 400 <= r.status_code < 500, (label, r.status_code, r.text[:200])
            assert r.json()["error"]["message"], label
    # oversized without a Content-Length (chunked): cut off while streaming
    r = httpx.put(f"{server.url}/v1/prefixes/new", content=iter([good] * 100), headers=auth("alice"), timeout=30)
    assert r.status_code == 413
    assert snapshot(store) == before
    assert httpx.get(f"{server.url}/v1/prefixes", headers=auth("alice")).json() == listing
    wrong_msg = upload(server, "alice", "new", wrong).json()["error"]["message"]
    assert "num_kv_heads" in wrong_msg or "different shape" in wrong_msg
    assert healthy(server)


def test_quota_overwrite_and_if_none_match(make_server, prefixes):
    server = make_server(max_prefixes_per_tenant=2, max_bytes_per_tenant=len(prefixes[0]) + len(prefixes[1]) + 10)
    assert upload(server, "alice", "a", prefixes[0]).status_code == 201
    assert upload(server, "alice", "b", prefixes[1]).status_code == 201
    r = upload(server, "alice", "c", prefixes[0])
    assert r.status_code == 403 and "quota" in r.json()["error"]["message"]
    assert upload(server, "bob", "c", prefixes[0]).status_code == 201  # quotas are per tenant
    assert upload(server, "alice", "a", prefixes[0]).status_code == 200  # replacing is not a new prefix
    r = upload(server, "alice", "a", prefixes[3])  # a larger one would exceed the byte quota
    assert r.status_code == 403 and "bytes" in r.json()["error"]["message"]
    r = upload(server, "alice", "a", prefixes[0], **{"If-None-Match": "*"})
    assert r.status_code == 412
    assert httpx.delete(f"{server.url}/v1/prefixes/b", headers=auth("alice")).status_code == 200
    assert httpx.delete(f"{server.url}/v1/prefixes/b", headers=auth("alice")).status_code == 404
    assert upload(server, "alice", "c", prefixes[1]).status_code == 201


def test_prefixes_survive_a_restart(make_server, model, real_tokenizer, prefixes, tmp_path):
    store = tmp_path / "store"
    first = make_server(store=store)
    upload(first, "alice", "e2e", prefixes[0])
    upload(first, "bob", "e2e", prefixes[1])
    upload(first, "bob", "gone", prefixes[2])
    httpx.delete(f"{first.url}/v1/prefixes/gone", headers=auth("bob"))
    before = client(first, "alice").completions.create(model="e2e", prompt=PROMPTS[0], max_tokens=6).choices[0].text
    first.stop()
    # debris a crash could leave, and a file someone corrupted, are skipped on restart
    (store / tenant_dir_name("alice") / ".e2e.safetensors.abc.tmp").write_bytes(b"half a file")
    (store / tenant_dir_name("alice") / "broken.safetensors").write_bytes(b"garbage")
    second = make_server(store=store)
    assert [m.id for m in client(second, "alice").models.list()] == ["tiny-llama", "e2e"]
    assert [m.id for m in client(second, "bob").models.list()] == ["tiny-llama", "e2e"]
    after = client(second, "alice").completions.create(model="e2e", prompt=PROMPTS[0], max_tokens=6).choices[0].text
    assert after == before
    assert not list(store.rglob("*.tmp"))


# -- the command line --------------------------------------------------------------------------------
def test_cli_serve_end_to_end(model, real_tokenizer, prefixes, tmp_path):
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    real_tokenizer.save_pretrained(model_dir)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PREFIXTUNE_API_KEYS": f"{KEYS['alice']}:alice"}
    # --threads 2: two engine replicas over one copy of the weights (engine/replicas.py)
    args = ["--model", model_dir, "--store", tmp_path / "store", "--threads", 2, "--log-level", "info"]
    with serve_process(args, env, tmp_path / "serve.log", timeout_s=120) as (_, url):
        r = httpx.put(f"{url}/v1/prefixes/e2e", content=prefixes[0], headers=auth("alice"))
        assert r.status_code == 201, r.text
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS["alice"], max_retries=0)
        out = oa.completions.create(model="e2e", prompt=PROMPTS[0], max_tokens=5, stop=[])
        assert out.usage.completion_tokens == 5
    assert "2 replica(s)" in (tmp_path / "serve.log").read_text()
    no_keys = {k: v for k, v in env.items() if k != "PREFIXTUNE_API_KEYS"}
    proc = subprocess.run([sys.executable, "-m", "prefixtune.cli", "serve", "--store", tmp_path / "s2"],
                          env=no_keys, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no API keys" in proc.stderr
