"""The server against a hostile tenant and a careless client (issue 10): templates that are code, clients
that leave, a stuck worker, bad dtypes, over-long prompts, lenient types, slow and dropped bodies.

Waits are bounded polls for an event (generous limits, never a timing threshold to meet). The decoding
worker is held at a chosen token by wrapping `bank.generate_ids`, so "left at the next step" is exact.
"""
from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time

import httpx
import pytest
import torch

from test_serve import (KEYS, PROMPTS, auth, client, expected, healthy, held_worker,  # noqa: F401
                        make_server, model, prefixes, real_tokenizer, server_store, snapshot, upload)

openai = pytest.importorskip("openai")
LONG = 300  # max_tokens of a row that should never get that far


def forge(good: bytes, tensors=None, **metadata) -> bytes:
    """`good` with its tensors transformed and/or metadata replaced; the checksum made to match again."""
    from safetensors.torch import load, save

    from prefixtune.prefix_file import _digest

    header_len = struct.unpack("<Q", good[:8])[0]
    meta = {**json.loads(good[8: 8 + header_len])["__metadata__"], **metadata}
    data = load(good)
    data = {k: tensors(v) for k, v in data.items()} if tensors else data
    return save(data, metadata={**meta, "sha256": _digest(data)})


def with_template(good: bytes, template: str) -> bytes:
    return forge(good, train_config=json.dumps({"template": template}))


def metric(server, name: str) -> float:
    """A series' value (0 when it was never counted), e.g. 'prefixtune_completions_total{outcome="ok"}'."""
    for line in httpx.get(f"{server.url}/metrics", timeout=30).text.splitlines():
        if line.rsplit(" ", 1)[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def completions(outcome: str) -> str:
    return f'prefixtune_completions_total{{outcome="{outcome}"}}'


def wait_until(condition, limit_s: float = 30.0) -> bool:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def long_request(stream: bool = False) -> dict:
    return {"model": "e2e", "prompt": PROMPTS[0], "max_tokens": LONG, "ignore_eos": True, "stop": [],
            "stream": stream}


def raw_http(server, method: str, path: str, body: bytes, length: int | None = None) -> socket.socket:
    """A connection that has sent a request whose body may be shorter than its Content-Length."""
    sock = socket.create_connection((server.host, server.port), timeout=30)
    head = (f"{method} {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEYS['alice']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body) if length is None else length}\r\n\r\n")
    sock.sendall(head.encode() + body)
    return sock


# -- 1. a template is data, not code ----------------------------------------------------------------
def test_a_template_that_is_code_is_refused_at_upload(make_server, prefixes, real_tokenizer, tmp_path):
    server = make_server()
    before = snapshot(tmp_path / "store")
    refused = {"{source:>20000000}": "format spec", "{source.__class__.__mro__}": "attribute",
               "{source[0]}": "index", "{source!r}": "conversion", "{other}": "not allowed",
               "{source": "malformed", "a } b {source}": "malformed", "no field": "exactly once",
               "{source}{source}": "exactly once", "x" * 5000 + "{source}": "limit"}
    for template, problem in refused.items():
        r = upload(server, "alice", "t", with_template(prefixes[0], template))
        assert r.status_code == 400, (template, r.status_code)
        message = r.json()["error"]["message"]
        assert "template" in message and problem in message, (template, message)
    assert snapshot(tmp_path / "store") == before
    # braces written as {{ }} are literal text, and braces in the source are never read as fields
    assert upload(server, "alice", "t", with_template(prefixes[0], "Data {{x}}: {source}\n")).status_code == 201
    out = client(server, "alice").completions.create(model="t", prompt="{source.__class__}", max_tokens=2)
    assert out.usage.prompt_tokens == len(real_tokenizer("Data {x}: {source.__class__}\n")["input_ids"])
    assert healthy(server)


# -- 1b. one validation of a prefix's contents: dtype, length ---------------------------------------
def test_uploads_of_a_wrong_dtype_or_no_tokens_are_refused(make_server, prefixes):
    server = make_server()
    good = prefixes[0]
    bad = {"int32": forge(good, lambda t: t.to(torch.int32)), "bool": forge(good, lambda t: t > 0),
           "float64": forge(good, lambda t: t.double()),
           "fp16 declared float32": forge(good, lambda t: t.half()),
           "float64 declared float64": forge(good, lambda t: t.double(), dtype="float64"),
           "no tokens": forge(good, lambda t: t[:0], prefix_len="0")}
    for label, body in bad.items():
        r = upload(server, "alice", "p", body)
        assert r.status_code == 400, (label, r.status_code)
        message = r.json()["error"]["message"]
        assert "float32" in message or "0 virtual tokens" in message, (label, message)
    # a prefix exported in fp16, and saying so, is fine
    assert upload(server, "alice", "p", forge(good, lambda t: t.half(), dtype="float16")).status_code == 201


# -- 2. a client that leaves, or runs out of time, leaves the batch ---------------------------------
def test_a_dropped_stream_leaves_the_batch_at_the_next_step(make_server, prefixes, caplog):
    server = make_server()
    upload(server, "alice", "e2e", prefixes[0])
    with held_worker(server, at_token=3) as worker:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=long_request(stream=True),
                          headers=auth("alice"), timeout=60) as r:
            assert r.status_code == 200
            assert worker.reached.wait(30)
        # the connection is closed: the request cancels its row while the worker is still held
        assert wait_until(lambda: worker.jobs[0].future.cancelled())
        worker.release.set()
        assert wait_until(lambda: metric(server, completions("cancelled")) == 1)
    assert worker.tokens == 3  # the held step's token, then the row left: no 4th step
    assert metric(server, completions("ok")) == 0
    assert healthy(server) and no_errors_logged(caplog)


