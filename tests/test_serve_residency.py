"""Prefix residency: an LRU of loaded prefixes over any number of stored ones (issue 13).

The bank first (eviction, reload, versions, concurrency), then the server over HTTP: eviction and
reload give the same outputs, a PUT swaps versions without touching a request in flight, a restart
over many stored prefixes loads none of them, and a stored file that fails validation fails its
requests clearly.
"""
from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from test_serve import (KEYS, PROMPTS, _metric, auth, client, expected, healthy, make_prefix, make_server,  # noqa: F401
                        held_worker, model, prefixes, real_tokenizer, upload)
from prefixtune.bank import PrefixBank, PrefixUnavailable
from prefixtune.prefix_file import load_prefix_bytes, prefix_to_bytes
from prefixtune.serve import tenant_dir_name


def loaders(bank, blobs: dict[str, bytes]):
    """A loader per id that counts its calls, as the store's loaders read files."""
    calls = {i: 0 for i in blobs}

    def loader(i):
        def load():
            calls[i] += 1
            return load_prefix_bytes(blobs[i], bank.spec, i)
        return load

    return {i: loader(i) for i in blobs}, calls


@pytest.fixture
def blobs(prefixes):
    return {f"p{i}": data for i, data in prefixes.items()}


# -- the bank --------------------------------------------------------------------------------------
def test_lru_evicts_the_least_recently_used_and_reloads_identical_tensors(model, real_tokenizer, blobs):
    bank = PrefixBank(model, real_tokenizer, max_resident=2)
    load, calls = loaders(bank, blobs)
    for i in ("p0", "p1", "p2"):
        bank.register(i, load[i])
    assert bank.resident_count() == 0 and bank.ids() == ["p0", "p1", "p2"] and "p2" in bank
    first = bank.get("p0")
    bank.get("p1")
    bank.get("p0")                    # p0 is now the most recently used: p1 goes first
    bank.get("p2")
    assert (bank.hits, bank.misses, bank.evictions, bank.resident_count()) == (1, 3, 1, 2)
    bank.get("p1")                    # evicted: loaded again, and p0 (least recent) goes
    assert calls == {"p0": 1, "p1": 2, "p2": 1, "p3": 0} and bank.evictions == 2
    again = bank.get("p0")
    assert again is not first and calls["p0"] == 2
    assert all(torch.equal(first.p[g], again.p[g]) for g in first.p)
    assert bank.resident_bytes() == sum(t.numel() * t.element_size() for i in ("p1", "p0")
                                        for t in bank.get(i).p.values())


def test_a_put_swaps_the_version_and_holders_keep_theirs(model, real_tokenizer, blobs):
    bank = PrefixBank(model, real_tokenizer, max_resident=1)
    load, _ = loaders(bank, blobs)
    bank.register("x", load["p0"])
    old = bank.get("x")
    kept = {g: t.clone() for g, t in old.p.items()}
    bank.add("x", load_prefix_bytes(blobs["p1"], bank.spec), loader=load["p1"])  # what a PUT does
    new = bank.get("x")
    assert all(torch.equal(old.p[g], kept[g]) for g in kept)                    # the holder's tensors: unchanged
    assert new.prefix_len != old.prefix_len and new.prefix_len == load_prefix_bytes(blobs["p1"]).prefix_len
    bank.register("y", load["p2"])
    bank.get("y")                                                               # evicts x
    assert bank.get("x").prefix_len == new.prefix_len                           # reloads the new version


def test_a_replacement_during_a_load_wins_over_the_load(model, real_tokenizer, blobs):
    bank = PrefixBank(model, real_tokenizer, max_resident=4)
    started, release = threading.Event(), threading.Event()

    def slow_old():
        started.set()
        release.wait(10)
        return load_prefix_bytes(blobs["p0"], bank.spec)

    bank.register("x", slow_old)
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(bank.get, "x")
        assert started.wait(10)
        bank.add("x", load_prefix_bytes(blobs["p1"], bank.spec), loader=lambda: None)
        release.set()
        old = in_flight.result(10)
    assert old.prefix_len == load_prefix_bytes(blobs["p0"]).prefix_len  # the lookup before the PUT: old version
    assert bank.get("x").prefix_len == load_prefix_bytes(blobs["p1"]).prefix_len  # not overwritten by the old load


