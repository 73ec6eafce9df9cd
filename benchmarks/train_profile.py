"""Where a training step's time goes: a breakdown by phase and torch.profiler's operator table.

The step is what `train.py` runs (the method's loss under bf16 autocast with the frozen weights'
bf16 copies, backward, clipping, fused AdamW), on SmolLM2-135M and 200 E2E pairs in length-grouped
batches of 8. Phases are timed with the step split at its natural seams:

  data       collating a batch of encoded pairs
  reparam    the prefix module: P' -> MLP -> P (prefix methods only)
  forward    the frozen model's forward with the prefix, and the loss
  backward   loss.backward()
  optimizer  gradient clipping, AdamW step, zero_grad

With --threads 2 or more the step is train.py's at that thread count: the batch's halves on two Python
threads (data_parallel.ThreadedHalves), so reparam, forward and backward are one phase, "halves"
(their wall time, both threads at once); --no-halves times one pass on all the threads instead.

    python benchmarks/train_profile.py [--method prefix] [--steps 20] [--rows 25] [--threads 1] [--no-halves] [--json]

Keys of `--json` (the phase breakdown, after the tables): `method`, `steps`, `batch_size`, `bf16`, `threads`,
`halves`, `tokens_per_s`, `ms_per_step`, `phases_ms_per_step` (phase -> ms per step).
"""
from __future__ import annotations

import contextlib
import json
import time

import torch

from common import at_least, benchmark_parser
from prefixtune.methods import METHODS, build_method


def main():
    parser = benchmark_parser(__doc__, threads=1)
    parser.add_argument("--method", default="prefix", choices=sorted(METHODS))
    parser.add_argument("--steps", type=at_least(1), default=20, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--batch-size", type=at_least(1), default=8)
    parser.add_argument("--rows", type=at_least(1), default=25, help="operator table rows")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-halves", action="store_true", help="with 2+ threads: one pass, not two threaded halves")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from prefixtune.data import load_task, sample_pairs, training_pairs
    from prefixtune.data.collate import Collator, encode_pair, length_grouped_batches
    from prefixtune.models import load_base_model, model_spec
    from prefixtune.data_parallel import ThreadedHalves
    from prefixtune.precision import FrozenBf16Step
    from prefixtune.train import TrainConfig, use_bf16

    torch.manual_seed(args.seed)
    model, tokenizer = load_base_model(args.model)
    spec = model_spec(model)
    config = TrainConfig(method=args.method, batch_size=args.batch_size, precision=args.precision)
    method = build_method(args.method, model, tokenizer, spec, config)
    pairs = sample_pairs(training_pairs(load_task("e2e", "train", args.data_dir)), 200, args.seed)
    examples = [encode_pair(tokenizer, spec.family, s, t) for s, t in pairs]
    collate = Collator(tokenizer.pad_token_id, spec.family)
    lengths = [len(e["input_ids"]) for e in examples]
    batches = length_grouped_batches(lengths, args.batch_size, seed=args.seed)
    bf16 = use_bf16(args.precision, torch.device("cpu"))
    module = method.module
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)  # as train.py makes it on a CPU
    module.train()
    halves = None if args.no_halves or torch.get_num_threads() < 2 else ThreadedHalves(torch.get_num_threads())
    phases = dict.fromkeys(["data", "reparam", "forward", "backward", "optimizer"] if halves is None else
                           ["data", "halves", "optimizer"], 0.0)
    tokens = 0

    def loss_of(batch):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return method.loss(module, batch)

    def step(i, timed):
        nonlocal tokens
        t0 = time.perf_counter()
        batch = collate([examples[j] for j in batches[i % len(batches)]])
        t1 = time.perf_counter()
        if halves is not None:  # as train.py with 2+ threads
            with frozen_step:
                halves.step(loss_of, batch, params)
            t2 = t3 = t4 = time.perf_counter()
        else:
            t2, t3, t4 = one_pass(batch)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        if timed:
            seams = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4) if halves is None else (t1 - t0, t4 - t1, t5 - t4)
            for name, dt in zip(phases, seams):
                phases[name] += dt
            tokens += int(batch["attention_mask"].sum())

    def one_pass(batch):
        with frozen_step:
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                if hasattr(module, "embeddings") or hasattr(module, "prefix"):  # time the reparameterisation apart
                    with torch.autocast("cpu", enabled=False):  # as PrefixMethod.loss computes P
                        p = module()
                    t2 = time.perf_counter()
                    loss, _ = method.loss(lambda: p, batch)
                else:
                    t2 = time.perf_counter()
                    loss, _ = method.loss(module, batch)
            t3 = time.perf_counter()
            loss.backward()
        return t2, t3, time.perf_counter()

    frozen_step = FrozenBf16Step(*method.loss_modules()) if bf16 else contextlib.nullcontext()  # as train.py
    for i in range(3):
        step(i, False)
    for i in range(args.steps):
        step(i, True)
    total = sum(phases.values())
    print(f"# {args.method}, {args.steps} steps of {args.batch_size}, bf16={bf16}, "
          f"threads={torch.get_num_threads()}, halves={halves is not None}: {tokens / total:.1f} tokens/s, {1000 * total / args.steps:.0f} ms/step")
    print("| phase | ms/step | share |\n| --- | ---: | ---: |")
    for name, dt in phases.items():
        print(f"| {name} | {1000 * dt / args.steps:.1f} | {dt / total:.1%} |")

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(min(args.steps, 5)):
            step(i, False)
    print()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                                             max_name_column_width=40, max_shapes_column_width=60))
    if args.json:  # the phase breakdown as one line, as every benchmark's --json ends
        print(json.dumps({"method": args.method, "steps": args.steps, "batch_size": args.batch_size, "bf16": bf16,
                          "threads": torch.get_num_threads(), "halves": halves is not None,
                          "tokens_per_s": tokens / total, "ms_per_step": 1000 * total / args.steps,
                          "phases_ms_per_step": {k: 1000 * v / args.steps for k, v in phases.items()}}))


if __name__ == "__main__":
    main()