def no_errors_logged(caplog) -> bool:  # a client that leaves is no error (nor a traceback, nor asyncio's complaint)
    return not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_dropped_request_leaves_the_batch_and_is_a_499(make_server, prefixes, caplog):
    server = make_server()
    upload(server, "alice", "e2e", prefixes[0])
    with held_worker(server, at_token=3) as worker:
        sock = raw_http(server, "POST", "/v1/completions", json.dumps(long_request()).encode())
        assert worker.reached.wait(30)
        sock.close()
        assert wait_until(lambda: worker.jobs[0].future.cancelled())
        worker.release.set()
        assert wait_until(lambda: metric(server, completions("cancelled")) == 1)
    assert worker.tokens == 3
    assert metric(server, completions("ok")) == 0
    assert wait_until(lambda: metric(
        server, 'prefixtune_requests_total{route="/v1/completions",status="499"}') == 1)
    assert no_errors_logged(caplog), [r.getMessage() for r in caplog.records]


def test_a_timed_out_request_leaves_the_batch(make_server, prefixes, caplog):
    server = make_server(request_timeout_s=0.5)
    upload(server, "alice", "e2e", prefixes[0])
    with held_worker(server, at_token=3) as worker:
        answer = {}
        asker = threading.Thread(target=lambda: answer.update(r=httpx.post(
            f"{server.url}/v1/completions", json=long_request(), headers=auth("alice"), timeout=60)))
        asker.start()
        assert worker.reached.wait(30)
        assert wait_until(lambda: worker.jobs[0].future.cancelled())  # the handler's timeout
        worker.release.set()
        asker.join(60)
        assert wait_until(lambda: metric(server, completions("cancelled")) == 1)
    assert answer["r"].status_code == 503 and "timed out" in answer["r"].json()["error"]["message"]
    assert worker.tokens == 3
    assert metric(server, completions("ok")) == 0
    assert no_errors_logged(caplog), [r.getMessage() for r in caplog.records]


# -- 3. /health tells a stuck worker ----------------------------------------------------------------
def test_health_is_503_while_the_worker_is_stuck_with_work_pending(make_server, prefixes):
    server = make_server(worker_stall_s=0.3)
    upload(server, "alice", "e2e", prefixes[0])
    time.sleep(0.6)  # idle for longer than the limit: an idle worker is not a stuck one
    assert httpx.get(f"{server.url}/health").status_code == 200
    with held_worker(server, at_token=1) as worker:
        asker = threading.Thread(target=lambda: httpx.post(f"{server.url}/v1/completions", json=long_request(),
                                                           headers=auth("alice"), timeout=60))
        asker.start()
        assert worker.reached.wait(30)
        assert wait_until(lambda: httpx.get(f"{server.url}/health").status_code == 503)
        # the waiting row's stall may trip first; a worker that stays stuck is then named as such
        assert wait_until(lambda: "has not finished a step" in httpx.get(f"{server.url}/health").json()["reason"])
        body = httpx.get(f"{server.url}/health").json()
        assert body["worker_alive"] and "has not finished a step" in body["reason"], body
        assert body["worker_heartbeat_age_s"] > 0.3
        worker.release.set()
        asker.join(60)
    assert wait_until(lambda: httpx.get(f"{server.url}/health").status_code == 200)
    assert metric(server, "prefixtune_worker_longest_stall_seconds") > 0.3