def test_pinned_prefixes_stay_and_a_failing_load_is_prefix_unavailable(model, real_tokenizer, blobs):
    bank = PrefixBank(model, real_tokenizer, max_resident=1)
    load, _ = loaders(bank, blobs)
    bank.add("pinned", load_prefix_bytes(blobs["p0"], bank.spec))  # no loader: cannot be reloaded, never evicted
    bank.register("a", load["p1"])
    bank.get("a")
    bank.register("b", load["p2"])
    bank.get("b")
    assert "pinned" in bank.ids() and bank.get("pinned") is not None and bank.resident_count() == 2

    def broken():
        raise ValueError("checksum does not match")

    bank.register("bad", broken)
    with pytest.raises(PrefixUnavailable, match="'bad' could not be loaded: checksum"):
        bank.get("bad")
    with pytest.raises(KeyError):
        bank.get("never-registered")
    bank.remove("a")
    assert "a" not in bank and bank.get("b") is not None


def test_a_stored_file_that_went_missing_is_refused_without_the_servers_paths(model, real_tokenizer, blobs, tmp_path):
    from prefixtune.serve.errors import ServeError
    from prefixtune.serve.settings import ServeSettings
    from prefixtune.serve.store import PrefixStore

    root = tmp_path / "private-store-root"
    bank = PrefixBank(model, real_tokenizer, max_resident=1)
    store = PrefixStore(bank, ServeSettings(store_dir=root), ["alice"])
    store.put("alice", "a", blobs["p0"])
    store.put("alice", "b", blobs["p1"])  # evicts a
    (root / tenant_dir_name("alice") / "a.safetensors").unlink()  # an operator's slip, a full disk's cleanup...
    with pytest.raises(PrefixUnavailable) as raised:
        bank.get(store.bank_id("alice", "a"))
    with pytest.raises(ServeError) as refused:  # the requests after it
        store.resolve("alice", "a")
    for message in (str(raised.value), refused.value.message):
        assert "No such file or directory" in message and "upload it again" in message
        assert str(root) not in message and tenant_dir_name("alice") not in message, message


def test_a_name_that_differs_from_another_only_in_case_is_refused(model, real_tokenizer, blobs, tmp_path):
    """On macOS or Windows 'E2E.safetensors' is 'e2e.safetensors': the upload would replace the other's tensors."""
    from prefixtune.serve.errors import ServeError
    from prefixtune.serve.settings import ServeSettings
    from prefixtune.serve.store import PrefixStore

    bank = PrefixBank(model, real_tokenizer)
    store = PrefixStore(bank, ServeSettings(store_dir=tmp_path / "store"), ["alice", "bob"])
    store.put("alice", "e2e", blobs["p0"])
    with pytest.raises(ServeError) as refused:
        store.put("alice", "E2E", blobs["p1"])
    assert refused.value.status == 409
    assert "'e2e' exists, and 'E2E' differs from it only in case" in refused.value.message
    assert [i.name for i in store.list("alice")] == ["e2e"]
    assert store.put("alice", "e2e", blobs["p1"])[1] is False  # replacing it under its own name is fine
    assert store.put("bob", "E2E", blobs["p1"])[1] is True     # another tenant's names are another directory


