"""Open-loop load on the HTTP server: Poisson arrivals over many stored prefixes; a beam tenant beside a greedy one.

Setup: `--prefixes` (1,000) random prefixes of `--prefix-len` (10) virtual tokens, spread over `--tenants` (100),
written straight into a store directory (the store's own layout), so each server starts on them.
Each request: a random tenant and one of its prefixes, an E2E MR as the prompt, `max_tokens` uniform in
[8, 128], end-of-text ignored (so it decodes exactly max_tokens), streamed, so that the client sees its
first token. Every server is `prefixtune serve` in a subprocess with `--threads` torch threads.

  1. saturation   closed loop, 2 x max_batch_size clients sending back to back for `--seconds`: the
                  requests/s is the saturation rate (throughput at full load)
  2. open loop    Poisson arrivals for `--seconds` at 0.4, 0.7 and 1.0 x that saturation rate; then the
                  stragglers are awaited. Latency counts from the arrival to the last byte; TTFT to the first
                  token's chunk.
  3. beam tenant  one tenant's greedy requests, Poisson at `--beam-phase-fraction` (0.4) x saturation, alone;
                  then the same arrivals while another tenant's `--beam-clients` (2) clients send beam-5
                  requests back to back (`num_beams` 5, the same max_tokens range). The beam rows decode
                  in the same engine steps as the greedy ones (no row waits for a beam search); while
                  the greedy tenant runs, the beam tenant's groups take turns (its step share,
                  docs/engine.md), so its ten rows cost the greedy rows' steps what five do.
                  `--beam-rounds` (2) alternations of the two, each condition's requests pooled, so that a
                  change in the machine's load during the phase weighs on both alike.
  4. memory       a server over `--rss-prefixes` (10,000) stored prefixes with `--rss-resident` (64) resident,
                  256 requests over 256 distinct prefixes: its RSS right after start and its peak (VmHWM)

Top-level keys, measured in one run:
  greedy_p99_ratio_with_beam_tenant  the greedy tenant's p99 latency with the beam tenant / alone (target <= 1.5)
  rss_mb_after_start                 RSS of the memory run's server once it answers /health, MB
  rss_mb_10k_prefixes                peak RSS of the memory run, MB
(The window scheduler, which `p99_ratio_vs_window` and `throughput_ratio_vs_window` compared against, is gone.)

    nice -n 10 python benchmarks/serve_load.py --json | tee benchmarks/results/serve_load_cpu.txt
    python benchmarks/serve_load.py --phases beam,memory --beam-rate 0.144 --json   # the targets' phases only
    python benchmarks/serve_load.py --quick             # a smoke run: small sizes, a few seconds per phase
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import HERE, at_least, benchmark_parser

REPO = HERE.parent
RATE_FRACTIONS = (0.4, 0.7, 1.0)
PHASES = ("saturation", "rates", "beam", "memory")
QUICK = {"prefixes": 50, "tenants": 5, "seconds": 8, "max_tokens": 24, "clients": 16, "resident": 16,
         "rss_prefixes": 500, "rss_resident": 16}  # --quick's defaults; options given explicitly still win


# -- the store ---------------------------------------------------------------------------------------
def random_prefixes(model_name: str, n: int, prefix_len: int, seed: int = 0) -> list[bytes]:
    """`n` prefix files of random tensors at the scale of an untrained prefix encoder's output (the
    values change nothing in the timing; the shape, bytes and validation are those of a real prefix)."""
    import torch

    from prefixtune.models import load_base_model, model_spec
    from prefixtune.prefix import PrefixConfig, build_prefix_encoder, group_width, groups_of
    from prefixtune.prefix_file import prefix_to_bytes

    model, tokenizer = load_base_model(model_name)
    spec = model_spec(model)
    with torch.no_grad():
        scale = {g: t.std().item() for g, t in build_prefix_encoder(model, tokenizer, spec,
                                                                    PrefixConfig(prefix_len=prefix_len))().items()}
    gen = torch.Generator().manual_seed(seed)
    blobs = [prefix_to_bytes({g: torch.randn(prefix_len, group_width(spec, layers), generator=gen) * scale[g]
                              for g, layers in groups_of(spec).items()}, spec, Path(model_name).name)
             for _ in range(n)]
    del model
    return blobs


def write_store(store: Path, blobs: list[bytes], n: int, tenants: int) -> dict[str, list[str]]:
    """`n` prefixes (blobs reused in turn) over `tenants` tenants: tenant -> prefix names. Plain writes: a
    scratch store (the server's uploads are atomic; 10,000 fsyncs would only slow the setup)."""
    from prefixtune.serve.tenants import tenant_dir_name

    owned: dict[str, list[str]] = {f"tenant{t:03d}": [] for t in range(tenants)}
    names = list(owned)
    for i in range(n):
        tenant = names[i % tenants]
        name = f"p{i:05d}"
        directory = store / tenant_dir_name(tenant)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{name}.safetensors").write_bytes(blobs[i % len(blobs)])
        owned[tenant].append(name)
    return owned


def keys_of(tenants) -> dict[str, str]:
    return {f"bench-{t}": t for t in tenants}  # key -> tenant (the keys file's JSON form)


# -- the server ----------------------------------------------------------------------------------------
def server_env(threads: int) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": str(threads)}


class Server:
    """`prefixtune serve` in a subprocess, up when /health answers 200; stopped (terminate, then kill) on exit."""

    def __init__(self, args, store: Path, keys_file: Path, resident: int, work: Path):
        from prefixtune.serve.server import free_port, popen_tied_to_parent

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "prefixtune.cli", "serve", "--model", args.model, "--store", str(store),
               "--port", str(self.port), "--keys-file", str(keys_file), "--threads", str(args.threads),
               "--log-level", "warning", "--max-queue", "100000", "--request-timeout", "3600",
               "--max-prefixes", "100000", "--tenant-quota-mb", "100000", "--max-resident-prefixes", str(resident)]
        self.log = open(work / f"server-{self.port}.log", "w")
        self.proc = popen_tied_to_parent(cmd, env=server_env(args.threads), stdout=self.log,
                                         stderr=subprocess.STDOUT, cwd=REPO)  # no orphan if this run is killed

    def __enter__(self):
        import httpx

        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                self.log.flush()
                raise RuntimeError(f"the server exited ({self.proc.returncode}): "
                                   f"{Path(self.log.name).read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not come up in 600 s")
            time.sleep(0.5)

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(60)
        self.log.close()

    def memory_mb(self) -> dict:
        """Peak (VmHWM) and current (VmRSS) resident memory of the server process, MB."""
        status = Path(f"/proc/{self.proc.pid}/status")
        if status.is_file():
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            return {k: int(fields[v].split()[0]) / 1024 for k, v in (("peak", "VmHWM"), ("now", "VmRSS"))}
        import psutil  # no /proc (not Linux): the current RSS only

        now = psutil.Process(self.proc.pid).memory_info().rss / 2**20
        return {"peak": None, "now": now}

    def metric(self, name: str) -> float | None:
        import httpx

        for line in httpx.get(self.url + "/metrics", timeout=30).text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return None