# -- should fix: names, bodies, disconnects ---------------------------------------------------------
def test_the_base_models_name_is_reserved(make_server, prefixes):
    server = make_server()
    r = upload(server, "alice", "tiny-llama", prefixes[0])
    assert r.status_code == 400 and "base model" in r.json()["error"]["message"]
    assert upload(server, "alice", "p", prefixes[0]).status_code == 201
    assert [m.id for m in client(server, "alice").models.list()] == ["tiny-llama", "p"]


def test_a_client_that_leaves_mid_upload_is_a_499_at_info(make_server, caplog):
    server = make_server()
    caplog.set_level(logging.INFO, logger="prefixtune.serve")
    sock = raw_http(server, "PUT", "/v1/prefixes/p", b"\0" * 1000, length=100_000)
    sock.close()
    assert wait_until(lambda: metric(
        server, 'prefixtune_requests_total{route="/v1/prefixes/{name}",status="499"}') == 1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("client disconnected" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    assert metric(server, 'prefixtune_requests_total{route="/v1/prefixes/{name}",status="500"}') == 0


def test_a_body_that_arrives_too_slowly_gets_408(make_server):
    server = make_server(body_timeout_s=0.5)
    socks = [raw_http(server, "PUT", "/v1/prefixes/p", b"\0" * 1024, length=16 * 2**20) for _ in range(3)]
    socks.append(raw_http(server, "POST", "/v1/completions", b'{"model": "tiny-llama", ', length=1000))
    for sock in socks:
        answer = b""
        while chunk := sock.recv(4096):  # until the server closes the connection (the socket's limit: 30 s)
            answer += chunk
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert b"not received within 0.5 s" in answer
    assert healthy(server)


def test_a_chunked_json_body_over_the_cap_is_413(make_server):
    server = make_server(max_json_bytes=4096)
    chunked = httpx.post(f"{server.url}/v1/completions", timeout=30,
                         content=iter([b'{"model": "tiny-llama", "prompt": "', b"y" * 10_000, b'"}']),
                         headers={**auth("alice"), "Content-Type": "application/json"})
    assert chunked.status_code == 413 and "4096" in chunked.json()["error"]["message"]
    assert healthy(server)


# -- should fix: prompts and field types ------------------------------------------------------------
def test_a_prompt_over_the_limit_is_refused_unless_truncation_is_asked(make_server):
    server = make_server()
    oa = client(server, "alice")
    long_prompt = "name : The Eagle | food : Thai | " * 60  # over 512 tokens
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="the limit is 512"):
            oa.completions.create(model="tiny-llama", prompt=long_prompt, max_tokens=2, stream=stream)
    out = oa.completions.create(model="tiny-llama", prompt=long_prompt, max_tokens=2,
                                extra_body={"truncate_prompt_tokens": 100})
    assert out.usage.prompt_tokens <= 100
    with pytest.raises(openai.BadRequestError, match="truncate_prompt_tokens"):
        oa.completions.create(model="tiny-llama", prompt="x", extra_body={"truncate_prompt_tokens": 513})
    assert oa.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=2).choices


def test_field_types_are_strict(make_server):
    server = make_server()
    url, h = f"{server.url}/v1/completions", auth("alice")
    base = {"model": "tiny-llama", "prompt": "x", "max_tokens": 2}
    for field, value in (("max_tokens", True), ("max_tokens", 2.0), ("max_tokens", "2"), ("stream", "yes"),
                         ("stream", 1), ("echo", "true"), ("num_beams", "2"), ("raw", 0), ("prompt", 5)):
        r = httpx.post(url, json={**base, field: value}, headers=h, timeout=30)
        assert r.status_code == 400 and field in r.json()["error"]["message"], (field, value, r.text)
    assert httpx.post(url, json={**base, "temperature": 0, "top_p": 1}, headers=h, timeout=30).status_code == 200


def test_a_stream_never_sends_the_start_of_a_stop_string_while_the_text_is_shorter_than_it():
    from prefixtune.serve.completions import Finisher, Stops

    class Chars:  # one token per character
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    finisher = Finisher(Chars(), Stops.of(["ENDOFTEXT"], max_tokens=50))
    streamed = ""
    for ch in "Hi ENDOFTEXT and more":
        finisher.tokens.append(ord(ch))
        streamed += finisher.delta()
        assert "E" not in streamed  # "E", "EN", ... could still be the stop string: held back
        if finisher.stopped:
            break
    assert streamed + finisher.delta(final=True) == "Hi " and finisher.finish_reason() == "stop"