def test_lookups_never_wait_for_an_upload_being_written(model, real_tokenizer, blobs, tmp_path, monkeypatch):
    """Requests resolve their prefix on the event loop: an upload holding the index lock through its write and
    fsync (megabytes, a slow disk) held every request of every tenant meanwhile."""
    from prefixtune.serve import store as store_module
    from prefixtune.serve.settings import ServeSettings
    from prefixtune.serve.store import PrefixStore

    store = PrefixStore(PrefixBank(model, real_tokenizer), ServeSettings(store_dir=tmp_path / "store"),
                        ["alice", "bob"])
    store.put("alice", "a", blobs["p0"])
    writing, release, write = threading.Event(), threading.Event(), store_module.atomic_write_bytes

    def slow_write(path, data):
        writing.set()
        release.wait(60)
        write(path, data)

    monkeypatch.setattr(store_module, "atomic_write_bytes", slow_write)
    uploader = threading.Thread(target=store.put, args=("bob", "b", blobs["p1"]))
    uploader.start()
    assert writing.wait(30)
    looked = []
    reader = threading.Thread(target=lambda: looked.append(
        (store.resolve("alice", "a"), [i.name for i in store.list("bob")], store.count())))
    reader.start()
    reader.join(20)  # a liveness check: without the fix it waits for `release`, however long
    answered = not reader.is_alive()
    release.set()
    uploader.join(60)
    reader.join(60)
    assert answered and looked == [(store.bank_id("alice", "a"), [], 1)]
    assert [i.name for i in store.list("bob")] == ["b"] and store.count() == 2


def test_byte_limit(model, real_tokenizer, blobs):
    sizes = {i: 4 * sum(t.numel() for t in load_prefix_bytes(b).p.values()) for i, b in blobs.items()}
    bank = PrefixBank(model, real_tokenizer, max_resident_bytes=sizes["p2"] + sizes["p3"])
    load, _ = loaders(bank, blobs)
    for i in blobs:
        bank.register(i, load[i])
        bank.get(i)
    assert bank.resident_bytes() <= sizes["p2"] + sizes["p3"] and bank.evictions == 2


def test_concurrent_lookups_load_once_and_get_the_right_prefix(model, real_tokenizer, blobs):
    bank = PrefixBank(model, real_tokenizer, max_resident=2)
    load, calls = loaders(bank, blobs)
    for i in blobs:
        bank.register(i, load[i])
    want = {i: load_prefix_bytes(b).prefix_len for i, b in blobs.items()}

    def lookups(seed):
        rng = random.Random(seed)
        for _ in range(50):
            i = rng.choice(list(blobs))
            assert bank.get(i).prefix_len == want[i]

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lookups, range(4)))
    assert bank.misses == sum(calls.values()) and bank.resident_count() == 2
    assert bank.hits + bank.misses == 200


# -- the server --------------------------------------------------------------------------------------
def test_eviction_and_reload_over_http_give_each_prefix_its_own_output(make_server, model, real_tokenizer, prefixes):
    server = make_server(max_resident_prefixes=2)
    for i in range(3):
        assert upload(server, "alice", f"p{i}", prefixes[i]).status_code == 201  # each upload is resident
    assert _metric(server, "prefixtune_prefix_cache_evictions_total") == 1
    oa = client(server, "alice")
    for _ in range(2):  # the least recently used is always the one asked for next: every request misses
        for i in range(3):
            out = oa.completions.create(model=f"p{i}", prompt=PROMPTS[i], max_tokens=6, stop=[])
            assert out.choices[0].text == expected(model, real_tokenizer, prefixes[i], PROMPTS[i], 6,
                                                   stop_at_newline=False)
    misses = _metric(server, "prefixtune_prefix_cache_misses_total")
    assert misses >= 6  # exactly 6, unless a background prefetch ran late and loaded one once more
    assert _metric(server, "prefixtune_prefix_cache_evictions_total") == misses + 1  # a full cache: one per load
    assert _metric(server, "prefixtune_prefix_cache_hits_total") >= 6  # the worker's own lookups
    assert _metric(server, "prefixtune_prefixes_resident") == 2
    assert _metric(server, "prefixtune_prefixes_stored") == 3


def test_a_put_serves_new_requests_while_one_in_flight_finishes_on_the_old(make_server, model, real_tokenizer,
                                                                           prefixes):
    server = make_server()
    assert upload(server, "alice", "e2e", prefixes[0]).status_code == 201
    oa = client(server, "alice")
    # the worker stops after the first token, on either scheduler
    with held_worker(server, at_token=1) as held, ThreadPoolExecutor(1) as pool:
        try:
            in_flight = pool.submit(lambda: oa.completions.create(model="e2e", prompt=PROMPTS[0], max_tokens=8,
                                                                 stop=[]).choices[0].text)
            assert held.reached.wait(30)
            assert upload(server, "alice", "e2e", prefixes[1]).status_code == 200  # lands mid-decode
            held.release.set()
            old_text = in_flight.result(30)
        finally:
            held.release.set()
    assert old_text == expected(model, real_tokenizer, prefixes[0], PROMPTS[0], 8, stop_at_newline=False)
    new_text = oa.completions.create(model="e2e", prompt=PROMPTS[0], max_tokens=8, stop=[]).choices[0].text
    assert new_text == expected(model, real_tokenizer, prefixes[1], PROMPTS[0], 8, stop_at_newline=False)
    assert new_text != old_text