# -- the load ------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    arrival: float             # when it was due (open loop) or sent (closed loop), perf_counter seconds
    first: float | None = None
    end: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class Workload:
    owned: dict[str, list[str]]
    keys: dict[str, str]       # tenant -> key
    prompts: list[str]
    min_tokens: int
    max_tokens: int
    extra: dict = field(default_factory=dict)   # more body fields (num_beams)
    rng: random.Random = field(default_factory=random.Random)

    def phase(self, seed: int) -> "Workload":
        """The same request sequence for a phase whatever ran before it."""
        self.rng = random.Random(seed)
        return self

    def next_request(self) -> tuple[str, dict]:
        tenant = self.rng.choice(list(self.owned))
        body = {"model": self.rng.choice(self.owned[tenant]), "prompt": self.rng.choice(self.prompts),
                "max_tokens": self.rng.randint(self.min_tokens, self.max_tokens), "stop": [], "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}, **self.extra}
        return self.keys[tenant], body


async def one_request(http, key: str, body: dict, outcome: Outcome):
    try:
        async with http.stream("POST", "/v1/completions", json=body,
                               headers={"Authorization": f"Bearer {key}"}) as r:
            if r.status_code != 200:
                outcome.error = f"HTTP {r.status_code}"
                await r.aread()
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    outcome.error = chunk["error"].get("code") or "stream error"
                    return
                if chunk.get("choices") and outcome.first is None:
                    outcome.first = time.perf_counter()
                if chunk.get("usage"):
                    outcome.tokens = chunk["usage"]["completion_tokens"]
        outcome.end = time.perf_counter()
    except Exception as e:  # a benchmark records failures, it does not stop on them
        outcome.error = type(e).__name__


def client(url: str):
    import httpx

    return httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(3600), limits=httpx.Limits(max_connections=None))


