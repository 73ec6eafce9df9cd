"""`personalization`: the paper's personalisation case end to end (issue 22, section 3).

The users are WebNLG's 10 seen categories; each user's prefix trains only on its own category's training
entries. One command (`prefixtune experiment personalization --out reports/personalization`) runs, in order:

  1. training   the 10 users in one `prefixtune train --user-field user` job, the same users as 10 separate
                `prefixtune train` processes (each loading the model), and one shared prefix on all of their rows,
                each a whole process timed by wall clock at the same thread count (benchmarks/train_many.py's `run`)
  2. heat map   every user's prefix (and the shared one) decoding every category's test entries in mixed
                batches on the engine (a prefix per row), BLEU per (prefix, category)
  3. serving    personalization_serve.py: one `prefixtune serve --store` over the job's store, all users in mixed
                batches against each row decoded alone; one user deleted and one added while requests run

Every stage's result is kept in OUT/results.json (a re-run skips the stages it holds, for the same scale);
OUT/outputs.jsonl holds one line per heat-map cell (its BLEU, entry ids and hypotheses); OUT/report.md and
OUT/heatmap.png are written from them. OUT/reading.md, when present, is the hand-written part.
"""
from __future__ import annotations

import importlib
import json
import random
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

from ..atomic import atomic_write_bytes
from .personalization_serve import SHARED, serve_checks
from .report import READING, md_table, write_report
from .runner import select_test

NAME = "personalization"
TITLE = "Personalisation: one prefix per WebNLG category, trained in one job, served together"
RESULTS, OUTPUTS, FIGURE = "results.json", "outputs.jsonl", "heatmap.png"


@dataclass(frozen=True)
class PScale:
    name: str
    categories: int          # the first N seen categories (alphabetical); 10 is all of them
    train_size: int          # training pairs per user (one pair per reference), drawn by seed 0
    batch_size: int
    steps: int               # optimizer steps per user; the shared prefix takes users x steps (the same epochs)
    test_size: int           # test entries per category in the heat map, drawn by seed 0
    serve_size: int          # test entries per user sent to the server (from the heat map's own entries)
    max_new_tokens: int
    method: str = "prefix-flat"
    init: str = "words:table-to-text:"
    lr: float | None = None  # None: the method's default


SCALES = {
    # the tests: 2 categories, a few rows, 2 steps, a tiny model (passed as --model); a large rate, so that a
    # tiny random model's outputs depend on the prefix (else every check below would hold trivially)
    "tiny": PScale("tiny", categories=2, train_size=6, batch_size=2, steps=2, test_size=3, serve_size=3,
                   max_new_tokens=8, lr=1.0),
    # the report: about 35 minutes on one thread of a busy 2-core CPU. Ten steps at prefix-flat's default rate
    # (5e-3) left every user's prefix still ending its outputs at once (BLEU ~0; the shared prefix, 100 steps, 27):
    # 5e-2, from one probe (City, 10 steps: 12.9 BLEU on its test entries), for every prefix alike
    "cpu": PScale("cpu", categories=10, train_size=40, batch_size=4, steps=10, test_size=10, serve_size=3,
                  max_new_tokens=48, lr=5e-2),
}


def command_line(scale: str, out, model: str | None, data_dir: str | None, threads: int) -> str:
    parts = ["prefixtune", "experiment", NAME, "--scale", scale, "--out", str(out), "--threads", str(threads)]
    parts += ["--model", model] if model else []
    parts += ["--data-dir", str(data_dir)] if data_dir else []
    return " ".join(shlex.quote(p) for p in parts)


# -- data --------------------------------------------------------------------------------------------
def users_and_tests(scale: PScale, data_dir: str | None) -> tuple[dict, dict]:
    """(train, test): category -> its training pairs (`train_size`, drawn by seed 0 from that category's entries
    alone) and category -> its test records (`test_size` of the seen test entries of that category)."""
    from ..data import load_task, training_pairs

    by_category: dict[str, list] = {}
    for record in load_task("webnlg", "train", data_dir):
        by_category.setdefault(record.meta["category"], []).append(record)
    categories = sorted(by_category)[: scale.categories]
    train = {}
    for category in categories:
        pairs = training_pairs(by_category[category])
        train[category] = [pairs[i] for i in sorted(random.Random(0).sample(range(len(pairs)), scale.train_size))]
    tests: dict[str, list] = {}
    for record in load_task("webnlg", "test", data_dir, subset="seen"):
        tests.setdefault(record.meta["category"], []).append(record)
    return train, {c: select_test(tests[c], scale.test_size) for c in categories}


