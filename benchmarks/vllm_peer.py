"""The vLLM CPU peer for serve_mixed.py: plain vLLM (no prefixes) on the same token ids, in vLLM's own venv.

    python benchmarks/vllm_peer.py JOB.json OUT.json     # run by serve_mixed.py with .venv-vllm/bin/python

JOB: {"model_dir", "seqs": [[ids]], "new_tokens", "rounds", "sequential"}; OUT: wall seconds per
batch round and per one-at-a-time request, and the greedy tokens of the last batch.
vLLM's CPU worker binds one core (OMP_NUM_THREADS=1); its entry point must sit under __main__.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(job_path: str, out_path: str):
    job = json.loads(Path(job_path).read_text())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    llm = LLM(model=job["model_dir"], dtype="bfloat16", max_model_len=512, max_num_seqs=len(job["seqs"]), seed=0,
              skip_tokenizer_init=True)
    startup = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], min_tokens=job["new_tokens"],
                            ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=s) for s in job["seqs"]]

    def run(batch):
        t = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - t, [list(o.outputs[0].token_ids) for o in outs]

    run(prompts[:2])  # warm-up
    batch_walls, tokens = [], None
    for _ in range(job["rounds"]):
        wall, tokens = run(prompts)
        batch_walls.append(wall)
    sequential_walls = [run([p])[0] for p in prompts[: job["sequential"]]]
    Path(out_path).write_text(json.dumps({"startup_s": startup, "batch_walls": batch_walls,
                                          "sequential_walls": sequential_walls, "tokens": tokens}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
