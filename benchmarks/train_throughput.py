"""Training throughput: prefixtune against PEFT prefix tuning, on the same model, data and steps.

Contestants (each run in its own process, so peak RSS is its own):
  ours       prefixtune's trainer as a user runs it (its defaults: bf16 where the CPU has it,
             target-only logits, length-grouped batches)
  peft       PEFT PrefixTuningConfig(prefix_projection=True) in the plain PyTorch loop PEFT users
             write: fp32, shuffled padded batches, loss masked to the target, full logits
  peft-bf16  the same PEFT loop under the same bf16 autocast as ours

Runs are interleaved (ours, peft, peft-bf16, ours, ...) and the ratios use the mean of each
contestant's rounds. Dev loss is computed the same way for all (fp32, token-mean cross-entropy
over the target tokens of the same dev pairs). Achieved FLOP/s counts the matmuls each
contestant executed (padding included; the backward pass of a frozen model computes input
gradients only, about one forward) and is divided by a matmul peak that each run measures in its
own process just before training (bf16 or fp32, as its matmuls run). Every rate is also given per
second of the process's own CPU time (with one thread: the time it actually ran), which a busy
shared machine disturbs far less than wall-clock seconds.

`--methods finetune,adapter` also times prefixtune's trainer on those methods (their own default rates;
their dev loss is the trainer's own, under bf16), since the studies compare methods on equal budgets.

    python benchmarks/train_throughput.py [--steps 30] [--rounds 2] [--methods finetune,adapter] [--json]
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import at_least, benchmark_parser


def matmul_peak(dtype: torch.dtype, seconds: float = 2.0, n: int = 2048) -> tuple[float, float]:
    """FLOP/s of a large matmul: per wall-clock second and per second of this process's CPU time."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    flops = 2 * n**3 * count
    return flops / (time.perf_counter() - start), flops / (time.process_time() - cpu_start)


def body_params(model) -> int:
    """Parameters every token multiplies through (the transformer body, not the embedding table)."""
    emb = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - emb


def load_data(data_dir, train_size, dev_size, seed):
    from prefixtune.data import load_task, sample_pairs, training_pairs

    train = sample_pairs(training_pairs(load_task("e2e", "train", data_dir)), train_size, seed)
    dev = sample_pairs(training_pairs(load_task("e2e", "dev", data_dir)), dev_size, seed)
    return train, dev


def dev_loss_of(forward_loss, examples, collate, batch_size=16) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            loss, n = forward_loss(collate(examples[i:i + batch_size]))
            total, count = total + loss.item() * n, count + n
    return total / count


def worker_ours(args, model, tokenizer, train_pairs, dev_pairs, method="prefix"):
    from prefixtune.data.collate import Collator, encode_pair
    from prefixtune.prefix_file import load_prefix
    from prefixtune.forward import lm_loss, prefix_kv_from_groups
    from prefixtune.models import model_spec
    from prefixtune.train import TrainConfig, train, use_bf16

    spec = model_spec(model)
    out = Path(args.work_dir) / ("ours" if method == "prefix" else method)
    config = TrainConfig(output_dir=str(out), train_size=None, seed=args.seed, batch_size=args.batch_size,
                         lr=args.lr if method == "prefix" else None, method=method, export=method == "prefix",
                         max_steps=args.steps, eval_every=0, save_every=0, prefix_len=10, mlp_dim=512,
                         init="random", precision=args.precision)
    result = train(config, model, tokenizer, train_pairs, dev_pairs, progress=False, overwrite=True)  # scratch dir
    bf16 = use_bf16(args.precision, torch.device("cpu"))
    cpu_seconds = getattr(result, "train_cpu_seconds", None)
    if method != "prefix":  # other methods: the trainer's own dev loss (bf16 like its training)
        return {"tokens_per_s": result.tokens_per_s, "target_tokens_per_s": result.target_tokens_per_s,
                "dev_loss": result.final_dev_loss, "executed_tokens": result.padded_tokens,
                "head_tokens": result.target_tokens_per_s * result.train_seconds, "bf16": bf16,
                "train_seconds": result.train_seconds, "cpu_seconds": cpu_seconds}
    p = load_prefix(result.prefix_file, spec).p
    dev_examples = [encode_pair(tokenizer, "decoder", s, t) for s, t in dev_pairs]
    collate = Collator(tokenizer.pad_token_id, "decoder")
    dev = dev_loss_of(lambda b: lm_loss(model, spec, b, prefix_kv_from_groups([p] * b["input_ids"].shape[0], spec)),
                      dev_examples, collate)
    return {"tokens_per_s": result.tokens_per_s, "target_tokens_per_s": result.target_tokens_per_s,
            "dev_loss": dev, "executed_tokens": result.padded_tokens,
            "head_tokens": result.target_tokens_per_s * result.train_seconds, "bf16": bf16,
            "train_seconds": result.train_seconds, "cpu_seconds": cpu_seconds}