async def closed_loop(url: str, work: Workload, clients: int, seconds: float) -> list[Outcome]:
    outcomes: list[Outcome] = []
    async with client(url) as http:
        stop_at = time.perf_counter() + seconds

        async def user():
            while time.perf_counter() < stop_at:
                key, body = work.next_request()
                outcomes.append(Outcome(time.perf_counter()))
                await one_request(http, key, body, outcomes[-1])

        await asyncio.gather(*(user() for _ in range(clients)))
    return outcomes


async def open_loop(url: str, work: Workload, arrivals: list[float]) -> list[Outcome]:
    """Requests due at `arrivals` (seconds from now), whatever the server's pace (open loop)."""
    async with client(url) as http:
        start = time.perf_counter()
        tasks, outcomes = [], []
        for due in arrivals:
            await asyncio.sleep(max(0.0, start + due - time.perf_counter()))
            key, body = work.next_request()
            outcomes.append(Outcome(start + due))
            tasks.append(asyncio.create_task(one_request(http, key, body, outcomes[-1])))
        await asyncio.gather(*tasks)
    return outcomes


def poisson_arrivals(rate: float, seconds: float, seed: int) -> list[float]:
    rng, t, out = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t > seconds:
            return out
        out.append(t)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[max(0, math.ceil(q / 100 * len(values)) - 1)]  # nearest rank


def summarize(outcomes: list[Outcome]) -> dict:
    done = [o for o in outcomes if o.error is None and o.end is not None]
    span = (max(o.end for o in done) - min(o.arrival for o in outcomes)) if done else None
    latency = [o.end - o.arrival for o in done]
    ttft = [o.first - o.arrival for o in done if o.first is not None]
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.error is not None:
            errors[o.error] = errors.get(o.error, 0) + 1
    r3 = lambda x: None if x is None else round(x, 3)  # noqa: E731
    return {"requests": len(outcomes), "completed": len(done), "errors": errors,
            "requests_per_s": r3(len(done) / span) if span else None,
            "tokens_per_s": r3(sum(o.tokens for o in done) / span) if span else None,
            "latency_p50_s": r3(percentile(latency, 50)), "latency_p99_s": r3(percentile(latency, 99)),
            "ttft_p50_s": r3(percentile(ttft, 50)), "ttft_p99_s": r3(percentile(ttft, 99))}


def warm_up(url: str, work: Workload):
    """Two small requests: the first forward passes of a fresh process are slow, not what is measured."""
    async def go():
        async with client(url) as http:
            for _ in range(2):
                key, body = work.next_request()
                await one_request(http, key, dict(body, max_tokens=4), Outcome(time.perf_counter()))
    asyncio.run(go())


# -- the run -------------------------------------------------------------------------------------------
def load_run(args, store: Path, keys_file: Path, work: Workload, work_dir: Path, log) -> dict:
    """Saturation (closed loop), the open-loop rates derived from it, then the beam tenant phase: those of
    `args.phases` (the beam phase needs the saturation rate unless --beam-rate gives its rate)."""
    out = {}
    with Server(args, store, keys_file, args.resident, work_dir) as server:
        warm_up(server.url, work.phase(99))
        if "saturation" in args.phases:
            log(f"closed loop, {args.clients} clients, {args.seconds:g} s")
            saturation = summarize(asyncio.run(closed_loop(server.url, work.phase(100), args.clients, args.seconds)))
            log(f"  {saturation}")
            if not saturation["requests_per_s"]:
                raise RuntimeError(f"no request completed at full load, so no saturation rate: {saturation}; "
                                   f"see the server's log in --work-dir")
            out["saturation"] = saturation
        if "rates" in args.phases:
            rates = [round(f * out["saturation"]["requests_per_s"], 4) for f in RATE_FRACTIONS]
            out["rates"] = []
            for i, (fraction, rate) in enumerate(zip(RATE_FRACTIONS, rates)):
                log(f"open loop at {rate:.3f} req/s ({fraction:g} x saturation)")
                out["rates"].append({"fraction": fraction, "rate": rate,
                                     **summarize(asyncio.run(open_loop(server.url, work.phase(i),
                                                                       poisson_arrivals(rate, args.seconds, seed=i))))})
                log(f"  {out['rates'][-1]}")
        if "beam" in args.phases:
            rate = args.beam_rate or args.beam_phase_fraction * out["saturation"]["requests_per_s"]
            out["beam_tenant"] = beam_tenant_run(args, server.url, work, rate, log)
        out["prefix_cache"] = {k: server.metric(f"prefixtune_prefix_cache_{k}_total")
                               for k in ("hits", "misses", "evictions")}
    return out


