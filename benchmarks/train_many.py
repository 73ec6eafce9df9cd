"""Many users in one job against the same users trained as separate `prefixtune train` runs.

N users of E examples each (disjoint E2E training pairs, one user per slice, 10% more of each held
out as that user's dev rows) are trained twice, the same steps of the same batches for every user:
  joint     one `prefixtune train --data users.jsonl --user-field user` process: one model load
  separate  one `prefixtune train --data userK.jsonl` process per user, each loading the model
Both are whole CLI processes measured by wall clock in this run, with the same threads: half the separate
runs, then the joint job, then the other half; and by the CPU time of those processes
(`ratio_vs_separate_runs_cpu`, steadier than the wall clock when other jobs share the machine). Tokens/s is given
with model loading (tokens / wall clock of the processes) and without
(tokens / seconds of training steps, as each run reports them). Each user's exported prefix from the
joint job is compared with the one from their separate run.

    python benchmarks/train_many.py --users 10 --examples 200 --steps 2 --threads 1 --json
    python benchmarks/train_many.py --users 2 --examples 50 --steps 1 --precision fp32 --json  # the prefixes, no bf16
    python benchmarks/train_many.py --memory-only --memory-users 400 --json   # memory per user
"""
from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DEFAULT_DATA, at_least, benchmark_parser


def write_jsonl(path: Path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def make_users(data_dir: str, users: int, examples: int, dev: int, seed: int, work: Path) -> list[str]:
    """users.jsonl + users-dev.jsonl (every user), and userK.jsonl + userK-dev.jsonl (one user each)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from prefixtune.data import load_task, training_pairs

    pairs = training_pairs(load_task("e2e", "train", data_dir))
    random.Random(seed).shuffle(pairs)
    names = [f"user{k:02d}" for k in range(users)]
    queues, all_dev = [], []
    for k, name in enumerate(names):
        mine = pairs[k * (examples + dev): (k + 1) * (examples + dev)]
        rows = [{"user": name, "source": s, "target": t} for s, t in mine]
        write_jsonl(work / f"{name}.jsonl", rows[:examples])
        write_jsonl(work / f"{name}-dev.jsonl", rows[examples:])
        queues.append(rows[:examples])
        all_dev += rows[examples:]
    # a real file mixes its users' rows; each user's own rows keep their order (so their batches are the same)
    rng, all_train = random.Random(seed), []
    while any(queues):
        all_train.append(rng.choice([q for q in queues if q]).pop(0))
    write_jsonl(work / "users.jsonl", all_train)
    write_jsonl(work / "users-dev.jsonl", all_dev)
    return names


def child_env(args) -> dict:
    """This checkout's source first on the path, and the benchmark's threads."""
    path = [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": os.pathsep.join(p for p in path if p)}


# runs the CLI, then reports its own peak resident memory (what the job held, model included)
PEAK_RSS = ("import resource, runpy, sys\nsys.argv[0] = 'prefixtune'\ntry:\n"
            "    runpy.run_module('prefixtune.cli', run_name='__main__')\nfinally:\n"
            "    print('peak_rss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")


def run(args, data: str, dev: str | None, out: Path, *extra, steps: int | None = None) -> dict:
    """One `prefixtune train` process: its wall clock, CPU time, peak memory and the last JSON line it printed."""
    command = [sys.executable, "-c", PEAK_RSS, "train", "--data", data, "-o", str(out),
               "--model", args.model, "--max-steps", str(steps or args.steps), "--batch-size", str(args.batch_size),
               "--eval-every", "0", "--save-every", "0", "--seed", "1", "--precision", args.precision, *extra]
    command += ["--dev-data", dev] if dev else ["--dev-fraction", "0"]
    if "--method" not in extra:
        command += ["--method", args.method]
    done, wall, cpu = timed_child(command, child_env(args))
    if done.returncode:
        sys.exit(f"error: {' '.join(command[3:])} failed:\n{done.stderr[-3000:]}")
    peak = [line for line in done.stderr.splitlines() if line.startswith("peak_rss_kb ")]
    return {"wall_s": wall, "cpu_s": cpu, "printed": json.loads(done.stdout.strip().splitlines()[-1]),
            "peak_rss_mib": int(peak[-1].split()[1]) / 1024 if peak else None}


def timed_child(command: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run a process to its end: (its result, wall-clock seconds, its CPU seconds: user + system, its own threads
    and the children it waited for)."""
    def children_cpu():
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    start, cpu_start = time.perf_counter(), children_cpu()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    return done, time.perf_counter() - start, children_cpu() - cpu_start


MEMORY_JOB = """
import json, resource, sys
from prefixtune.models import load_base_model
from prefixtune.train_config import TrainConfig
from prefixtune.users import UsersConfig, train_users
users, rows, method, out, model = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
train = {f"u{k:04d}": [(f"user {k} row {r}", f"hello {k}") for r in range(rows)] for k in range(users)}
config = TrainConfig(output_dir=out, model=model, method=method, max_steps=1, eval_every=0)
result = train_users(config, *load_base_model(model), train,
                     users=UsersConfig(max_tokens_per_forward=512, share_passes=True),
                     progress=False, overwrite=True)
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "resident_users": result.resident_users, "state_bytes_per_user": result.state_bytes_per_user}))
"""


def memory_per_user(args, work: Path) -> dict:
    """Peak memory of a job of N users against one of N/2, one step each, through the Python API with forward
    passes of 512 padded tokens that both jobs fill (users packed: share_passes): the difference is the extra
    users' state (parameters, AdamW, gradients), not activations."""
    found = {}
    for method, many, rows in (("prefix-flat", args.memory_users, 1), ("prefix", 16, 4)):
        jobs = {}
        for count in (many // 2, many):
            command = [sys.executable, "-c", MEMORY_JOB, str(count), str(rows), method,
                       str(work / f"memory-{method}-{count}"), args.model]
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, env=child_env(args))
            if done.returncode:
                sys.exit(f"error: the memory job of {count} users failed:\n{done.stderr[-3000:]}")
            jobs[count] = {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - start}
        small, big = jobs[many // 2], jobs[many]
        more = big["resident_users"] - small["resident_users"]
        per_user = (big["peak_rss_mib"] - small["peak_rss_mib"]) / max(more, 1)
        found[method] = {"users": many, "resident_users": big["resident_users"],
                         f"peak_rss_mib_{many // 2}_users": round(small["peak_rss_mib"]),
                         f"peak_rss_mib_{many}_users": round(big["peak_rss_mib"]),
                         "measured_mib_per_resident_user": round(per_user, 3),
                         "state_mib_per_user": round(big["state_bytes_per_user"] / 2**20, 3),
                         "wall_s": round(big["wall_s"], 1)}
        print(f"memory, {method}: {many} users in one job ({big['resident_users']} resident at a time): peak "
              f"{big['peak_rss_mib']:.0f} MiB vs {small['peak_rss_mib']:.0f} MiB for {many // 2} users: "
              f"{per_user:.2f} MiB per resident user (its state between steps: "
              f"{found[method]['state_mib_per_user']:.2f} MiB)", flush=True)
    return found


def startup_and_load(args) -> float:
    """Seconds for a fresh process to import prefixtune and load the model: what every separate run pays."""
    code = ("import time; t = time.perf_counter(); import prefixtune.cli.app, prefixtune.train; "
            "from prefixtune.models import load_base_model; load_base_model(%r); print(time.perf_counter() - t)"
            % args.model)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env=child_env(args))
    return time.perf_counter() - start


def max_rel_diff(a_file: Path, b_file: Path) -> float:
    from safetensors.torch import load_file

    a, b = load_file(a_file), load_file(b_file)
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in a)


