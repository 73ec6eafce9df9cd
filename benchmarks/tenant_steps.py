"""A beam tenant beside a greedy tenant, in the engine itself, timed in CPU seconds (no HTTP, no wall clock).

serve_load.py's beam phase measures the same thing by wall clock through a server, where a loaded machine
moves the figures a lot. Here the clock is the process CPU time of the engine's steps: a greedy tenant's
requests arrive by Poisson at `--rate` per CPU second for `--seconds` (max_tokens uniform in 8-128,
end-of-text ignored, an E2E MR as the prompt, no prefix) and its latency is the CPU time of the steps from
arrival to its last token. Three conditions, one after the other on one engine configuration:

  alone            the greedy tenant alone
  beside           beside another tenant's 2 closed-loop beam-5 requests (same max_tokens range)
  beside_no_share  the same, with the per-step tenant share off (`tenant_step_rows` above max_batch: the
                   beam tenant decodes all its rows at every step, as before the share)

    python benchmarks/tenant_steps.py --json

Keys of `--json`: `p99_ratio` and `p50_ratio` (beside / alone), `p99_ratio_no_share`, `p50_ratio_no_share`,
and per condition: requests, p50/p99 latency (CPU s), steps, mean running rows, rows held back.
"""
from __future__ import annotations

import json
import random
import time

import torch

from common import at_least, benchmark_parser


def condition(model, tokenizer, prompts, beam_clients: int, step_rows: int, seconds: float, rate: float) -> dict:
    from prefixtune.engine import Engine, Request

    rng, beam_rng = random.Random(0), random.Random(1)
    arrivals, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t > seconds:
            break
        arrivals.append(t)
    if not arrivals:  # else an IndexError at the percentiles
        raise SystemExit(f"error: no greedy request arrives in --seconds {seconds:g} at --rate {rate:g}; "
                         f"give more of either")
    engine = Engine(model, tokenizer, max_batch=32, max_len=512, tenant_step_rows=step_rows)

    def greedy():
        return Request(rng.choice(prompts), max_tokens=rng.randint(8, 128), ignore_eos=True, tenant="greedy")

    def beam():
        return Request(beam_rng.choice(prompts), max_tokens=beam_rng.randint(8, 128), beams=5, ignore_eos=True,
                       tenant="beam")

    for _ in range(beam_clients):
        engine.add_request(beam())
    clock, arrived, latency, steps, running = 0.0, {}, {}, 0, 0
    while len(latency) < len(arrivals):
        while arrivals and len(arrived) < len(arrivals) and arrivals[len(arrived)] <= clock:
            r = greedy()
            arrived[r.request_id] = arrivals[len(arrived)]
            engine.add_request(r)
        if not engine.has_work():  # idle until the next arrival
            clock = arrivals[len(arrived)]
            continue
        began = time.process_time()
        events = engine.step()
        clock += time.process_time() - began
        steps, running = steps + 1, running + engine.num_running
        for e in events:
            if e.finished and e.request_id in arrived:
                latency[e.request_id] = clock - arrived[e.request_id]
            elif e.finished:
                engine.add_request(beam())  # the beam tenant's client sends its next request
    values = sorted(latency.values())
    pct = lambda q: values[max(0, -(-q * len(values) // 100) - 1)]  # noqa: E731  (nearest rank)
    return {"requests": len(values), "latency_p50_cpu_s": round(pct(50), 3), "latency_p99_cpu_s": round(pct(99), 3),
            "steps": steps, "mean_running": round(running / max(steps, 1), 1),
            "rows_held_back": engine.scheduler.held_back}


def main():
    parser = benchmark_parser(__doc__, threads=1)
    parser.add_argument("--seconds", type=at_least(0, float, exclusive=True), default=40, help="CPU seconds of greedy arrivals per condition")
    parser.add_argument("--rate", type=at_least(0, float, exclusive=True), default=0.8, help="greedy requests per CPU second (~2 rows alone)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()  # what ran, for the JSON
    from prefixtune.models import load_base_model
    from serve_mixed import e2e_inputs

    model, tokenizer = load_base_model(args.model)
    sources, inputs = e2e_inputs(50, args.data_dir)
    prompts = [tokenizer(s)["input_ids"] for s in sources]
    out = {}
    for name, clients, step_rows in (("alone", 0, 4), ("beside", 2, 4), ("beside_no_share", 2, 10**9)):
        out[name] = condition(model, tokenizer, prompts, clients, step_rows, args.seconds, args.rate)
        print(name, out[name], flush=True)
    ratio = lambda a, q: round(out[a][f"latency_{q}_cpu_s"] / out["alone"][f"latency_{q}_cpu_s"], 3)  # noqa: E731
    summary = {"p99_ratio": ratio("beside", "p99"), "p50_ratio": ratio("beside", "p50"),
               "p99_ratio_no_share": ratio("beside_no_share", "p99"), "p50_ratio_no_share": ratio("beside_no_share", "p50"),
               **out, "seconds": args.seconds, "rate": args.rate, "threads": args.threads, "model": args.model,
               "inputs": inputs}
    print(f"greedy p99 beside a beam tenant / alone: {summary['p99_ratio']} with the step share, "
          f"{summary['p99_ratio_no_share']} without (p50: {summary['p50_ratio']}, {summary['p50_ratio_no_share']})")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