def beam_tenant_run(args, url: str, work: Workload, rate: float, log) -> dict:
    """One tenant's greedy requests at `rate`, alone, then the same arrivals beside another tenant's closed
    loop of beam-5 requests."""
    greedy_tenant, beam_tenant = list(work.owned)[:2]
    greedy = Workload({greedy_tenant: work.owned[greedy_tenant]}, work.keys, work.prompts, work.min_tokens,
                      work.max_tokens)
    beams = Workload({beam_tenant: work.owned[beam_tenant]}, work.keys, work.prompts, work.min_tokens,
                     work.max_tokens, extra={"num_beams": 5}).phase(300)
    arrivals = poisson_arrivals(rate, args.seconds, seed=200)

    async def beside_beams():
        stop, outcomes = asyncio.Event(), []
        async with client(url) as http:
            async def user():
                while not stop.is_set():
                    key, body = beams.next_request()
                    outcomes.append(Outcome(time.perf_counter()))
                    await one_request(http, key, body, outcomes[-1])

            users = [asyncio.create_task(user()) for _ in range(args.beam_clients)]
            await asyncio.sleep(1.0)  # the beam rows are running before the first greedy arrival
            greedy_outcomes = await open_loop(url, greedy.phase(200), arrivals)
            stop.set()
            await asyncio.gather(*users)
        return greedy_outcomes, outcomes

    alone, with_beams, beam_outcomes = [], [], []
    for round_ in range(args.beam_rounds):
        log(f"beam tenant phase, round {round_ + 1}: greedy tenant at {rate:.3f} req/s alone, then beside "
            f"{args.beam_clients} clients of beam-5 requests")
        alone += asyncio.run(open_loop(url, greedy.phase(200), arrivals))
        greedy_outcomes, beam_round = asyncio.run(beside_beams())
        with_beams += greedy_outcomes
        beam_outcomes += beam_round
    result = {"rate": round(rate, 4), "rounds": args.beam_rounds, "greedy_alone": summarize(alone),
              "greedy_with_beams": summarize(with_beams), "beam_requests": summarize(beam_outcomes),
              "beam_clients": args.beam_clients}
    log(f"  greedy alone {result['greedy_alone']}")
    log(f"  greedy {result['greedy_with_beams']}\n  beam {result['beam_requests']}")
    return result