def write_jsonl(path: Path, rows: list[dict]):
    atomic_write_bytes(path, "".join(json.dumps(row) + "\n" for row in rows).encode())


def write_user_files(train: dict, work: Path):
    """work/users.jsonl (every user's rows, mixed as in a real file; each user's own rows keep their order, so a
    user's batches in the joint job are those of their separate run) and work/<user>.jsonl (one user each)."""
    queues = {user: [{"user": user, "source": s, "target": t} for s, t in pairs] for user, pairs in train.items()}
    for user, rows in queues.items():
        write_jsonl(work / f"{user}.jsonl", rows)
    rng, mixed, left = random.Random(0), [], {u: list(rows) for u, rows in queues.items()}
    while any(left.values()):
        mixed.append(left[rng.choice([u for u, rows in left.items() if rows])].pop(0))
    write_jsonl(work / "users.jsonl", mixed)


# -- 1. training ---------------------------------------------------------------------------------------
def train_many_module():
    """benchmarks/train_many.py, whose `run` times one `prefixtune train` process (the benchmark and this study
    measure joint against separate training the same way)."""
    benchmarks = Path(__file__).resolve().parents[3] / "benchmarks"
    if not (benchmarks / "train_many.py").is_file():
        raise FileNotFoundError(f"{benchmarks / 'train_many.py'} not found: the study runs from a clone of prefixtune")
    if str(benchmarks) not in sys.path:
        sys.path.insert(0, str(benchmarks))
    return importlib.import_module("train_many")