def _write_stored(store, tenant: str, name: str, data: bytes):
    directory = store / tenant_dir_name(tenant)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.safetensors").write_bytes(data)


def test_a_restart_over_many_stored_prefixes_loads_none_until_asked(make_server, model, real_tokenizer, prefixes,
                                                                    tmp_path):
    store = tmp_path / "many"
    for i in range(40):
        _write_stored(store, "alice", f"p{i:02d}", prefixes[i % 4])
    # a file whose tensors were damaged: its header is fine, so it is listed, and fails when loaded
    damaged = bytearray(prefixes[0])
    damaged[-3] ^= 0xFF
    _write_stored(store, "alice", "damaged", bytes(damaged))
    other = model_spec_of_other_model(real_tokenizer)
    _write_stored(store, "alice", "other-model", other)  # made for another base model: skipped at start
    server = make_server(store=store, max_resident_prefixes=4)
    bank = server.server.config.app.state.bank
    assert bank.resident_count() == 0 and bank.misses == 0
    assert _metric(server, "prefixtune_prefixes_stored") == 41
    names = [p["id"] for p in httpx.get(f"{server.url}/v1/prefixes", headers=auth("alice")).json()["data"]]
    assert len(names) == 41 and "damaged" in names and "other-model" not in names
    oa = client(server, "alice")
    for i in (5, 6, 7, 8, 9, 5):
        out = oa.completions.create(model=f"p{i:02d}", prompt=PROMPTS[0], max_tokens=5, stop=[])
        assert out.choices[0].text == expected(model, real_tokenizer, prefixes[i % 4], PROMPTS[0], 5,
                                               stop_at_newline=False)
    assert bank.resident_count() == 4 and _metric(server, "prefixtune_prefixes_resident") == 4
    # the damaged file fails its requests with a clear error; the server and the other prefixes go on
    statuses = []
    for _ in range(2):
        r = httpx.post(f"{server.url}/v1/completions", headers=auth("alice"), timeout=60,
                       json={"model": "damaged", "prompt": "x", "max_tokens": 2})
        statuses.append(r.status_code)
        # the first request too (it is the one whose load fails), not only the ones after it
        assert r.status_code == 500 and r.json()["error"]["code"] == "prefix_unavailable"
        assert "checksum" in r.json()["error"]["message"] and "upload it again" in r.json()["error"]["message"]
    assert healthy(server)
    assert upload(server, "alice", "damaged", prefixes[2]).status_code == 200  # a new upload mends it
    assert oa.completions.create(model="damaged", prompt="x", max_tokens=2).choices
    assert oa.completions.create(model="p00", prompt="x", max_tokens=2).choices


def model_spec_of_other_model(tokenizer) -> bytes:
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefixtune.models import model_spec

    config = LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                         intermediate_size=64, vocab_size=len(tokenizer))
    spec = model_spec(LlamaForCausalLM(config))
    width = 3 * 2 * 2 * 8
    return prefix_to_bytes({"decoder": torch.randn(3, width)}, spec, "other")


def test_settings_and_cli_flags():
    from typer.testing import CliRunner

    from prefixtune.cli import app
    from prefixtune.serve import ServeSettings

    assert ServeSettings(store_dir="s").max_resident_prefixes == 256
    with pytest.raises(ValueError, match="max_resident_prefixes"):
        ServeSettings(store_dir="s", max_resident_prefixes=0)
    help_text = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    assert "--max-resident-prefixes" in help_text and "--max-resident-mb" in help_text
