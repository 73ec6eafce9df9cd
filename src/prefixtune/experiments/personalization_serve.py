"""The personalisation study's serving stage: every user through one `prefixtune serve --store` process.

  mixed   each user's first `serve_size` heat-map entries, all users' requests sent at once (the engine decodes
          them in mixed batches), each answer against the same row decoded alone (a batch of one, `PrefixBank`)
  churn   the other users' requests sent again; while they are in flight one user is deleted and the shared
          prefix uploaded as a new user; the others' answers must not change, the new user's must equal the
          shared prefix decoded alone, and the deleted user's requests must be refused
"""
from __future__ import annotations

import os
import shutil
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

KEY = "sk-personalization-study"
SHARED = "all-categories"  # the shared prefix's name: in the heat map, and as the user added while requests run
TENANT = "default"  # the joint job's tenant (users.UsersConfig)


@contextmanager
def server(model: str, store: Path, threads: int, log_file: Path):
    """A `prefixtune serve` process on 127.0.0.1 over `store`; yields its base URL once /health answers."""
    from ..serve.server import serve_process

    src = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PREFIXTUNE_API_KEYS": f"{KEY}:{TENANT}", "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)}
    args = ["--model", model, "--store", store, "--threads", threads, "--log-level", "warning", "--max-prefixes", 64]
    with serve_process(args, env, log_file) as (_, url):
        yield url


def serve_checks(bank, users: list[str], tests: dict, outputs: dict, scale, model: str, store: Path, work: Path,
                 threads: int, log) -> dict:
    """The two rounds above; returns their counts (and the outputs, for the report's traceability)."""
    import httpx

    from ..generation import DecodingConfig

    config = DecodingConfig(max_new_tokens=scale.max_new_tokens, dtype="auto")
    alone = lambda prefix, source: bank.generate([source], [prefix], config)[0].strip()  # noqa: E731
    headers = {"Authorization": f"Bearer {KEY}"}

    def complete(url, prefix, source):
        r = httpx.post(f"{url}/v1/completions", headers=headers, timeout=600,
                       json={"model": prefix, "prompt": source, "max_tokens": scale.max_new_tokens, "temperature": 0})
        return (r.status_code, r.json()["choices"][0]["text"].strip() if r.status_code == 200 else r.text)

    served_store = work / "serve-store"  # the server writes into its store: the job's own stays as trained
    shutil.rmtree(served_store, ignore_errors=True)
    shutil.copytree(store.parent, served_store)
    rows = [(u, i, tests[u][i].source) for u in users for i in range(min(scale.serve_size, len(tests[u])))]
    deleted = users[0]
    with server(model, served_store, threads, work / "server.log") as url:
        log(f"serving: {len(rows)} requests of {len(users)} users at once")
        with ThreadPoolExecutor(len(rows)) as pool:
            first = list(pool.map(lambda row: complete(url, row[0], row[2]), rows))
        others = [(row, answer) for row, answer in zip(rows, first) if row[0] != deleted]
        log(f"serving: deleting {deleted} and adding {SHARED} while {len(others)} requests run")
        added_rows = [(SHARED, i, source) for u, i, source in rows if u == deleted]
        with ThreadPoolExecutor(len(others) + 2 * len(added_rows)) as pool:
            again = [pool.submit(complete, url, row[0], row[2]) for row, _ in others]
            wait(again, return_when=FIRST_COMPLETED)  # the store changes while the rest are still decoding
            in_flight = sum(not f.done() for f in again)
            delete_status = httpx.delete(f"{url}/v1/prefixes/{deleted}", headers=headers, timeout=60).status_code
            add_status = httpx.put(f"{url}/v1/prefixes/{SHARED}", headers=headers, timeout=60,
                                   content=(work / "shared" / "prefix.safetensors").read_bytes()).status_code
            added = [pool.submit(complete, url, SHARED, source) for _, _, source in added_rows]
            gone = [pool.submit(complete, url, deleted, source) for _, _, source in added_rows]
            again, added, gone = [f.result() for f in again], [f.result() for f in added], [f.result() for f in gone]
    log("serving: decoding every served row alone")
    alone_first = [alone(u, source) for u, _, source in rows]
    alone_added = [alone(SHARED, source) for _, _, source in added_rows]
    return {
        "mixed": {"requests": len(rows), "clients": len(rows),
                  "ok": sum(status == 200 for status, _ in first),
                  "equal_alone": sum(status == 200 and text == a for (status, text), a in zip(first, alone_first)),
                  "equal_heatmap": sum(status == 200 and text == outputs[(u, u)][i].strip()
                                       for (status, text), (u, i, _) in zip(first, rows)),
                  "rows": [{"user": u, "entry": tests[u][i].meta["eid"], "served": text, "alone": a}
                           for (u, i, _), (_, text), a in zip(rows, first, alone_first)]},
        "churn": {"deleted": deleted, "added": SHARED, "others": len(others), "in_flight_at_delete": in_flight,
                  "delete_status": delete_status, "add_status": add_status,
                  "unchanged": sum(answer == before and answer[0] == 200 for answer, (_, before) in zip(again, others)),
                  "added_requests": len(added), "added_equal_alone": sum(
                      status == 200 and text == a for (status, text), a in zip(added, alone_added)),
                  "deleted_requests": len(gone), "deleted_statuses": sorted({status for status, _ in gone}),
                  "added_rows": [{"entry": tests[deleted][i].meta["eid"], "served": text, "alone": a}
                                 for (_, i, _), (_, text), a in zip(added_rows, added, alone_added)]},
    }