def rss_run(args, blobs: list[bytes], prompts: list[str], work_dir: Path, log) -> dict:
    store = work_dir / "store-rss"
    owned = write_store(store, blobs, args.rss_prefixes, args.tenants)
    keys_file = work_dir / "keys-rss.json"
    keys_file.write_text(json.dumps(keys_of(owned)))
    keys = {t: k for k, t in keys_of(owned).items()}
    log(f"memory: {args.rss_prefixes} stored prefixes, {args.rss_resident} resident")
    started = time.perf_counter()
    with Server(args, store, keys_file, args.rss_resident, work_dir) as server:
        up_s = time.perf_counter() - started
        after_start = server.memory_mb()
        everything = [(t, n) for t, names in owned.items() for n in names]
        picked = random.Random(1).sample(everything, min(256, len(everything)))
        rng = random.Random(2)

        async def drive():
            async with client(server.url) as http:
                gate = asyncio.Semaphore(32)

                async def ask(tenant, name):
                    async with gate:
                        await one_request(http, keys[tenant], {"model": name, "prompt": rng.choice(prompts),
                                                               "max_tokens": 8, "stop": [], "ignore_eos": True,
                                                               "stream": True}, Outcome(time.perf_counter()))
                await asyncio.gather(*(ask(t, n) for t, n in picked))

        asyncio.run(drive())
        memory = server.memory_mb()
        out = {"stored": server.metric("prefixtune_prefixes_stored"),
               "resident": server.metric("prefixtune_prefixes_resident"),
               "misses": server.metric("prefixtune_prefix_cache_misses_total"),
               "evictions": server.metric("prefixtune_prefix_cache_evictions_total"),
               "requests": len(picked), "startup_s": round(up_s, 1),
               "rss_mb_after_start": round(after_start["now"], 1),
               "rss_mb_peak": memory["peak"] and round(memory["peak"], 1), "rss_mb_now": round(memory["now"], 1)}
    shutil.rmtree(store, ignore_errors=True)
    log(f"  {out}")
    return out


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def main(argv=None):
    ap = benchmark_parser(__doc__, threads=1, threads_help="torch threads of each server (1: steady on a shared CPU)",
                          min_threads=1)
    ap.add_argument("--prefixes", type=at_least(1), default=1000)
    ap.add_argument("--tenants", type=at_least(1), default=100)
    ap.add_argument("--prefix-len", type=at_least(1), default=10)
    ap.add_argument("--seconds", type=at_least(0, float, exclusive=True), default=60,
                    help="length of each closed-loop and open-loop phase")
    ap.add_argument("--min-tokens", type=at_least(1), default=8)
    ap.add_argument("--max-tokens", type=at_least(1), default=128)
    ap.add_argument("--clients", type=at_least(1), default=64, help="closed-loop clients (2 x the default max batch size)")
    ap.add_argument("--resident", type=at_least(1), default=256, help="--max-resident-prefixes of the load runs")
    ap.add_argument("--rss-prefixes", type=at_least(1), default=10_000)
    ap.add_argument("--rss-resident", type=at_least(1), default=64)
    ap.add_argument("--beam-clients", type=at_least(1), default=2, help="the beam tenant's closed-loop clients (beam 5)")
    ap.add_argument("--beam-rounds", type=at_least(1), default=2, help="alternations of alone / beside the beam tenant")
    ap.add_argument("--beam-phase-fraction", type=at_least(0, float, exclusive=True), default=0.4,
                    help="the greedy tenant's rate in the beam phase, x saturation")
    ap.add_argument("--beam-rate", type=at_least(0, float, exclusive=True), default=None,
                    help="the greedy tenant's rate in the beam phase, req/s (default: --beam-phase-fraction x the "
                         "saturation rate, which then needs the saturation phase)")
    ap.add_argument("--phases", default=",".join(PHASES),
                    help=f"the phases to run, comma-separated, of {','.join(PHASES)} (rates need saturation)")
    ap.add_argument("--work-dir", default=None, help="scratch space for the stores (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 50 prefixes, 5 tenants, 8 s phases, "
                                                         "8-24 tokens, 500 prefixes for the memory run")
    args = ap.parse_args(argv)
    if args.quick:
        ap.set_defaults(**QUICK)
        args = ap.parse_args(argv)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        ap.error(f"--phases: unknown {sorted(unknown)}; choose from {','.join(PHASES)}")
    if ("rates" in args.phases or ("beam" in args.phases and not args.beam_rate)) and "saturation" not in args.phases:
        ap.error("--phases: rates, and beam without --beam-rate, need the saturation phase")
    if args.min_tokens > args.max_tokens:
        ap.error(f"--min-tokens {args.min_tokens} is above --max-tokens {args.max_tokens}")
    if args.tenants > args.prefixes:  # a tenant with no prefix could not send a request
        ap.error(f"--tenants {args.tenants} is above --prefixes {args.prefixes}: every tenant needs a prefix")
    if "beam" in args.phases and args.tenants < 2:
        ap.error("the beam phase needs --tenants 2 or more (a greedy tenant and a beam tenant)")
    began = time.perf_counter()
    load_before = os.getloadavg()
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print
    sys.path.insert(0, str(HERE))
    from serve_mixed import e2e_inputs

    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="serve-load-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        prompts, source = e2e_inputs(200, args.data_dir)
        log(f"making {args.prefixes} prefixes of {args.prefix_len} tokens for {args.model}")
        blobs = random_prefixes(args.model, args.prefixes, args.prefix_len)
        store = work_dir / "store"
        owned = write_store(store, blobs, args.prefixes, args.tenants)
        keys_file = work_dir / "keys.json"
        keys_file.write_text(json.dumps(keys_of(owned)))
        keys = {t: k for k, t in keys_of(owned).items()}

        result = {}
        if set(args.phases) - {"memory"}:
            result = load_run(args, store, keys_file,
                              Workload(owned, keys, prompts, args.min_tokens, args.max_tokens), work_dir, log)
        shutil.rmtree(store, ignore_errors=True)
        memory = rss_run(args, blobs, prompts, work_dir, log) if "memory" in args.phases else {}
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)

    beam = result.get("beam_tenant")
    summary = {
        "greedy_p99_ratio_with_beam_tenant": beam and ratio(beam["greedy_with_beams"]["latency_p99_s"],
                                                            beam["greedy_alone"]["latency_p99_s"]),
        "greedy_p50_ratio_with_beam_tenant": beam and ratio(beam["greedy_with_beams"]["latency_p50_s"],
                                                            beam["greedy_alone"]["latency_p50_s"]),
        "rss_mb_after_start": memory.get("rss_mb_after_start"),
        "rss_mb_10k_prefixes": (memory["rss_mb_peak"] or memory["rss_mb_now"]) if memory else None,
        "saturation_requests_per_s": result.get("saturation", {}).get("requests_per_s"), "phases": args.phases,
        "rate_fractions": list(RATE_FRACTIONS), "result": result, "memory": memory,
        "prefixes": args.prefixes, "tenants": args.tenants, "prefix_len": args.prefix_len,
        "max_tokens": [args.min_tokens, args.max_tokens], "seconds": args.seconds, "clients": args.clients,
        "resident": args.resident, "rss_prefixes": args.rss_prefixes, "rss_resident": args.rss_resident,
        "threads": args.threads, "model": args.model, "inputs": source, "quick": args.quick,
        "cpu": platform.machine(), "cpus": os.cpu_count(), "loadavg_before": round(load_before[0], 2),
        "loadavg_after": round(os.getloadavg()[0], 2), "wall_s": round(time.perf_counter() - began, 1),
    }
    report(summary)
    if args.json:
        print(json.dumps(summary))


