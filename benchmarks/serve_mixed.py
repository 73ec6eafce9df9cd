"""Serving many prefixes from one frozen model: mixed batches against the alternatives, in one run.

32 requests over 32 distinct prefixes (the embedded SmolLM2-135M, E2E test MRs, 40 new tokens each,
end-of-text ignored so every request decodes the same length), timed as
  * mixed batch        one `PrefixBank.generate_ids` call, every row with its own prefix
  * single prefix      the same 32 rows in one batch, all with one prefix
  * no prefix          the same 32 rows in one batch, no prefix (the cost of a prefix)
  * sequential         the same code, one request at a time
  * PEFT               peft's PrefixTuningConfig models, 32 adapters, one request at a time with generate
  * server             the 32 requests sent at once to the HTTP server (4 tenants), decoded by its batcher
  * engine             `prefixtune.engine.Engine` (continuous batching, bf16 where the CPU has it), the 32
                       requests with their 32 prefixes at once; `engine_fast` the same with exact=False
                       (in bf16 the same step since issue 26: exactness no longer costs there);
                       `engine_sequential` one request at a time
  * vLLM CPU           plain vLLM (no prefixes) in its own venv (`.venv-vllm` in the repo root, or
                       --vllm-python / $PREFIXTUNE_VLLM_PYTHON), the same token ids: one batch of 32 after
                       each engine run, and --vllm-sequential requests one at a time in the same slots
                       (wall time; CPU time of every vLLM process for the batch); left out (keys null,
                       `vllm_error` says why) without such a venv
  * whole machine      then `--two-core-rounds` batch runs of the engine given every core: `Replicas`, one
                       engine per core on one torch thread each, over one copy of the weights
                       (engine/replicas.py; `engine_2cores`), and one engine with torch threads = cores
                       (`engine_one_2threads`, for comparison), each round followed by one batch of a
                       second vLLM peer left to its own CPU thread settings
The batch runs repeat `--rounds` times; the one-at-a-time requests are spread over the same rounds, so every
configuration samples the same stretches of a shared machine. Times are wall-clock means; tokens/s counts
generated tokens. `cpu_ratio_vs_vllm_cpu`: the engine's tokens per CPU-second over vLLM's (counting every
process each side uses); `ratio_vs_vllm_cpu_2cores`: wall-clock tokens/s, both sides given every core
(the engine as replicas; `engine_2cores_equals_engine`: its rows' tokens against the one engine's).
`fraction_of_bf16_peak`: the engine's tokens/s x 2 x (body + LM-head parameters), over a
bf16 matmul peak measured in the same run (prompt work not counted). `--json` prints one JSON object as the
last line.

    python benchmarks/serve_mixed.py --json | tee benchmarks/results/serve_mixed_cpu.txt
    python benchmarks/serve_mixed.py --json --no-peft --no-server --no-previous --rounds 1   # the engine against vLLM
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

# OpenMP threads wait for each other passively: on a shared machine libgomp's default spinning makes
# the engine's 2 threads hold both cores while one waits for the other (measured: 15 against 69 tokens/s
# with 2 threads beside two busy processes). Set before torch loads; vLLM's peer keeps its own default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from common import HERE, at_least, benchmark_parser
from train_throughput import body_params, matmul_peak
from prefixtune.bank import PrefixBank
from prefixtune.engine import Engine, Replicas, Request
from prefixtune.generation import DecodingConfig
from prefixtune.prefix_file import load_prefix_bytes, prefix_to_bytes
from prefixtune.models import load_base_model, model_spec
from prefixtune.prefix import PrefixConfig, build_prefix_encoder

SYNTHETIC = ["name : The Eagle | Type : coffee shop | food : Japanese | price : less than £20 | area : riverside",
             "name : Zizzi | Type : pub | food : English | customer rating : average | family friendly : yes",
             "name : Aromi | Type : restaurant | food : Chinese | area : city centre | near : Raja Indian Cuisine",
             "name : The Mill | Type : pub | food : French | price : high | area : riverside | near : Café Rouge"]


def e2e_inputs(n: int, data_dir: str) -> tuple[list[str], str]:
    root = Path(data_dir)
    if (root / "e2e" / "testset_w_refs.csv").is_file():
        from prefixtune.data.e2e import load_e2e

        records = load_e2e("test", root)
        return [r.source for r in records[:n]], f"E2E test MRs ({root / 'e2e'})"
    return [SYNTHETIC[i % len(SYNTHETIC)] + f" | near : Place {i}" for i in range(n)], "synthetic E2E-like MRs"


def make_prefixes(model, tokenizer, spec, n: int, length: int) -> list[bytes]:
    out = []
    for i in range(n):
        enc = build_prefix_encoder(model, tokenizer, spec, PrefixConfig(prefix_len=length), seed=1000 + i)
        with torch.no_grad():
            out.append(prefix_to_bytes(enc(), spec, "smollm2-135m"))
    return out


class Timer:
    """Wall and CPU time and generated tokens, in samples: one batch run, or one slot of one-at-a-time requests.
    Throughput is the median over samples, so a stretch of heavy load on a shared machine moves it little."""

    def __init__(self):
        self.samples: list[list[float]] = []  # [wall, cpu, tokens]

    def new_sample(self):
        self.samples.append([0.0, 0.0, 0])

    def __call__(self, fn, tokens=lambda out: sum(len(o) for o in out)):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        sample = self.samples[-1]
        sample[0] += time.perf_counter() - w
        sample[1] += time.process_time() - c
        sample[2] += tokens(out)
        return out

    def tps(self, cpu=False) -> float:
        return statistics.median(t / (c if cpu else w) for w, c, t in self.samples if t)

    def total(self, i: int) -> float:
        return sum(x[i] for x in self.samples)


def peft_setup(model_name: str, n: int, length: int):
    from peft import PrefixTuningConfig, get_peft_model

    base, _ = load_base_model(model_name)
    config = PrefixTuningConfig(num_virtual_tokens=length, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    peft_model = get_peft_model(base, config, adapter_name="a0")
    for i in range(1, n):
        peft_model.add_adapter(f"a{i}", config)
    peft_model.eval()
    return peft_model


def peft_one(peft_model, tokenizer, seq: list[int], adapter: str, new_tokens: int) -> list[int]:
    peft_model.set_adapter(adapter)
    ids = torch.tensor([seq])
    with torch.no_grad():
        out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def hf_reference(model_name: str, tokenizer, seqs: list[list[int]], new_tokens: int) -> dict:
    """Plain transformers `generate` on a separate copy of the model, no prefix: one batch against one at a time."""
    from prefixtune.generation import left_pad

    hf, _ = load_base_model(model_name)

    def gen(ids, mask):
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return out.shape[0] * (out.shape[1] - ids.shape[1])

    ids, mask = left_pad(seqs, tokenizer.pad_token_id, hf.device)
    gen(ids[:2], mask[:2])
    start = time.perf_counter()
    batch_tokens = gen(ids, mask)
    batch_s = time.perf_counter() - start
    start, seq_tokens = time.perf_counter(), 0
    for s in seqs:
        x = torch.tensor([s])
        seq_tokens += gen(x, torch.ones_like(x))
    seq_s = time.perf_counter() - start
    return {"hf_batch_tokens_per_s": batch_tokens / batch_s, "hf_sequential_tokens_per_s": seq_tokens / seq_s,
            "hf_ratio_batch_vs_sequential": (batch_tokens / batch_s) / (seq_tokens / seq_s)}


def server_run(model, tokenizer, blobs: list[bytes], texts: list[str], new_tokens: int, tenants: int = 4):
    """The same requests through HTTP, all at once (continuous batching: batches = engine steps).
    Returns (seconds, tokens, batches)."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from prefixtune.serve import BackgroundServer, KeyRing, ServeSettings, create_app

    keys = [(f"bench-key-{t}", f"tenant{t}") for t in range(tenants)]
    with tempfile.TemporaryDirectory() as store:
        settings = ServeSettings(store_dir=store, max_batch_size=len(texts), request_timeout_s=600)
        app = create_app(model, tokenizer, settings, KeyRing(keys))
        with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=600) as http:
            for i, blob in enumerate(blobs):
                key = keys[i % tenants][0]
                r = http.put(f"/v1/prefixes/p{i}", content=blob, headers={"Authorization": f"Bearer {key}"})
                r.raise_for_status()

            def ask(i):
                body = {"model": f"p{i}", "prompt": texts[i], "max_tokens": new_tokens, "stop": [],
                        "ignore_eos": True}
                r = http.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {keys[i % tenants][0]}"})
                r.raise_for_status()
                return r.json()["usage"]["completion_tokens"]

            start = time.perf_counter()
            with ThreadPoolExecutor(len(texts)) as pool:
                tokens = sum(pool.map(ask, range(len(texts))))
            seconds = time.perf_counter() - start
            batches = int(app.state.metrics.value("prefixtune_batches_total"))
    return seconds, tokens, batches


