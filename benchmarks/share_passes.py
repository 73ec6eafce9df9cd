"""`UsersConfig.share_passes` on a real model: isolation and the joint job's training-step time.

Isolation: jobs of two users {A, B} and {A, B'} (B' = B with other E2E rows), the same steps; is A's exported
prefix identical byte for byte? With one user per pass (the default) it must be, on any kernel; with shared passes
it is only where the matmuls give a row the same bits at any row count (not bf16 with AMX).
Time: the training steps (`UsersResult.train_seconds`) of one job of N users, default against shared passes,
in one process (one model load), alternating, the same data and steps as `train_many.py`'s joint job.

    python benchmarks/share_passes.py --threads 1 --precision bf16 --json
"""
from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

from common import DEFAULT_DATA, at_least, benchmark_parser
from train_many import max_rel_diff


def main():
    parser = benchmark_parser(__doc__, threads=1)
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="bf16")
    parser.add_argument("--steps", type=at_least(1), default=2)
    parser.add_argument("--batch-size", type=at_least(1), default=8)
    parser.add_argument("--isolation-examples", type=at_least(1), default=50, help="rows of A, B and B'")
    parser.add_argument("--users", type=at_least(0), default=10, help="users of the timed job (0: no timing)")
    parser.add_argument("--examples", type=at_least(1), default=200, help="rows per user of the timed job")
    args = parser.parse_args()
    import torch

    from prefixtune.data import load_task, training_pairs
    from prefixtune.models import load_base_model
    from prefixtune.train_config import TrainConfig
    from prefixtune.users import UsersConfig, store_dir, train_users
    from prefixtune.users.names import prefix_name

    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = training_pairs(load_task("e2e", "train", args.data_dir or DEFAULT_DATA))
    random.Random(0).shuffle(pairs)
    model, tokenizer = load_base_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="share-passes-"))

    def job(name, train, share):
        config = TrainConfig(output_dir=str(work / name), model=args.model, method="prefix", max_steps=args.steps,
                             batch_size=args.batch_size, eval_every=0, seed=1, precision=args.precision)
        return train_users(config, model, tokenizer, train, users=UsersConfig(share_passes=share), progress=False)

    def prefix_of(result, user) -> Path:
        return store_dir(result.output_dir, result.tenant) / f"{prefix_name(user)}.safetensors"

    n = args.isolation_examples
    a, b, b_other = pairs[:n], pairs[n:2 * n], pairs[2 * n:3 * n]
    report = {"model": args.model, "precision": args.precision, "threads": torch.get_num_threads(),
              "steps": args.steps, "batch_size": args.batch_size}
    for share in (False, True):
        first = prefix_of(job(f"iso-{share}-b", {"A": a, "B": b}, share), "A")
        second = prefix_of(job(f"iso-{share}-b2", {"A": a, "B": b_other}, share), "A")
        diff = max_rel_diff(second, first)  # of the first job's max|P|; 0 exactly when every value is equal
        report[f"share_passes_{share}".lower()] = {"a_identical": diff == 0, "a_max_rel_diff": diff}
        print(f"share_passes={share}: A's prefix identical {diff == 0} (max diff {diff:.3g} of max|P|)",
              file=sys.stderr)
    if args.users:
        k = args.examples
        train = {f"user{u:02d}": pairs[u * k:(u + 1) * k] for u in range(args.users)}
        times = {False: [], True: []}
        for run, share in enumerate((False, True, True, False)):  # alternated: the machine's load changes
            result = job(f"time-{run}", train, share)
            times[share].append(round(result.train_seconds, 2))
            print(f"share_passes={share}: training steps {result.train_seconds:.1f}s", file=sys.stderr)
        report["train_s"] = {"default": times[False], "share_passes": times[True], "users": args.users,
                             "examples": args.examples}
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