def train_all(scale: PScale, model: str, users: list[str], work: Path, threads: int, log) -> dict:
    """The joint job, the separate runs (half before it, half after, as train_many does) and the shared prefix."""
    many = train_many_module()
    args = SimpleNamespace(model=model, steps=scale.steps, batch_size=scale.batch_size, method=scale.method,
                           threads=threads, precision="auto")  # train_many's options that `run` reads
    extra = ["--init", scale.init, "--overwrite"] + (["--lr", str(scale.lr)] if scale.lr is not None else [])
    separate = {}

    def process(what, *run_args, **options):
        """`many.run`, whose failure (a `sys.exit` with the command and the process's output) becomes one line."""
        try:
            return many.run(args, *run_args, **options)
        except SystemExit as e:
            lines = [line for line in str(e.code).splitlines()[1:] if line.strip()
                     and not line.startswith("peak_rss_kb ")]
            errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
            raise RuntimeError(f"the {what} (prefixtune train) failed: "
                               f"{(errors or lines or ['no output'])[-1]}") from None

    def run_separate(user):
        one = process(f"separate run of {user}", str(work / f"{user}.jsonl"), None, work / "separate" / user, *extra)
        done = json.loads((work / "separate" / user / "result.json").read_text())
        separate[user] = {"wall_s": round(one["wall_s"], 2), "peak_rss_mib": one["peak_rss_mib"],
                          **{k: done.get(k) for k in ("train_seconds", "tokens_per_s", "steps")}}
        log(f"separate {user}: {one['wall_s']:.1f}s")

    for user in users[: len(users) // 2]:
        run_separate(user)
    joint = process("joint job", str(work / "users.jsonl"), None, work / "joint", "--user-field", "user", *extra)
    summary = json.loads((work / "joint" / "users.json").read_text())
    log(f"joint: {len(users)} users in {joint['wall_s']:.1f}s")
    for user in users[len(users) // 2:]:
        run_separate(user)
    shared = process("shared prefix", str(work / "users.jsonl"), None, work / "shared", *extra,
                     steps=scale.steps * len(users))
    log(f"shared: {shared['wall_s']:.1f}s")
    store = joint_store(work)
    diffs = {u: many.max_rel_diff(store / f"{u}.safetensors", work / "separate" / u / "prefix.safetensors")
             for u in users}
    sep_wall = sum(r["wall_s"] for r in separate.values())
    return {
        "joint": {"wall_s": round(joint["wall_s"], 2), "train_s": round(summary["train_seconds"], 2),
                  "tokens": summary["tokens"], "peak_rss_mib": joint["peak_rss_mib"],
                  "users": sorted(summary["users"], key=lambda r: r["user"])},
        "separate": {"wall_s": round(sep_wall, 2), "train_s": round(sum(r["train_seconds"] for r in separate.values()), 2),
                     "runs": separate},
        "shared": {"wall_s": round(shared["wall_s"], 2), "steps": scale.steps * len(users),
                   "train_s": json.loads((work / "shared" / "result.json").read_text()).get("train_seconds"), "peak_rss_mib": shared["peak_rss_mib"]},
        "ratio_vs_separate_runs": round(sep_wall / joint["wall_s"], 3),
        "max_rel_diff_joint_vs_separate": max(diffs.values()),
        "threads": threads,
    }


def trained_prefixes(work: Path, users: list[str]) -> bool:
    """Whether `work` holds what the training stage wrote: every user's prefix in the joint store, the shared one."""
    stores = [p for p in (work / "joint" / "store").iterdir() if p.is_dir()] if (work / "joint" / "store").is_dir() else []
    return (len(stores) == 1 and all((stores[0] / f"{u}.safetensors").is_file() for u in users)
            and (work / "shared" / "prefix.safetensors").is_file())


def joint_store(work: Path) -> Path:
    """The joint job's tenant folder of prefixes (its only one)."""
    return next(p for p in (work / "joint" / "store").iterdir() if p.is_dir())


# -- 2. the heat map -----------------------------------------------------------------------------------
def decode_heatmap(bank, users: list[str], tests: dict, scale: PScale, out: Path, progress: bool) -> dict:
    """Every prefix (the users' and the shared one) on every category's test entries, all rows decoded together
    (a prefix per row, continuously batched); one line of OUT/outputs.jsonl per (prefix, category)."""
    from tqdm.auto import tqdm

    from ..evaluate import grouped_bleu
    from ..generation import DecodingConfig

    cells = [(p, c) for p in [*users, SHARED] for c in tests]
    sources = [r.source for p, c in cells for r in tests[c]]
    prefix_ids = [p for p, c in cells for _ in tests[c]]
    config = DecodingConfig(max_new_tokens=scale.max_new_tokens, dtype="auto")
    start = time.perf_counter()
    with tqdm(total=len(sources), disable=not progress, desc="heat map", dynamic_ncols=True) as bar:
        hypotheses = bank.generate(sources, prefix_ids, config, progress=bar.update)
    decode_s = time.perf_counter() - start
    lines, at = [], 0
    for p, c in cells:
        records, hyps = tests[c], hypotheses[at: at + len(tests[c])]
        at += len(records)
        lines.append({"prefix": p, "category": c, "bleu": round(grouped_bleu(hyps, [r.references for r in records]), 2),
                      "entries": [r.meta["eid"] for r in records], "hypotheses": hyps})
    write_jsonl(out / OUTPUTS, lines)
    return {"rows": len(sources), "decode_s": round(decode_s, 1),
            "bleu": {p: {c: line["bleu"] for line in lines if line["prefix"] == p for c in [line["category"]]}
                     for p in [*users, SHARED]}}


def read_outputs(out: Path) -> dict:
    """(prefix, category) -> hypotheses, from OUT/outputs.jsonl."""
    lines = [json.loads(line) for line in (out / OUTPUTS).read_text().splitlines() if line.strip()]
    return {(line["prefix"], line["category"]): line["hypotheses"] for line in lines}


# -- the study ---------------------------------------------------------------------------------------
def run(scale: str = "cpu", out: str | Path | None = None, model: str | None = None, data_dir: str | None = None,
        threads: int = 1, report_only: bool = False, progress: bool = True) -> dict:
    """Run (or finish) the study and write its report; returns the headline numbers and the report's path."""
    if scale not in SCALES:
        raise ValueError(f"study {NAME!r} has the scales {', '.join(SCALES)}; not {scale!r}")
    s = SCALES[scale]
    out = Path(out or Path("reports") / NAME)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file: give the study's folder")
    work = out / ".work"
    results_file = out / RESULTS
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if report_only:
        if not results.get("serving"):
            raise FileNotFoundError(f"{results_file}: no finished study to report on")
        return {"report": str(write_personalization_report(out, results)), **headline(results)}
    model_name = model or "smollm2-135m"
    settings = {"scale": asdict(s), "model": model_name}
    if results.get("settings") != settings:  # another scale or model: start again
        results = {"settings": settings, "command": command_line(scale, out, model, data_dir, threads)}
    log = (lambda text: print(text, flush=True)) if progress else (lambda text: None)

    def save():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(results_file, json.dumps(results, indent=1).encode())

    train, tests = users_and_tests(s, data_dir)  # the data before anything trains: a missing folder fails at once
    users = list(train)
    results["data"] = {u: {"train_pairs": len(train[u]), "test_entries": len(tests[u])} for u in users}
    if "serving" in results:
        return {"report": str(write_personalization_report(out, results)), **headline(results)}
    from ..models import load_base_model

    # and the model, before anything is written: a wrong --model is one error, not a failed training process
    loaded, tokenizer = load_base_model(model_name)
    if "training" in results and not trained_prefixes(work, users):  # OUT/.work removed: its stages cannot resume
        log(f"{work}: the trained prefixes are not there; training again")
        results = {k: v for k, v in results.items() if k not in ("training", "heatmap")}
    if "heatmap" in results and not (out / OUTPUTS).is_file():
        del results["heatmap"]
    if "training" not in results:
        created = not out.exists()
        # before the work is wiped: a killed run of other settings must not leave results.json naming stages
        # that the work no longer holds (a re-run with those settings would serve these prefixes as its own)
        save()
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            write_user_files(train, work)
            results["training"] = train_all(s, model_name, users, work, threads, log)
        except Exception:  # a training process failed: no half-trained work left (a re-run starts it again anyway)
            shutil.rmtree(out if created else work, ignore_errors=True)
            raise
        save()
    if "heatmap" not in results or "serving" not in results:
        from ..bank import PrefixBank

        bank = PrefixBank(loaded, tokenizer)
        store = joint_store(work)
        for user in users:
            bank.add(user, store / f"{user}.safetensors")
        bank.add(SHARED, work / "shared" / "prefix.safetensors")
        if "heatmap" not in results:
            results["heatmap"] = decode_heatmap(bank, users, tests, s, out, progress)
            save()
        results["serving"] = serve_checks(bank, users, tests, read_outputs(out), s, model_name, store, work,
                                          threads, log)
        save()
    return {"report": str(write_personalization_report(out, results)), **headline(results)}


# -- the report --------------------------------------------------------------------------------------
def headline(results: dict) -> dict:
    bleu = results["heatmap"]["bleu"]
    users = [u for u in bleu if u != SHARED]
    own = [bleu[u][u] for u in users]
    others = [bleu[p][c] for c in users for p in users if p != c]
    serving = results["serving"]
    return {"own_bleu": round(sum(own) / len(own), 2), "other_users_bleu": round(sum(others) / len(others), 2),
            "shared_bleu": round(sum(bleu[SHARED][c] for c in users) / len(users), 2),
            "own_beats_shared": sum(bleu[u][u] > bleu[SHARED][u] for u in users),
            "own_beats_other_users": sum(bleu[u][u] > max(bleu[p][u] for p in users if p != u) for u in users),
            "users": len(users), "served_equal_alone": serving["mixed"]["equal_alone"],
            "served": serving["mixed"]["requests"], "unchanged_after_delete_add": serving["churn"]["unchanged"],
            "others_during_delete_add": serving["churn"]["others"],
            "ratio_vs_separate_runs": results["training"]["ratio_vs_separate_runs"]}


def heatmap_figure(path: Path, bleu: dict, users: list[str]):
    from .figures import _pyplot, save_figure

    plt = _pyplot()
    rows = [*users, SHARED]
    grid = [[bleu[p][c] for c in users] for p in rows]
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(users), 1.0 + 0.6 * len(rows)))
    ax.grid(False)
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8,
                    color="black" if value > 0.6 * max(max(r) for r in grid) else "white",
                    fontweight="bold" if i == j else "normal")
    for i in range(len(users)):  # the diagonal: a user's prefix on its own category
        ax.add_patch(plt.Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    ax.axhline(len(users) - 0.5, color="white", linewidth=3)
    ax.set_xticks(range(len(users)), users, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [*users, "shared (all 10)" if len(users) == 10 else "shared (all)"])
    ax.set_xlabel("test entries of category")
    ax.set_ylabel("prefix")
    ax.set_title("BLEU: each prefix on each category's test entries")
    fig.colorbar(image, ax=ax, label="BLEU")
    return save_figure(fig, path)


def write_personalization_report(out: Path, results: dict) -> Path:
    s, training, heat, serving = (results["settings"]["scale"], results["training"], results["heatmap"],
                                  results["serving"])
    bleu = heat["bleu"]
    users = [u for u in bleu if u != SHARED]
    h = headline(results)
    heatmap_figure(out / FIGURE, bleu, users)
    table = md_table(["prefix \\ test category", *users],
                     [[p if p != SHARED else "shared", *[f"**{bleu[p][c]:.1f}**" if p == c else f"{bleu[p][c]:.1f}"
                                                         for c in users]] for p in [*users, SHARED]])
    diagonal = md_table(
        ["category", "own prefix", "shared prefix", "own - shared", "best other user (its BLEU)", "other users' mean"],
        [[c, f"{bleu[c][c]:.1f}", f"{bleu[SHARED][c]:.1f}", f"{bleu[c][c] - bleu[SHARED][c]:+.1f}",
          "{} ({:.1f})".format(*max(((p, bleu[p][c]) for p in users if p != c), key=lambda x: x[1])),
          f"{sum(bleu[p][c] for p in users if p != c) / (len(users) - 1):.1f}"] for c in users])
    per_user = md_table(["user", "training pairs", "steps (joint)", "steps (separate)", "separate run (s)"],
                        [[r["user"], r["examples"], r["steps"], training["separate"]["runs"][r["user"]]["steps"],
                          training["separate"]["runs"][r["user"]]["wall_s"]] for r in training["joint"]["users"]])
    mixed, churn = serving["mixed"], serving["churn"]
    reading = out / READING
    text = f"""# {TITLE}

Regenerate this report (stages already in `{RESULTS}` are reused), with `PREFIXTUNE_DATA` pointing at the
datasets (or add `--data-dir DIR`):

```bash
{results['command']}
```

**Study.** The paper's personalisation case (§1, "one prefix per user"): the users are WebNLG's
{len(users)} seen categories, and each user's prefix trains only on its own category's training entries. All
users train in one job (`prefixtune train --user-field`, i.e. `prefixtune.users.train_users`); one shared prefix
trains on every user's rows. Every prefix then decodes every category's test entries (the heat map), the users are
served together by one `prefixtune serve`, and one user is deleted and another added while requests run.

## Headline

| what | number |
| --- | --- |
| own prefix on own category (mean of the diagonal) | {h['own_bleu']:.1f} BLEU |
| other users' prefixes on a category (mean off the diagonal) | {h['other_users_bleu']:.1f} BLEU |
| the shared prefix (mean over categories) | {h['shared_bleu']:.1f} BLEU |
| categories where the own prefix beats the shared one | {h['own_beats_shared']} of {len(users)} |
| categories where the own prefix beats every other user's | {h['own_beats_other_users']} of {len(users)} |
| served in mixed batches, equal to the row decoded alone | {mixed['equal_alone']} of {mixed['requests']} |
| other users' outputs unchanged while one user was deleted and one added | {churn['unchanged']} of {churn['others']} |
| joint job against {len(users)} separate `prefixtune train` runs, wall clock | {training['joint']['wall_s']:.0f} s vs {training['separate']['wall_s']:.0f} s: **{training['ratio_vs_separate_runs']:.2f}x** |
"""
    if reading.is_file():
        text += ("\n## Reading\n\n*Written by hand from the tables of this report (`reading.md`); "
                 f"everything else is generated.*\n\n{reading.read_text().strip()}\n")
    text += f"""
## The heat map

BLEU (sacreBLEU, lowercased, every reference of an entry) of each prefix (rows) on {s['test_size']} test entries of
each category (columns: WebNLG test, seen categories, entries drawn by seed 0). The diagonal (bold, boxed in the
figure) is a user's own prefix on its own category; the last row is the shared prefix. Greedy decoding on the engine,
{heat['rows']} rows decoded together with a prefix per row ({heat['decode_s']:.0f} s). Every hypothesis is in
`{OUTPUTS}` (one line per cell, with the entry ids).

![heat map]({FIGURE})

{table}

### The diagonal against the shared prefix

{diagonal}

## Serving: all users through one `prefixtune serve`

One `prefixtune serve --store` process (127.0.0.1, `--threads {training['threads']}`) started on a copy of the joint
job's store. {mixed['requests']} requests ({s['serve_size']} test entries of each user's own category, greedy,
`max_tokens` {s['max_new_tokens']}) were sent at once from {mixed['clients']} clients, so the engine decoded the users'
rows in mixed batches. Each answer was compared with the same row decoded alone (a batch of one, through
`PrefixBank`, the same dtype): **{mixed['equal_alone']} of {mixed['requests']} equal** (text, stripped).
{mixed['equal_heatmap']} of {mixed['requests']} also equal the heat map's decoding of the same entry (an offline batch of
{heat['rows']} rows).

**Deleting and adding users while requests run.** The other {len(users) - 1} users' requests were sent again
({churn['others']} requests); while {churn['in_flight_at_delete']} of them were still in flight, user
`{churn['deleted']}` was deleted (`DELETE /v1/prefixes/{churn['deleted']}`: {churn['delete_status']}) and the shared
prefix added as user `{churn['added']}` (`PUT /v1/prefixes/{churn['added']}`: {churn['add_status']}).
**{churn['unchanged']} of {churn['others']}** of the other users' outputs were unchanged from the first round; the
added user's {churn['added_requests']} requests gave the shared prefix's outputs decoded alone in
{churn['added_equal_alone']} of {churn['added_requests']}; the deleted user's {churn['deleted_requests']} requests
afterwards were refused with {churn['deleted_statuses']}.

## Training: one job against separate runs

Every user: {s['train_size']} training pairs of its own category (one pair per reference, drawn by seed 0),
{s['steps']} steps of batch {s['batch_size']} ({s['steps'] * s['batch_size'] / s['train_size']:g} epochs), `{s['method']}` (prefix length 10, P trained directly:
the parameterisation that holds 1,000 users in memory, docs/users.md), initialised from "table-to-text:", the
learning rate {'of the method (its default)' if s['lr'] is None else f"{s['lr']:g} (the same for the shared prefix)"}, no dev loss (a fixed step budget). The
shared prefix trains on all {len(users)} users' rows (the same file without `--user-field`) by the same budget rule:
the same number of epochs over its data, so {training['shared']['steps']} steps of batch {s['batch_size']}
({training['shared']['wall_s']:.0f} s as one process).

Each line is a whole `prefixtune train` process, measured by wall clock in this run at
`--threads {training['threads']}` (benchmarks/train_many.py's `run`): the {len(users)} separate runs, half before the joint
job and half after, each loading the model.

| job | wall clock (s) | training steps (s) | peak memory (MiB) |
| --- | --- | --- | --- |
| joint: {len(users)} users, one process | {training['joint']['wall_s']:.1f} | {training['joint']['train_s']:.1f} | {training['joint']['peak_rss_mib']:.0f} |
| {len(users)} separate processes | {training['separate']['wall_s']:.1f} | {training['separate']['train_s']:.1f} | {max(r['peak_rss_mib'] or 0 for r in training['separate']['runs'].values()):.0f} (each) |

Ratio (separate / joint, wall clock): **{training['ratio_vs_separate_runs']:.2f}x**. Each user's prefix from the joint
job against the one from its separate run: max relative difference {training['max_rel_diff_joint_vs_separate']:.2g}
(bf16 training; docs/users.md states the tolerance).

{per_user}

## Scale

| setting | value |
| --- | --- |
| model | {results['settings']['model']} |
| users | {len(users)} WebNLG seen categories: {', '.join(users)} |
| training per user | {s['train_size']} pairs, {s['steps']} steps of {s['batch_size']}, `{s['method']}`, init `{s['init']}` |
| shared prefix | every user's rows, {training['shared']['steps']} steps of {s['batch_size']} |
| heat map | {s['test_size']} test entries per category, greedy, at most {s['max_new_tokens']} new tokens |
| serving | {s['serve_size']} entries per user, each round |
| threads | {training['threads']} |
"""
    return write_report(out, text)