def peft_batches(examples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """`steps` shuffled batches, a new shuffle each epoch, as many steps as ours takes (its trainer goes on
    into further epochs too): one epoch alone would stop PEFT early (200 rows / 8 = 25 of 30 steps)."""
    rng, batches = random.Random(seed), []
    while len(batches) < steps:
        order = list(range(examples))
        rng.shuffle(order)
        batches += [order[i:i + batch_size] for i in range(0, examples, batch_size)]
    return batches[:steps]


def worker_peft(args, model, tokenizer, train_pairs, dev_pairs, autocast: bool):
    from peft import PrefixTuningConfig, get_peft_model

    from prefixtune.data.collate import encode_pair

    torch.manual_seed(args.seed)
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10,
                                                          prefix_projection=True, encoder_hidden_size=512))
    examples = [encode_pair(tokenizer, "decoder", s, t) for s, t in train_pairs]
    pad = tokenizer.pad_token_id

    def collate(batch):  # right padding, labels masked to the target, as PEFT users write it
        longest = max(len(e["input_ids"]) for e in batch)
        ids = torch.tensor([e["input_ids"] + [pad] * (longest - len(e["input_ids"])) for e in batch])
        mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (longest - len(e["input_ids"])) for e in batch])
        labels = torch.tensor([e["labels"] + [-100] * (longest - len(e["labels"])) for e in batch])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    batches = peft_batches(len(examples), args.batch_size, args.steps, args.seed)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, (args.steps - s) / args.steps))
    peft_model.train()
    tokens = target = executed = 0
    seconds = cpu_seconds = 0.0
    for idx in batches:
        start, cpu_start = time.perf_counter(), time.process_time()
        batch = collate([examples[i] for i in idx])
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = peft_model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        seconds += time.perf_counter() - start
        cpu_seconds += time.process_time() - cpu_start
        tokens += int(batch["attention_mask"].sum())
        target += int((batch["labels"][:, 1:] != -100).sum())
        executed += batch["input_ids"].numel()
    peft_model.eval()
    dev_examples = [encode_pair(tokenizer, "decoder", s, t) for s, t in dev_pairs]

    def forward_loss(batch):
        n = int((batch["labels"][:, 1:] != -100).sum())
        return peft_model(**batch).loss, n

    dev = dev_loss_of(forward_loss, dev_examples, collate)
    return {"tokens_per_s": tokens / seconds, "target_tokens_per_s": target / seconds, "dev_loss": dev,
            "executed_tokens": executed, "head_tokens": executed, "bf16": autocast, "train_seconds": seconds,
            "cpu_seconds": cpu_seconds}


OTHER_METHODS = ("finetune", "adapter")  # prefixtune's trainer on the other methods the studies compare


