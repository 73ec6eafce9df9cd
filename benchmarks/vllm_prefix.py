"""prefixtune prefixes served by vLLM (PrefixtuneConnector) against prefixtune's own decoding and plain vLLM.

32 E2E test MRs, each with its own prefix (distinct real-word initialisations, or --prefix-dir with
trained exports), 40 greedy tokens each (end-of-text ignored, so every row decodes the same length):
  * reference      prefixtune's PrefixBank, one mixed batch, in --dtype (what `prefixtune serve` does)
  * vllm prefix    the same 32 rows in one vLLM batch: [P placeholders] + source, per-prefix cache salt,
                   the connector writing each prefix's K/V into its slots
  * vllm plain     the same 32 sources in one vLLM batch without prefixes (the throughput baseline)
Greedy tokens of `vllm prefix` must equal the reference row for row (`tokens_equal`). The vLLM
batches alternate over --rounds after a warm-up; tokens/s is the median over rounds of generated
tokens / wall time of `LLM.generate` for the whole batch. This script runs under prefixtune's
environment (.venv) and starts the vLLM side once, in vLLM's (.venv-vllm, `make vllm`).

    .venv/bin/python benchmarks/vllm_prefix.py --json | tee benchmarks/results/vllm_prefix_cpu.txt
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHRASES = [
    "table-to-text:", "Describe this restaurant:", "Write one sentence about the venue:", "Restaurant review:",
    "A short description:", "Summarise the attributes:", "In plain English:", "Tell me about this place:",
    "Turn the data into text:", "Facts to prose:", "Here is a sentence:", "The venue in a sentence:",
    "Describe the eatery:", "Food guide entry:", "Dining recommendation:", "A tourist would read:",
    "Local listing:", "Write as a critic:", "Friendly description:", "City guide:", "From the menu card:",
    "An advert for it:", "Pub and coffee shop guide:", "Describe it simply:", "One line review:",
    "Information about the shop:", "The place, described:", "Where to eat:", "A sentence for the website:",
    "Explain the listing:", "Meaning representation to text:", "Natural language version:",
]


def vllm_python() -> str:
    return os.environ.get("PREFIXTUNE_VLLM_PYTHON") or str(HERE.parent / ".venv-vllm" / "bin" / "python")


# ---------------------------------------------------------------------------------------------------
# the vLLM side: `python vllm_prefix.py --vllm-side IN.json OUT.json` under vLLM's environment
# ---------------------------------------------------------------------------------------------------
def vllm_side(job_path: str, out_path: str):
    sys.path.insert(0, str(HERE.parent / "src"))
    job = json.loads(Path(job_path).read_text())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from prefixtune.vllm import PrefixRef, kv_transfer_config, prompt_ids

    started = time.perf_counter()
    llm = LLM(model=job["model_dir"], dtype=job["dtype"], kv_transfer_config=kv_transfer_config(job["store"]),
              enable_prefix_caching=True, max_model_len=job["max_model_len"], max_num_seqs=len(job["rows"]),
              seed=0, skip_tokenizer_init=True, **({"block_size": job["block_size"]} if job["block_size"] else {}))
    startup = time.perf_counter() - started
    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    params = []
    prefixed, plain = [], []
    for row in job["rows"]:
        ref = PrefixRef(**row["ref"])
        prefixed.append(TokensPrompt(prompt_token_ids=prompt_ids(row["source_ids"], ref.length), cache_salt=ref.salt))
        params.append(SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], ignore_eos=True,
                                     extra_args={"kv_transfer_params": ref.params()}))
        plain.append(TokensPrompt(prompt_token_ids=row["source_ids"]))
    plain_params = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], ignore_eos=True)

    import psutil

    def cpu_seconds() -> float:  # this process, vLLM's engine core and its worker
        procs = [psutil.Process()] + psutil.Process().children(recursive=True)
        return sum(sum(p.cpu_times()[:2]) for p in procs if p.is_running())

    def run(prompts, sampling):
        t, c = time.perf_counter(), cpu_seconds()
        outs = llm.generate(prompts, sampling, use_tqdm=False)
        wall = time.perf_counter() - t
        cpus[id(prompts)].append(cpu_seconds() - c)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        return wall, tokens, [o.outputs[0].finish_reason for o in outs]

    cpus = {id(prefixed): [], id(plain): []}
    # The first prefixed batch reads the 32 files from the store (cold); later ones find them resident.
    cold_wall, cold_tokens, _ = run(prefixed, params)
    run(plain, plain_params)  # warm-up of the plain path
    walls = {"prefix": [], "plain": []}
    runs = {"prefix": [cold_tokens], "plain": []}
    for _ in range(job["rounds"]):
        for kind, prompts, sampling in (("plain", plain, plain_params), ("prefix", prefixed, params)):
            wall, toks, reasons = run(prompts, sampling)
            walls[kind].append(wall)
            runs[kind].append(toks)
    Path(out_path).write_text(json.dumps({
        "runs": runs, "walls": walls, "cold_prefix_wall": cold_wall, "startup_s": startup,
        "cpu": {"prefix": cpus[id(prefixed)][1:], "plain": cpus[id(plain)][1:]},  # without cold and warm-up runs
        "block_size": block_size, "finish_reasons": reasons}))


def summary(r: dict) -> str:
    tps, cpu = r["tokens_per_s"], r["tokens_per_cpu_s"]
    return "\n".join([
        f"{r['requests']} requests x {r['new_tokens']} new tokens, {r['distinct_prefixes']} distinct prefixes of "
        f"{r['prefix_len']} tokens ({r['prefixes']}), {r['model']} in {r['dtype']}, vLLM {r['vllm']} block size "
        f"{r['vllm_block_size']}; inputs: {r['inputs']}, mean {r['mean_input_tokens']} tokens",
        f"greedy tokens equal to prefixtune's mixed batch in every vLLM run: {r['tokens_equal']} "
        f"(per run {', '.join(r['tokens_equal_per_run'])}); without prefixes: {r['tokens_equal_without_prefixes']}",
        f"rows identical across vLLM's own runs: prefix {r['rows_identical_across_vllm_runs']['prefix']}, "
        f"plain {r['rows_identical_across_vllm_runs']['plain']}",
        f"vLLM tokens/s (median of {r['rounds']} alternating rounds): prefix {tps['vllm_prefix']}, plain "
        f"{tps['vllm_plain']} -> ratio {r['ratio_vs_vllm_plain']} (target >= 0.9); per CPU second: prefix "
        f"{cpu['vllm_prefix']}, plain {cpu['vllm_plain']} -> ratio {r['cpu_ratio_vs_vllm_plain']}",
        f"first prefixed batch (reads the 32 files): {tps['vllm_prefix_cold']} tokens/s; prefixtune's own mixed batch: "
        f"{tps['prefixtune_mixed_batch']} tokens/s; load average {r['loadavg_before']} -> {r['loadavg_after']}"])


# ---------------------------------------------------------------------------------------------------
# prefixtune's side
# ---------------------------------------------------------------------------------------------------
def main():
    sys.path.insert(0, str(HERE))
    from common import benchmark_parser

    parser = benchmark_parser(__doc__, threads=1)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--prefix-len", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--block-size", type=int, default=0, help="vLLM KV block size (0: vLLM's default)")
    parser.add_argument("--prefix-dir", default=None, help="trained prefix exports (*.safetensors) to use instead")
    args = parser.parse_args()

    import torch

    from prefixtune.bank import PrefixBank
    from prefixtune.data.collate import source_ids
    from prefixtune.generation import DecodingConfig
    from prefixtune.prefix_file import load_prefix, save_prefix
    from prefixtune.models import load_base_model, model_spec
    from prefixtune.prefix import PrefixConfig, build_prefix_encoder
    from prefixtune.serve.tenants import tenant_dir_name
    from prefixtune.vllm.model_dir import hf_model_dir

    t0 = time.time()
    load_before = os.getloadavg()[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model_dir = hf_model_dir(args.model, args.dtype)
    model, tokenizer = load_base_model(args.model, dtype=dtype)
    spec = model_spec(model)
    sys.path.insert(0, str(HERE))
    from serve_mixed import e2e_inputs

    sources, inputs_desc = e2e_inputs(args.requests, args.data_dir)
    work = Path(tempfile.mkdtemp(prefix="vllm-prefix-"))
    store, tenant = work / "store", tenant_dir_name("bench")
    (store / tenant).mkdir(parents=True)
    names = []
    if args.prefix_dir:
        files = sorted(Path(args.prefix_dir).glob("*.safetensors"))
        for i in range(args.requests):
            names.append(f"p{i:02d}")
            (store / tenant / f"{names[-1]}.safetensors").write_bytes(files[i % len(files)].read_bytes())
        origin = f"trained exports from {args.prefix_dir} ({len(files)} files)"
    else:
        # the words are encoded by the fp32 model, as `prefixtune train --init words:...` does
        fp32 = model if dtype == torch.float32 else load_base_model(args.model)[0]
        for i in range(args.requests):
            phrase = PHRASES[i % len(PHRASES)] + ("" if i < len(PHRASES) else f" {i}")
            enc = build_prefix_encoder(fp32, tokenizer, spec, PrefixConfig(prefix_len=args.prefix_len,
                                                                          init=f"words:{phrase}"), seed=1000 + i)
            names.append(f"p{i:02d}")
            with torch.no_grad():
                save_prefix(store / tenant / f"{names[-1]}.safetensors", enc(), spec, args.model)
        del fp32
        origin = "32 distinct real-word initialisations (words:<phrase>)"
    bank = PrefixBank(model, tokenizer)
    for name in names:
        bank.add(name, store / tenant / f"{name}.safetensors")
    seqs = [source_ids(tokenizer, spec.family, s, bank.template_of(n)) for s, n in zip(sources, names)]
    config = DecodingConfig(max_new_tokens=args.new_tokens, stop_at_newline=False, ignore_eos=True)
    t = time.perf_counter()
    with torch.no_grad():
        reference = bank.generate_ids(seqs, names, config)
    ours_wall = time.perf_counter() - t
    with torch.no_grad():  # the same rows without prefixes: how far vLLM's kernels alone move greedy tokens
        reference_plain = bank.generate_ids(seqs, [None] * len(seqs), config)

    rows = []
    for name, seq in zip(names, seqs):
        meta = load_prefix(store / tenant / f"{name}.safetensors").metadata
        rows.append({"source_ids": seq, "ref": {"bank_id": f"{tenant}/{name}", "length": int(meta["prefix_len"]),
                                                "sha256": meta["sha256"]}})
    job = {"model_dir": str(model_dir), "store": str(store), "dtype": args.dtype, "rows": rows,
           "new_tokens": args.new_tokens, "rounds": args.rounds, "block_size": args.block_size,
           "max_model_len": 512}
    (work / "job.json").write_text(json.dumps(job))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([vllm_python(), str(Path(__file__).resolve()), "--vllm-side", str(work / "job.json"),
                           str(work / "out.json")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-6000:])
        raise SystemExit(f"the vLLM side failed (exit {proc.returncode})")
    out = json.loads((work / "out.json").read_text())

    runs = out["runs"]
    # a row counts as equal when every vLLM run of it (cold and each round) decoded the reference tokens
    equal = sum(all(run[i] == reference[i] for run in runs["prefix"]) for i in range(args.requests))
    per_run = [sum(a == b for a, b in zip(run, reference)) for run in runs["prefix"]]
    equal_plain = sum(all(run[i] == reference_plain[i] for run in runs["plain"]) for i in range(args.requests))

    def agreeing(runs_, ref):  # tokens before the first difference, over all rows and runs
        return sum(next((j for j, (a, b) in enumerate(zip(r[i], ref[i])) if a != b), len(ref[i]))
                   for r in runs_ for i in range(len(ref))) / (len(runs_) * sum(len(x) for x in ref))
    stable = {k: sum(len({json.dumps(run[i]) for run in v}) == 1 for i in range(args.requests))
              for k, v in runs.items()}
    changed = sum(a != b for a, b in zip(runs["prefix"][-1], runs["plain"][-1]))
    generated = args.requests * args.new_tokens
    tps = {k: round(statistics.median(generated / w for w in ws), 2) for k, ws in out["walls"].items()}
    cpu_tps = {k: round(statistics.median(generated / c for c in cs), 2) for k, cs in out["cpu"].items()}
    first_diff = next(({"run": r, "row": i, "vllm": run[i], "prefixtune": reference[i]}
                       for r, run in enumerate(runs["prefix"]) for i in range(args.requests)
                       if run[i] != reference[i]), None)
    result = {
        "tokens_equal": f"{equal}/{args.requests}",
        "ratio_vs_vllm_plain": round(tps["prefix"] / tps["plain"], 3),
        "cpu_ratio_vs_vllm_plain": round(cpu_tps["prefix"] / cpu_tps["plain"], 3),
        "tokens_per_cpu_s": {"vllm_prefix": cpu_tps["prefix"], "vllm_plain": cpu_tps["plain"]},
        "tokens_per_s": {"vllm_prefix": tps["prefix"], "vllm_plain": tps["plain"],
                         "vllm_prefix_cold": round(generated / out["cold_prefix_wall"], 2),
                         "prefixtune_mixed_batch": round(generated / ours_wall, 2)},
        "tokens_equal_per_run": [f"{n}/{args.requests}" for n in per_run],
        "tokens_equal_without_prefixes": f"{equal_plain}/{args.requests}",
        "token_agreement_before_first_difference": {"prefix": round(agreeing(runs["prefix"], reference), 4),
                                                    "plain": round(agreeing(runs["plain"], reference_plain), 4)},
        "rows_identical_across_vllm_runs": {k: f"{v}/{args.requests}" for k, v in stable.items()},
        "rows_whose_prefix_changed_the_output": f"{changed}/{args.requests}",
        "first_difference": first_diff,
        "requests": args.requests, "distinct_prefixes": len(set(names)), "prefix_len": args.prefix_len,
        "prefixes": origin, "new_tokens": args.new_tokens, "rounds": args.rounds, "dtype": args.dtype,
        "vllm_block_size": out["block_size"], "prefix_fills_partial_block": args.prefix_len % out["block_size"] != 0,
        "vllm_startup_s": round(out["startup_s"], 1), "model": args.model, "inputs": inputs_desc,
        "mean_input_tokens": round(statistics.mean(len(s) for s in seqs), 1),
        "vllm": subprocess.run([vllm_python(), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                               text=True).stdout.strip(),
        "torch": torch.__version__, "cpu": platform.machine(), "cpus": os.cpu_count(),
        "loadavg_before": round(load_before, 2), "loadavg_after": round(os.getloadavg()[0], 2),
        "seconds": round(time.time() - t0, 1),
    }
    print(summary(result))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--vllm-side":
        vllm_side(sys.argv[2], sys.argv[3])
    else:
        main()