def default_vllm_python() -> str:
    return os.environ.get("PREFIXTUNE_VLLM_PYTHON") or str(HERE.parent / ".venv-vllm" / "bin" / "python")


class VLLMPeer:
    """Plain vLLM on the same token ids, in its own venv: a subprocess (benchmarks/vllm_peer.py) that loads
    the model once and then decodes on request, so its runs interleave with ours."""

    def __init__(self, python: str, model_name: str, seqs: list[list[int]], new_tokens: int, threads: int = 1):
        import subprocess
        import tempfile

        if not Path(python).is_file():
            raise FileNotFoundError(f"no vLLM venv: {python} (make vllm, or --vllm-python)")
        self.work = tempfile.TemporaryDirectory()
        job = Path(self.work.name) / "job.json"
        job.write_text(json.dumps({"model_dir": str(vllm_model_dir(model_name)), "seqs": seqs,
                                   "new_tokens": new_tokens}))
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                   OMP_NUM_THREADS="1")
        env.pop("OMP_WAIT_POLICY", None)  # ours (above); vLLM runs as its docs advise
        if threads > 1:  # the whole machine: vLLM's own thread settings (VLLM_CPU_OMP_THREADS_BIND=auto)
            env.pop("OMP_NUM_THREADS")
        self.log = open(Path(self.work.name) / "vllm.log", "w")
        from prefixtune.serve.server import popen_tied_to_parent  # no vLLM left running if this run is killed

        self.proc = popen_tied_to_parent([python, str(HERE / "vllm_peer.py"), str(job)], env=env, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        self.startup_s = self._read()["startup_s"]
        self._settle()
        self.batch_walls, self.batch_cpus, self.sequential_walls, self.tokens = [], [], [], None
        self.batch_tail_cpus = []  # CPU-seconds its processes spin after answering, until idle

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@peer "):
                return json.loads(line[len("@@peer "):])
        self.log.flush()
        tail = (Path(self.work.name) / "vllm.log").read_text()[-1500:]
        raise RuntimeError(f"vLLM exited {self.proc.wait()}: {tail}")

    def _ask(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        out["tail_cpu"] = self._settle()
        return out

    def _settle(self, limit_s: float = 5.0) -> float:
        """vLLM keeps about a core busy for a while after it answers (measured: 0.46 CPU-seconds in the
        0.5 s after a batch, then ~0.03 a second): wait until its processes are idle, so that the run
        after it does not share the machine with it. Returns the CPU-seconds they spent meanwhile."""
        import psutil

        def cpu_seconds():
            procs = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True)
            return sum(sum(p.cpu_times()[:2]) for p in procs if p.is_running())

        deadline, first = time.monotonic() + limit_s, cpu_seconds()
        last = first
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = cpu_seconds()
            if now - last < 0.02:
                break
            last = now
        return last - first

    def batch(self):
        out = self._ask({"cmd": "batch"})
        self.batch_walls.append(out["wall"])
        self.batch_cpus.append(out["cpu"])
        self.batch_tail_cpus.append(out["tail_cpu"])
        self.tokens = out["tokens"]

    def one(self, i: int):
        self.sequential_walls.append(self._ask({"cmd": "one", "i": i})["wall"])

    def close(self):
        try:
            self._ask({"cmd": "quit"}) if self.proc.poll() is None else None
        except (RuntimeError, BrokenPipeError, ValueError):
            pass
        self.proc.wait(timeout=120)
        self.log.close()
        self.work.cleanup()


def vllm_model_dir(model_name: str) -> Path:
    """A HF folder of the model in bf16 for vLLM, written once under the prefixtune cache."""
    import shutil
    import tempfile

    from prefixtune.models import cache_dir

    if (Path(model_name) / "config.json").is_file():
        return Path(model_name)
    out = cache_dir() / "vllm" / f"{model_name.replace('/', '--')}-bfloat16"
    if not (out / "config.json").is_file():
        model, tokenizer = load_base_model(model_name, dtype=torch.bfloat16)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None):
    ap = benchmark_parser(__doc__, threads=1, threads_help="torch threads (1: steady on a shared CPU; 0: PyTorch's "
                                                                      "default)")
    ap.add_argument("--requests", type=at_least(1), default=32)
    ap.add_argument("--new-tokens", type=at_least(1), default=40)
    ap.add_argument("--prefix-len", type=at_least(1), default=10)
    ap.add_argument("--rounds", type=at_least(1), default=5, help="batch runs per configuration")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--no-server", action="store_true")
    ap.add_argument("--no-previous", action="store_true",
                    help="leave out today's single-prefix and no-prefix batches (the mixed batch and one at a time stay: "
                         "mixed_equals_sequential and the engine's references)")
    ap.add_argument("--no-engine", action="store_true", help="leave out prefixtune.engine (and vLLM)")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--vllm-python", default=default_vllm_python(),
                    help="python of a venv with vllm-cpu (default: .venv-vllm in the repo root, or $PREFIXTUNE_VLLM_PYTHON)")
    ap.add_argument("--vllm-sequential", type=at_least(0), default=8, help="one-at-a-time vLLM requests")
    ap.add_argument("--two-core-rounds", type=at_least(0), default=3,
                    help="batch runs of the engine (2 threads) and vLLM (its defaults) given the whole machine (0: off)")
    ap.add_argument("--hf-reference", action="store_true",
                    help="also time plain transformers generate (no prefix), one batch against one at a time")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()  # what ran (and what the two-core rounds restore)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' notes on PEFT's cache arguments
    began = time.perf_counter()
    load_before = os.getloadavg()

    model, tokenizer = load_base_model(args.model)
    spec = model_spec(model)
    bank = PrefixBank(model, tokenizer)
    n = args.requests
    blobs = make_prefixes(model, tokenizer, spec, n, args.prefix_len)
    for i, blob in enumerate(blobs):  # through the validating path, as an upload would go
        bank.add(f"p{i}", load_prefix_bytes(blob, spec, f"p{i}"))
    texts, source = e2e_inputs(n, args.data_dir)
    seqs = [bank.encode(t, "p0") for t in texts]
    config = DecodingConfig(max_new_tokens=args.new_tokens, stop_at_newline=False, ignore_eos=True)
    mixed_ids, single_ids, none_ids = [f"p{i}" for i in range(n)], ["p0"] * n, [None] * n

    peft_model, peft_error = None, None
    if not args.no_peft:
        try:
            peft_model = peft_setup(args.model, n, args.prefix_len)
            peft_one(peft_model, tokenizer, seqs[0], "a0", 2)  # warm-up
        except Exception as e:  # report, and time what works
            peft_error = f"{type(e).__name__}: {e}"
            peft_model = None

    vllm, vllm_error = None, None
    if not args.no_engine and not args.no_vllm:
        try:  # started first: its ~75 s start then does not overlap our runs
            vllm = VLLMPeer(args.vllm_python, args.model, seqs, args.new_tokens)
            print(f"vLLM ready at {time.perf_counter() - began:.0f} s (startup {vllm.startup_s:.0f} s)", file=sys.stderr)
        except Exception as e:  # report the keys as absent, and why
            vllm, vllm_error = None, f"{type(e).__name__}: {str(e)[-500:]}"
    engines, peak = {}, None
    if not args.no_engine:
        peak = matmul_peak(torch.bfloat16)[0]  # per wall-clock second
        engines = {"engine": Engine(model, tokenizer, max_batch=n, max_len=512),
                   "engine_fast": Engine(model, tokenizer, max_batch=n, max_len=512, exact=False)}

    def engine_requests(rows):
        return [Request(seqs[i], prefix=bank.get(mixed_ids[i]), max_tokens=args.new_tokens, ignore_eos=True)
                for i in rows]

    def engine_tokens(outputs):
        return [o.choices[0].token_ids for o in outputs]

    # warm-up (kernels, allocator), then interleaved rounds
    bank.generate_ids(seqs[:8], mixed_ids[:8], DecodingConfig(max_new_tokens=4, stop_at_newline=False,
                                                              ignore_eos=True))
    for engine in engines.values():
        engine.generate(engine_requests(range(min(8, n))))
    timers = {k: Timer() for k in ("mixed", "single", "none", "sequential", "peft", *engines,
                                   *(["engine_sequential"] if engines else []))}
    engine_out, engine_fast_out, engine_sequential_out, engine_2cores_out = None, None, [None] * n, None
    mixed_out, sequential_out, peft_lengths = None, [None] * n, []
    # each batch run is followed by the next few one-at-a-time requests, so all configurations share the
    # same stretches of time on a shared machine
    batches = [("mixed", mixed_ids)] + ([] if args.no_previous else [("single", single_ids), ("none", none_ids)])
    per_slot = -(-n // (len(batches) * args.rounds))
    pending = list(range(n))
    for r in range(args.rounds):
        for key, ids in batches:
            timers[key].new_sample()
            out = timers[key](lambda: bank.generate_ids(seqs, ids, config))
            if key == "mixed":
                mixed_out = out
                for name, engine in engines.items():
                    timers[name].new_sample()
                    got = timers[name](lambda: engine_tokens(engine.generate(engine_requests(range(n)))))
                    engine_out, engine_fast_out = (got, engine_fast_out) if name == "engine" else (engine_out, got)
                if vllm is not None:
                    vllm.batch()
            slot, pending = pending[:per_slot], pending[per_slot:]
            if not slot:
                continue
            timers["sequential"].new_sample()
            timers["peft"].new_sample()
            if engines:
                timers["engine_sequential"].new_sample()
            for i in slot:
                sequential_out[i] = timers["sequential"](
                    lambda: bank.generate_ids([seqs[i]], [mixed_ids[i]], config)[0], len)
                if engines:
                    engine_sequential_out[i] = timers["engine_sequential"](
                        lambda: engine_tokens(engines["engine"].generate(engine_requests([i])))[0], len)
                if vllm is not None and len(vllm.sequential_walls) < args.vllm_sequential:
                    vllm.one(i)
                if peft_model is not None:
                    out = timers["peft"](lambda: peft_one(peft_model, tokenizer, seqs[i], f"a{i}", args.new_tokens), len)
                    peft_lengths.append(len(out))
        print(f"round {r + 1}/{args.rounds} done at {time.perf_counter() - began:.0f} s", file=sys.stderr)

    server = None
    if not args.no_server:
        seconds, tokens, batches = server_run(model, tokenizer, blobs, texts, args.new_tokens)
        server = {"seconds": seconds, "tokens": tokens, "batches": batches}

    reference = hf_reference(args.model, tokenizer, seqs, args.new_tokens) if args.hf_reference else {}

    generated = n * args.new_tokens
    if vllm is not None:
        vllm.close()
        vllm = {"tps": statistics.median(generated / w for w in vllm.batch_walls), "startup_s": vllm.startup_s,
                "cpu_tps": statistics.median(generated / c for c in vllm.batch_cpus),
                # the same, counting also the CPU its processes spin after answering, until idle
                "cpu_tps_with_tail": statistics.median(generated / (c + tail) for c, tail in
                                                       zip(vllm.batch_cpus, vllm.batch_tail_cpus)),
                "sequential_tps": statistics.median(args.new_tokens / w for w in vllm.sequential_walls),
                "samples": len(vllm.batch_walls), "sequential_samples": len(vllm.sequential_walls)}
        if args.two_core_rounds:  # both sides given both cores, batch runs interleaved
            try:
                peer = VLLMPeer(args.vllm_python, args.model, seqs, args.new_tokens, threads=os.cpu_count())
            except Exception as e:
                vllm_error = f"two cores: {type(e).__name__}: {str(e)[-500:]}"
            else:
                torch.set_num_threads(os.cpu_count())
                # one engine per core, one torch thread each, sharing the weights (engine/replicas.py)
                replicas = Replicas(model, tokenizer, replicas=os.cpu_count(), max_batch=n, max_len=512)
                replicas.generate(engine_requests(range(min(8, n))))  # warm-up
                timers["engine_2cores"], timers["engine_one_2threads"] = Timer(), Timer()
                for _ in range(args.two_core_rounds):
                    timers["engine_2cores"].new_sample()
                    engine_2cores_out = timers["engine_2cores"](
                        lambda: engine_tokens(replicas.generate(engine_requests(range(n)))))
                    timers["engine_one_2threads"].new_sample()
                    timers["engine_one_2threads"](lambda: engine_tokens(engines["engine"].generate(engine_requests(range(n)))))
                    peer.batch()
                replicas.close()
                torch.set_num_threads(args.threads)
                peer.close()
                vllm["tps_2cores"] = statistics.median(generated / w for w in peer.batch_walls)

    t = timers
    equal = sum(a == b for a, b in zip(mixed_out, sequential_out))

    def over(a, b, cpu=False, minus_one=False):  # a's tokens/s over b's; None where one was not run
        if not (t[a].samples and t[b].samples):
            return None
        r = t[a].tps(cpu) / t[b].tps(cpu)
        return 100 * (r - 1) if minus_one else r

    result = {
        "ratio_vs_sequential": t["mixed"].tps() / t["sequential"].tps(),
        "ratio_vs_peft": t["mixed"].tps() / t["peft"].tps() if peft_model is not None else None,
        "ratio_vs_single_prefix_batch": over("mixed", "single"),
        "prefix_overhead_pct": over("none", "mixed", minus_one=True),
        "single_prefix_overhead_pct": over("none", "single", minus_one=True),
        "cpu_ratio_vs_sequential": t["mixed"].tps(True) / t["sequential"].tps(True),
        "cpu_ratio_vs_peft": t["mixed"].tps(True) / t["peft"].tps(True) if peft_model is not None else None,
        "cpu_ratio_vs_single_prefix_batch": over("mixed", "single", True),
        "cpu_prefix_overhead_pct": over("none", "mixed", True, minus_one=True),
        "tokens_per_s": {k: round(v.tps(), 2) for k, v in t.items() if v.total(2)},
        "samples": {k: len(v.samples) for k, v in t.items() if v.total(2)},
        "server_tokens_per_s": server and server["tokens"] / server["seconds"],
        "server_batches": server and server["batches"],
        "server_ratio_vs_sequential": server and (server["tokens"] / server["seconds"]) / t["sequential"].tps(),
        **reference,
        "mixed_equals_sequential": f"{equal}/{n}",
        **(engine_keys(model, t, n, peak, vllm, vllm_error, engine_out, engine_fast_out, engine_sequential_out,
                       mixed_out, engine_2cores_out) if engines else {}),
        "peft_tokens_per_request": sorted(set(peft_lengths)),
        "peft_error": peft_error,
        "requests": n, "distinct_prefixes": n, "new_tokens": args.new_tokens, "prefix_len": args.prefix_len,
        "rounds": args.rounds, "threads": args.threads, "model": args.model, "inputs": source,
        "mean_input_tokens": round(sum(map(len, seqs)) / n, 1),
        "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "loadavg_before": round(load_before[0], 2), "loadavg_after": round(os.getloadavg()[0], 2),
        "torch": torch.__version__, "seconds": round(time.perf_counter() - began, 1),
    }
    result = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}

    rows = [(f"mixed batch ({n} prefixes)", t["mixed"]), ("single-prefix batch", t["single"]),
            ("no-prefix batch", t["none"]), ("one at a time (same code)", t["sequential"])]
    if peft_model is not None:
        rows.append(("PEFT, one adapter at a time", t["peft"]))
    if engines:
        rows += [("engine, mixed batch", t["engine"]), ("engine exact=False, mixed", t["engine_fast"]),
                 ("engine, one at a time", t["engine_sequential"])]
        if "engine_2cores" in t:
            rows.append((f"engine, mixed, {os.cpu_count()} replicas x 1 thread", t["engine_2cores"]))
            rows.append((f"engine, mixed, one engine x {os.cpu_count()} threads", t["engine_one_2threads"]))
    print(f"\n{n} requests x {args.new_tokens} new tokens, {n} distinct prefixes of {args.prefix_len} tokens, "
          f"{args.model}, {args.threads} thread(s), {args.rounds} rounds; inputs: {source}, "
          f"mean {result['mean_input_tokens']} tokens")
    print("throughput: median over samples (a batch run, or a slot of one-at-a-time requests); "
          "times: totals over all samples")
    print(f"{'configuration':<30} {'samples':>7} {'tokens':>7} {'wall s':>8} {'cpu s':>8} {'tokens/s':>9} "
          f"{'cpu tok/s':>9} {'mixed is':>9}")
    for label, timer in rows:
        if not timer.samples:
            continue
        print(f"{label:<30} {len(timer.samples):>7} {int(timer.total(2)):>7} {timer.total(0):>8.2f} "
              f"{timer.total(1):>8.2f} {timer.tps():>9.1f} {timer.tps(True):>9.1f} {t['mixed'].tps() / timer.tps():>8.2f}x")
    if server:
        label = f"HTTP server, {n} at once"
        print(f"{label:<30} {1:>7} {server['tokens']:>7} {server['seconds']:>8.2f} {'':>8} "
              f"{server['tokens'] / server['seconds']:>9.1f} {'':>9} {t['mixed'].tps() / (server['tokens'] / server['seconds']):>8.2f}x"
              f"   ({server['batches']} decoding batch(es), 4 tenants)")
    print(f"\ntargets: vs one-at-a-time {result['ratio_vs_sequential']:.2f}x (>= 8), "
          f"vs single-prefix batch {result['ratio_vs_single_prefix_batch']} (>= 0.90), "
          f"prefix overhead {result['prefix_overhead_pct']}% (<= 5); vs PEFT "
          + (f"{result['ratio_vs_peft']:.2f}x" if result["ratio_vs_peft"] else "not run"))
    print(f"mixed batch == one at a time, token for token: {result['mixed_equals_sequential']}; "
          f"load average {result['loadavg_before']} -> {result['loadavg_after']}; {result['seconds']} s")
    if reference:
        print(f"reference, plain transformers generate without a prefix: one batch "
              f"{reference['hf_batch_tokens_per_s']:.1f} tokens/s, one at a time "
              f"{reference['hf_sequential_tokens_per_s']:.1f} tokens/s: {reference['hf_ratio_batch_vs_sequential']:.2f}x")
    if peft_error:
        print(f"PEFT failed: {peft_error}")
    if engines:
        print(f"engine ({engines['engine'].path}, {str(engines['engine'].dtype).replace('torch.', '')}): "
              f"{result['ratio_vs_previous_engine']:.2f}x today's mixed batch "
              f"(exact=False {result['ratio_vs_previous_engine_fast']:.2f}x), one at a time "
              f"{result['engine_ratio_vs_sequential_previous']:.2f}x today's; "
              f"{result['fraction_of_bf16_peak']:.3f} of the bf16 matmul peak "
              f"({result['matmul_peak_gflops_bf16']:.0f} GFLOP/s); engine batch == engine one at a time: "
              f"{result['engine_equals_sequential']}; == today's fp32 path: {result['engine_equals_previous_fp32']}")
        if vllm:
            print(f"vLLM CPU (no prefixes): batch {vllm['tps']:.1f} tokens/s, one at a time "
                  f"{vllm['sequential_tps']:.1f}; ratio_vs_vllm_cpu {result['ratio_vs_vllm_cpu']:.2f}, "
                  f"one at a time {result['ratio_vs_vllm_cpu_sequential']:.2f}; per CPU-second (every process): "
                  f"cpu_ratio_vs_vllm_cpu {result['cpu_ratio_vs_vllm_cpu']:.2f} (target >= 1.5; "
                  f"{result['cpu_ratio_vs_vllm_cpu_with_tail']:.2f} counting vLLM's spin after each answer); whole machine: "
                  f"ratio_vs_vllm_cpu_2cores {result['ratio_vs_vllm_cpu_2cores']} (target >= 1.0; the engine as "
                  f"{result['engine_2cores_replicas']} replicas x 1 thread, rows == one engine's: "
                  f"{result['engine_2cores_equals_engine']}; one engine x {os.cpu_count()} threads: "
                  f"{result['engine_one_2threads_tokens_per_s']} tokens/s)")
        else:
            print(f"vLLM CPU: not run ({vllm_error})")
    if args.json:
        print(json.dumps(result))
    return result