def run_worker(args):
    torch.manual_seed(args.seed)
    from prefixtune.models import load_base_model

    model, tokenizer = load_base_model(args.model)
    train_pairs, dev_pairs = load_data(args.data_dir, args.train_size, args.dev_size, args.seed)
    from prefixtune.train import use_bf16

    # this run's own matmul peak, in the dtype its matmuls run in, just before it trains: the share of
    # peak compares like with like even when the machine's load changes between runs
    bf16 = args.worker != "peft" and use_bf16(args.precision, torch.device("cpu"))
    peak_flops, peak_flops_cpu = matmul_peak(torch.bfloat16 if bf16 else torch.float32)
    if args.worker == "ours":
        out = worker_ours(args, model, tokenizer, train_pairs, dev_pairs)
    elif args.worker in OTHER_METHODS:
        out = worker_ours(args, model, tokenizer, train_pairs, dev_pairs, method=args.worker)
    else:
        out = worker_peft(args, model, tokenizer, train_pairs, dev_pairs, autocast=args.worker == "peft-bf16")
    out["peak_flops"], out["peak_flops_cpu"] = peak_flops, peak_flops_cpu
    out["tokens_per_cpu_s"] = out["tokens_per_s"] * out["train_seconds"] / out["cpu_seconds"]
    out["body_params"] = body_params(model)
    out["hidden"] = model.config.hidden_size
    out["vocab"] = model.config.vocab_size
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def main():
    parser = benchmark_parser(__doc__, threads_help="torch threads per run (0: PyTorch's default)")
    parser.add_argument("--steps", type=at_least(1), default=30)
    parser.add_argument("--rounds", type=at_least(1), default=2)
    parser.add_argument("--batch-size", type=at_least(1), default=8)
    parser.add_argument("--train-size", type=at_least(1), default=200)
    parser.add_argument("--dev-size", type=at_least(1), default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--work-dir", default="/tmp/prefixtune-bench")
    parser.add_argument("--methods", default="",
                        help="also time prefixtune's trainer on these methods (comma-separated: finetune,adapter)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return run_worker(args)

    others = [m for m in args.methods.split(",") if m]
    if any(m not in OTHER_METHODS for m in others):
        sys.exit(f"error: --methods takes {', '.join(OTHER_METHODS)}; got {args.methods!r}")
    contestants = ["ours", "peft", "peft-bf16", *others]
    runs = {c: [] for c in contestants}
    for round_ in range(args.rounds):
        for c in contestants:
            cmd = [sys.executable, __file__, "--worker", c] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k not in ("worker", "json", "methods") and v is not None]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                sys.exit(f"{c} failed:\n{proc.stderr[-3000:]}")
            runs[c].append(json.loads(line[-1][7:]))
            print(f"round {round_ + 1} {c:9s} {runs[c][-1]['tokens_per_s']:7.1f} tokens/s  "
                  f"{runs[c][-1]['tokens_per_cpu_s']:7.1f} per CPU-s  dev loss {runs[c][-1]['dev_loss']:.4f}",
                  file=sys.stderr)

    def mean(c, key):
        return sum(r[key] for r in runs[c]) / len(runs[c])

    summary = {}
    for c in contestants:
        passes = 3 if c == "finetune" else 2  # fine-tuning's backward also computes weight gradients
        flops = [passes * (2 * r["body_params"] * r["executed_tokens"] + 2 * r["hidden"] * r["vocab"] * r["head_tokens"])
                 for r in runs[c]]
        wall = [f / r["train_seconds"] / r["peak_flops"] for f, r in zip(flops, runs[c])]
        cpu = [f / r["cpu_seconds"] / r["peak_flops_cpu"] for f, r in zip(flops, runs[c])]
        summary[c] = {"tokens_per_s": mean(c, "tokens_per_s"), "tokens_per_cpu_s": mean(c, "tokens_per_cpu_s"),
                      "target_tokens_per_s": mean(c, "target_tokens_per_s"),
                      "dev_loss": mean(c, "dev_loss"), "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[c]),
                      "flops_per_s": sum(f / r["train_seconds"] for f, r in zip(flops, runs[c])) / len(flops),
                      "peak": mean(c, "peak_flops"),
                      "fraction_of_peak": sum(wall) / len(wall), "fraction_of_peak_cpu": sum(cpu) / len(cpu)}
    print(f"\n{'contestant':12s}{'tokens/s':>10s}{'per CPU-s':>11s}{'target tok/s':>14s}{'dev loss':>10s}"
          f"{'peak RSS MB':>13s}{'GFLOP/s':>10s}{'peak':>7s}{'of peak':>9s}{'(CPU)':>7s}")
    for c in contestants:
        s = summary[c]
        print(f"{c:12s}{s['tokens_per_s']:10.1f}{s['tokens_per_cpu_s']:11.1f}{s['target_tokens_per_s']:14.1f}"
              f"{s['dev_loss']:10.4f}{s['peak_rss_mb']:13.0f}{s['flops_per_s'] / 1e9:10.1f}{s['peak'] / 1e9:7.0f}"
              f"{s['fraction_of_peak']:9.2f}{s['fraction_of_peak_cpu']:7.2f}")
    print("peak: each run's own matmul peak in its dtype (bf16 or fp32), measured in its process just before it "
          "trains; (CPU): FLOPs per second of that process's CPU time over the peak per CPU second")
    ours, peft, peft_bf16 = summary["ours"], summary["peft"], summary["peft-bf16"]
    out = {
        "ratio_tokens_per_s": ours["tokens_per_s"] / peft["tokens_per_s"],
        "ratio_target_tokens_per_s": ours["target_tokens_per_s"] / peft["target_tokens_per_s"],
        "ratio_vs_peft_bf16": ours["tokens_per_s"] / peft_bf16["tokens_per_s"],
        # the same ratios per second of each process's own CPU time: steadier on a shared machine
        "ratio_tokens_per_cpu_s": ours["tokens_per_cpu_s"] / peft["tokens_per_cpu_s"],
        "ratio_vs_peft_bf16_per_cpu_s": ours["tokens_per_cpu_s"] / peft_bf16["tokens_per_cpu_s"],
        "dev_loss_ours": ours["dev_loss"],
        "dev_loss_peft": peft["dev_loss"],
        "dev_loss_peft_bf16": peft_bf16["dev_loss"],
        "tokens_per_s_ours": ours["tokens_per_s"],
        "tokens_per_s_peft": peft["tokens_per_s"],
        "tokens_per_s_peft_bf16": peft_bf16["tokens_per_s"],
        "tokens_per_cpu_s_ours": ours["tokens_per_cpu_s"],
        "peak_rss_mb_ours": ours["peak_rss_mb"],
        "peak_rss_mb_peft": peft["peak_rss_mb"],
        "fraction_of_matmul_peak": ours["fraction_of_peak"],
        "fraction_of_matmul_peak_cpu": ours["fraction_of_peak_cpu"],
        "fraction_of_matmul_peak_peft": peft["fraction_of_peak"],
        "matmul_peak_gflops_bf16": ours["peak"] / 1e9 if runs["ours"][0]["bf16"] else None,
        "matmul_peak_gflops_fp32": peft["peak"] / 1e9,
        **{f"tokens_per_s_{m}": summary[m]["tokens_per_s"] for m in others},
        **{f"tokens_per_cpu_s_{m}": summary[m]["tokens_per_cpu_s"] for m in others},
        **{f"dev_loss_{m}": summary[m]["dev_loss"] for m in others},
        "steps": args.steps, "rounds": args.rounds, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
    }
    print(f"ratio tokens/s ours/PEFT: {out['ratio_tokens_per_s']:.2f}x ({out['ratio_tokens_per_cpu_s']:.2f}x per CPU-s), "
          f"vs PEFT under bf16: {out['ratio_vs_peft_bf16']:.2f}x ({out['ratio_vs_peft_bf16_per_cpu_s']:.2f}x); "
          f"dev loss ours {out['dev_loss_ours']:.4f} vs PEFT {out['dev_loss_peft']:.4f}")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