def main():
    parser = benchmark_parser(__doc__, threads=1, threads_help="threads of every training process", min_threads=1)
    parser.add_argument("--users", type=at_least(1), default=10)
    parser.add_argument("--examples", type=at_least(1), default=200, help="training rows per user")
    parser.add_argument("--dev", type=at_least(1), default=20, help="dev rows per user")
    parser.add_argument("--steps", type=at_least(1), default=2, help="optimizer steps per user")
    parser.add_argument("--batch-size", type=at_least(1), default=8)
    parser.add_argument("--method", default="prefix", help="prefix (the paper's MLP) | prefix-flat")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="every training process's --precision (auto: bf16 where the CPU has it)")
    parser.add_argument("--seed", type=int, default=0, help="which E2E pairs each user gets")
    parser.add_argument("--work-dir", default=None, help="default: a temporary directory")
    parser.add_argument("--memory-users", type=at_least(0), default=0,
                        help="also measure memory per user: a job of this many users against one of half as many "
                             "(prefix-flat; and 16 against 8 with the MLP). 0: skip")
    parser.add_argument("--memory-only", action="store_true", help="only the memory measurement")
    args = parser.parse_args()
    if args.memory_users == 1 or (args.memory_only and not args.memory_users):
        parser.error("--memory-users must be 2 or more (a job of N users against one of N/2)"
                     + (", and --memory-only needs it" if args.memory_only else ""))
    if args.data_dir == DEFAULT_DATA:
        os.environ.setdefault("PREFIXTUNE_DATA", args.data_dir)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="train-many-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.memory_only:
        memory = memory_per_user(args, work)
        if args.json:
            print(json.dumps({"memory": memory, "threads": args.threads, "model": args.model}))
        return
    names = make_users(args.data_dir, args.users, args.examples, args.dev, args.seed, work)
    load_before = os.getloadavg()[0]

    load_s = startup_and_load(args)
    print(f"a fresh process imports prefixtune and loads {args.model} in {load_s:.1f}s", flush=True)
    # half the separate runs before the joint job and half after, so that a change in the machine's load
    # during the run falls on both
    separate = {}

    def run_separate(name):
        one = run(args, str(work / f"{name}.jsonl"), str(work / f"{name}-dev.jsonl"), work / name)
        one["result"] = json.loads((work / name / "result.json").read_text())
        separate[name] = one
        print(f"separate {name}: {one['wall_s']:.1f}s (training steps {one['result']['train_seconds']:.1f}s)",
              flush=True)

    for name in names[: len(names) // 2]:
        run_separate(name)
    joint = run(args, str(work / "users.jsonl"), str(work / "users-dev.jsonl"), work / "joint", "--user-field", "user")
    summary = json.loads((work / "joint" / "users.json").read_text())
    print(f"joint: {args.users} users in {joint['wall_s']:.1f}s (training steps {summary['train_seconds']:.1f}s)",
          flush=True)
    for name in names[len(names) // 2:]:
        run_separate(name)
    separate = [separate[name] for name in names]

    sep_wall = sum(r["wall_s"] for r in separate)
    sep_cpu = sum(r["cpu_s"] for r in separate)
    sep_train = sum(r["result"]["train_seconds"] for r in separate)
    sep_tokens = sum(r["result"]["tokens_per_s"] * r["result"]["train_seconds"] for r in separate)
    store = Path(summary["store"]) / next(p.name for p in Path(summary["store"]).iterdir())
    diffs = [max_rel_diff(store / f"{name}.safetensors", work / name / "prefix.safetensors") for name in names]
    rows = {r["user"]: r for r in summary["users"]}
    result = {
        "users": args.users, "examples_per_user": args.examples, "dev_per_user": args.dev,
        "steps_per_user": args.steps, "batch_size": args.batch_size, "method": args.method,
        "precision": args.precision,
        "threads": args.threads, "model": args.model,
        "joint": {"wall_s": round(joint["wall_s"], 2), "cpu_s": round(joint["cpu_s"], 2),
                  "train_s": round(summary["train_seconds"], 2),
                  "dev_loss_s": round(summary["dev_seconds"], 2), "export_s": round(summary["export_seconds"], 2),
                  "tokens": summary["tokens"], "padded_tokens": summary["padded_tokens"],
                  "tokens_per_s_with_load": round(summary["tokens"] / joint["wall_s"], 1),
                  "tokens_per_s_training": round(summary["tokens_per_s"], 1),
                  "resident_users": summary["resident_users"], "peak_rss_mib": round(joint["peak_rss_mib"]),
                  "state_bytes_per_user": summary["state_bytes_per_user"]},
        "separate": {"wall_s": round(sep_wall, 2), "cpu_s": round(sep_cpu, 2), "train_s": round(sep_train, 2),
                     "tokens": round(sep_tokens),
                     "padded_tokens": sum(r["result"]["padded_tokens"] for r in separate),
                     "tokens_per_s_with_load": round(sep_tokens / sep_wall, 1),
                     "tokens_per_s_training": round(sep_tokens / sep_train, 1),
                     "wall_s_per_run": [round(r["wall_s"], 2) for r in separate],
                     "peak_rss_mib": round(max(r["peak_rss_mib"] for r in separate)),
                     "outside_training_s_per_run": [round(r["wall_s"] - r["result"]["train_seconds"], 2)
                                                    for r in separate]},
        "startup_and_load_s": round(load_s, 2),
        "ratio_vs_separate_runs": round(sep_wall / joint["wall_s"], 3),
        "ratio_vs_separate_runs_cpu": round(sep_cpu / joint["cpu_s"], 3),
        "ratio_training_only": round(sep_train / summary["train_seconds"], 3),
        "same_steps": all(rows[n]["steps"] == r["result"]["steps"] for n, r in zip(names, separate)),
        "max_rel_diff_vs_separate": max(diffs),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    outside_joint = joint["wall_s"] - summary["train_seconds"]
    outside_sep = sep_wall - sep_train
    print(f"wall clock: joint {joint['wall_s']:.1f}s, separate {sep_wall:.1f}s: "
          f"ratio_vs_separate_runs {result['ratio_vs_separate_runs']:.2f}; CPU time: joint {joint['cpu_s']:.1f}s, "
          f"separate {sep_cpu:.1f}s: ratio_vs_separate_runs_cpu {result['ratio_vs_separate_runs_cpu']:.2f}")
    print(f"where the time goes: training steps joint {summary['train_seconds']:.1f}s vs separate {sep_train:.1f}s "
          f"(ratio {result['ratio_training_only']:.2f}); everything else (start, imports, model load, init, dev loss, "
          f"export, checkpoints) joint {outside_joint:.1f}s once vs separate {outside_sep:.1f}s "
          f"({outside_sep / args.users:.1f}s per run, of which {load_s:.1f}s start + model load); the joint job's "
          f"dev losses {summary['dev_seconds']:.1f}s and exports {summary['export_seconds']:.1f}s")
    if args.memory_users:
        result["memory"] = memory_per_user(args, work)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
