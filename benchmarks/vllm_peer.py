"""The vLLM CPU peer for serve_mixed.py: plain vLLM (no prefixes) on the same token ids, in vLLM's own venv.

    .venv-vllm/bin/python benchmarks/vllm_peer.py JOB.json      # started by serve_mixed.py

JOB: {"model_dir", "seqs": [[ids]], "new_tokens"}. The peer loads vLLM once, then serves commands
from stdin, one JSON line each, so that serve_mixed.py can interleave vLLM's runs with its own on a
shared machine: {"cmd": "batch"} decodes all rows at once, {"cmd": "one", "i": i} row i alone,
{"cmd": "quit"}. Each answer is one stdout line starting with `@@peer ` (vLLM logs around it):
the wall seconds of the `generate` call, its CPU seconds (this process, vLLM's engine core and its
worker: every process vLLM uses) and the greedy tokens. serve_mixed.py sets the threads (OMP_NUM_THREADS=1
for one core; vLLM's own defaults for the whole machine); the entry point must sit under __main__.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

TAG = "@@peer "


def answer(obj):
    sys.stdout.write(TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(job_path: str):
    job = json.loads(Path(job_path).read_text())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    llm = LLM(model=job["model_dir"], dtype="bfloat16", max_model_len=512, max_num_seqs=len(job["seqs"]), seed=0,
              skip_tokenizer_init=True)
    params = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], min_tokens=job["new_tokens"],
                            ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=s) for s in job["seqs"]]

    import psutil

    def cpu_seconds() -> float:
        procs = [psutil.Process()] + psutil.Process().children(recursive=True)
        return sum(sum(p.cpu_times()[:2]) for p in procs if p.is_running())

    def run(batch):
        t, c = time.perf_counter(), cpu_seconds()
        outs = llm.generate(batch, params, use_tqdm=False)
        return {"wall": time.perf_counter() - t, "cpu": cpu_seconds() - c,
                "tokens": [list(o.outputs[0].token_ids) for o in outs]}

    run(prompts[:2])  # warm-up
    answer({"ready": True, "startup_s": time.perf_counter() - started})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        answer(run(prompts) if cmd["cmd"] == "batch" else run([prompts[cmd["i"]]]))


if __name__ == "__main__":
    main(sys.argv[1])
