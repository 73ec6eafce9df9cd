"""A bounded load test: N concurrent clients for T seconds against a loopback server, mixed tenants and prefixes,
plain and streaming. It ends with no error other than 429/503, no lost response, every 200 answer equal to
decoding that request alone, and a healthy server. N and T: $PREFIXTUNE_LOAD_CLIENTS (8), $PREFIXTUNE_LOAD_SECONDS (5).
"""
from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from test_serve import (KEYS, PROMPTS, _metric, auth, expected, healthy, make_server,  # noqa: F401
                        model, prefixes, real_tokenizer, upload)

CLIENTS = int(os.environ.get("PREFIXTUNE_LOAD_CLIENTS", 8))
SECONDS = float(os.environ.get("PREFIXTUNE_LOAD_SECONDS", 5))
MAX_TOKENS = 6


def test_concurrent_clients_get_answers_or_429_503_and_nothing_is_lost(make_server, model, real_tokenizer, prefixes):
    # a small queue so that overload actually happens and is answered with 429, not a hang
    server = make_server(max_queue=4, max_batch_size=8, request_timeout_s=30)
    owned = {"alice": {"a0": 0, "a1": 1}, "bob": {"b2": 2, "shared-name": 3}}
    for tenant, names in owned.items():
        for name, i in names.items():
            assert upload(server, tenant, name, prefixes[i]).status_code == 201
    models = [(t, n, prefixes[i]) for t, names in owned.items() for n, i in names.items()]
    models += [("alice", "tiny-llama", None), ("bob", "tiny-llama", None)]
    want = {(t, n, p): expected(model, real_tokenizer, data, p, MAX_TOKENS, stop_at_newline=False)
            for t, n, data in models for p in PROMPTS}

    stop_at = time.monotonic() + SECONDS
    sent = Counter()
    outcomes = Counter()
    wrong: list = []
    lost: list = []
    lock = threading.Lock()

    def worker(seed: int):
        rng = random.Random(seed)
        with httpx.Client(base_url=server.url, timeout=60) as http:
            while time.monotonic() < stop_at:
                tenant, name, _ = rng.choice(models)
                prompt = rng.choice(PROMPTS)
                stream = rng.random() < 0.3
                body = {"model": name, "prompt": prompt, "max_tokens": MAX_TOKENS, "stop": [], "stream": stream}
                with lock:
                    sent["requests"] += 1
                try:
                    r = http.post("/v1/completions", json=body, headers=auth(tenant))
                    status = r.status_code
                    if status == 200:
                        text = _streamed_text(r.text) if stream else r.json()["choices"][0]["text"]
                        if text != want[(tenant, name, prompt)]:
                            with lock:
                                wrong.append((tenant, name, prompt, text))
                    elif status in (429, 503):
                        time.sleep(rng.uniform(0.005, 0.05))  # back off as a client should
                except Exception as e:  # a dropped connection or a hang would land here: a lost response
                    with lock:
                        lost.append(repr(e))
                    continue
                with lock:
                    outcomes[status] += 1

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(worker, range(CLIENTS)))

    answered = sum(outcomes.values())
    assert not lost, lost[:3]
    assert answered == sent["requests"]
    assert set(outcomes) <= {200, 429, 503}, outcomes
    assert outcomes[200] > 0, outcomes
    assert not wrong, wrong[:3]
    # the server saw and answered every request, and is healthy with nothing left in its queue
    counted = sum(_metric(server, f'prefixtune_requests_total{{route="/v1/completions",status="{s}"}}')
                  for s in outcomes)
    assert counted == answered
    assert healthy(server)
    assert httpx.get(f"{server.url}/health").json()["queue_depth"] == 0
    # engine steps: some decoded several rows at once
    assert _metric(server, 'prefixtune_batch_size_bucket{le="1"}') < _metric(server, "prefixtune_batch_size_count")
    print(f"load: {CLIENTS} clients x {SECONDS:g} s: {dict(outcomes)}")


def _streamed_text(body: str) -> str:
    text, done = "", False
    for line in body.splitlines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            continue
        event = json.loads(data)
        assert "error" not in event, event
        text += "".join(c["text"] for c in event["choices"])
    assert done, "stream ended without [DONE]"
    return text