def engine_keys(model, t, n, peak, vllm, vllm_error, engine_out, engine_fast_out, engine_sequential_out,
                mixed_out, engine_2cores_out) -> dict:
    per_token = 2 * (body_params(model) + model.get_output_embeddings().weight.numel())
    same = lambda a, b: f"{sum(x == y for x, y in zip(a, b))}/{n}"
    tps = t["engine"].tps()
    return {
        "ratio_vs_previous_engine": tps / t["mixed"].tps(),
        "ratio_vs_previous_engine_fast": t["engine_fast"].tps() / t["mixed"].tps(),
        "cpu_ratio_vs_previous_engine": t["engine"].tps(True) / t["mixed"].tps(True),
        "engine_ratio_vs_sequential_previous": t["engine_sequential"].tps() / t["sequential"].tps(),
        "fraction_of_bf16_peak": tps * per_token / peak,
        "fraction_of_bf16_peak_fast": t["engine_fast"].tps() * per_token / peak,
        "matmul_peak_gflops_bf16": peak / 1e9,
        "ratio_vs_vllm_cpu": vllm and tps / vllm["tps"],
        # tokens per CPU-second, every process each side uses (vLLM: its frontend, engine core and worker)
        "cpu_ratio_vs_vllm_cpu": vllm and t["engine"].tps(True) / vllm["cpu_tps"],
        "engine_tokens_per_cpu_s": t["engine"].tps(True),
        "vllm_tokens_per_cpu_s": vllm and vllm["cpu_tps"],
        # vLLM's CPU counted until its processes are idle again after each batch (its engine core spins)
        "cpu_ratio_vs_vllm_cpu_with_tail": vllm and t["engine"].tps(True) / vllm["cpu_tps_with_tail"],
        # wall clock with the whole machine given to each side: the engine as one replica per core
        "ratio_vs_vllm_cpu_2cores": vllm and "tps_2cores" in vllm and t["engine_2cores"].tps() / vllm["tps_2cores"] or None,
        "engine_2cores_tokens_per_s": "engine_2cores" in t and t["engine_2cores"].tps() or None,
        "vllm_2cores_tokens_per_s": vllm and vllm.get("tps_2cores"),
        "engine_2cores_replicas": "engine_2cores" in t and os.cpu_count() or None,
        "engine_one_2threads_tokens_per_s": "engine_one_2threads" in t and t["engine_one_2threads"].tps() or None,
        "engine_2cores_equals_engine": engine_2cores_out and same(engine_2cores_out, engine_out),
        "ratio_vs_vllm_cpu_fast": vllm and t["engine_fast"].tps() / vllm["tps"],
        "ratio_vs_vllm_cpu_sequential": vllm and t["engine_sequential"].tps() / vllm["sequential_tps"],
        "vllm_tokens_per_s": vllm and vllm["tps"],
        "vllm_sequential_tokens_per_s": vllm and vllm["sequential_tps"],
        "vllm_startup_s": vllm and vllm["startup_s"],
        "vllm_samples": vllm and [vllm["samples"], vllm["sequential_samples"]],
        "vllm_error": vllm_error,
        "engine_equals_sequential": same(engine_out, engine_sequential_out),
        "engine_fast_equals_engine": same(engine_fast_out, engine_out),
        "engine_equals_previous_fp32": same(engine_out, mixed_out),
    }


if __name__ == "__main__":
    main()