def report(s: dict):
    print(f"\n{s['prefixes']} stored prefixes of {s['prefix_len']} tokens over {s['tenants']} tenants, {s['model']}, "
          f"{s['threads']} thread(s); max_tokens {s['max_tokens'][0]}-{s['max_tokens'][1]} (end-of-text ignored), "
          f"streamed; {s['resident']} resident; {s['seconds']:g} s per phase; inputs: {s['inputs']}")
    print(f"{'load':<36} {'done':>5} {'err':>4} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7} "
          f"{'ttft50':>7} {'ttft99':>7}")
    result, beam = s["result"], s["result"].get("beam_tenant")
    rows = [(f"closed, {s['clients']} clients", result["saturation"])] if "saturation" in result else []
    rows += [(f"{r['rate']:.3f}/s ({r['fraction']:g}x)", r) for r in result.get("rates", [])]
    if beam:
        rows += [(f"greedy tenant {beam['rate']:.3f}/s, alone", beam["greedy_alone"]),
                 ("greedy tenant, beside beam tenant", beam["greedy_with_beams"]),
                 (f"beam tenant ({beam['beam_clients']} clients, beam 5)", beam["beam_requests"])]
    for label, r in rows:
        cells = [r["requests_per_s"], r["tokens_per_s"], r["latency_p50_s"], r["latency_p99_s"],
                 r["ttft_p50_s"], r["ttft_p99_s"]]
        print(f"{label:<36} {r['completed']:>5} {sum(r['errors'].values()):>4} "
              + " ".join(f"{'-' if c is None else f'{c:.2f}':>7}" for c in cells))
    if result:
        print(f"prefix cache: {result['prefix_cache']}")
    m = s["memory"]
    if m:
        print(f"memory: {m['stored']:.0f} stored, {m['resident']:.0f} resident after {m['requests']} requests over as many "
              f"prefixes ({m['misses']:.0f} misses, {m['evictions']:.0f} evictions); start {m['startup_s']} s; RSS "
              f"{m['rss_mb_after_start']} MB after start, peak {m['rss_mb_peak']} MB")
    print(f"phases: {','.join(s['phases'])}")
    print(f"targets: greedy_p99_ratio_with_beam_tenant {s['greedy_p99_ratio_with_beam_tenant']} (target <= 1.5; "
          f"p50 ratio {s['greedy_p50_ratio_with_beam_tenant']}), "
          f"rss_mb_after_start {s['rss_mb_after_start']}, rss_mb_10k_prefixes {s['rss_mb_10k_prefixes']}")
    print(f"load average {s['loadavg_before']} -> {s['loadavg_after']}; {s['wall_s']} s")


if __name__ == "__main__":
    main()
