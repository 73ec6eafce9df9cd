"""The shared study runner: the JSONL store of finished cells, and running one cell (cells: cell.py).

A *cell* is one training run and its evaluations: (study, task, method, config
values, train size, sample, seed). Its id is a hash of everything that decides
its numbers (method, hyperparameters, data sample, decoding, test sets, model),
so a re-run finds finished cells in `cells.jsonl` and skips them: a killed study
resumes where it stopped, and changing a setting re-runs only the affected cells.

Each finished cell appends one complete JSON line (written with a single
`write`, then flushed and fsynced); a torn last line from a kill is dropped when
the store is opened.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..data import Record, load_task, sample_pairs, training_pairs
from ..atomic import atomic_write_bytes
from ..memory import release_memory
from ..tracking import CURVE_FILE
from .cell import Cell, Scale

CELLS_FILE = "cells.jsonl"
CURVES_DIR = "curves"  # OUT/curves/<cell id>.png: each cell's train and dev loss
PRIMARY = {"e2e": "BLEU", "webnlg": "BLEU", "dart": "BLEU", "xsum": "ROUGE_2"}
FALLBACK = {"BLEU": "sacreBLEU"}
class CellStore:
    """`cells.jsonl`: one complete line per finished cell; a torn last line is dropped on open.

    Reads and appends hold an exclusive lock on the file, so with several workers on one study a
    reader never mistakes another worker's append in progress for a torn line (and cuts it)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def load(self) -> dict[str, dict]:
        if not self.path.is_file():
            return {}
        with open(self.path, "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            data = f.read()
            if data and not data.endswith(b"\n"):  # killed mid-write: cut the partial line so appends stay whole
                keep = data.rfind(b"\n") + 1
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
                data = data[:keep]
        lines = {}
        for raw in data.splitlines():
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(line, dict) and "id" in line:
                lines[line["id"]] = line
        return lines

    def append(self, line: dict):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(line, sort_keys=True, default=str) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


Loader = Callable[..., list[Record]]


@dataclass
class Context:
    """What a study run shares across its cells: the frozen model, the data, where things go."""

    out_dir: Path
    scale: Scale
    model_name: str
    data_dir: str | None = None
    model: object = None
    tokenizer: object = None
    loader: Loader | None = None        # (task, split, **options) -> records; default: prefixtune.data.load_task
    command: str = ""
    progress: bool = True
    _cache: dict = field(default_factory=dict)

    def records(self, task: str, split: str, **options) -> list[Record]:
        key = (task, split, json.dumps(options, sort_keys=True))
        if key not in self._cache:
            if self.loader is not None:
                self._cache[key] = self.loader(task, split, **options)
            else:
                self._cache[key] = load_task(task, split, self.data_dir, **options)
        return self._cache[key]

    def ensure_model(self):
        if self.model is None:
            from ..models import load_base_model

            self.model, self.tokenizer = load_base_model(self.model_name)
        return self.model, self.tokenizer


def test_indices(n: int, size: int | None) -> list[int]:
    """Which of a test split's `n` records a test size keeps: all, or `size` drawn with seed 0, in order."""
    if size is None or size >= n:
        return list(range(n))
    return sorted(random.Random(0).sample(range(n), size))


def select_test(records: list[Record], size: int | None) -> list[Record]:
    """A fixed subset of a test split (the same for every cell and run): `size` records drawn with seed 0, in order."""
    return [records[i] for i in test_indices(len(records), size)]


def score(task: str, hypotheses: list[str], records: list[Record], full: bool) -> dict:
    """sacreBLEU always; the task's official-equal suite when `full` (errors are recorded, not raised)."""
    from ..evaluate import grouped_bleu

    scores: dict = {"sacreBLEU": grouped_bleu(hypotheses, [r.references for r in records])}
    if full or task == "xsum":  # ROUGE needs no Java: always for summaries
        try:
            from ..metrics import score as official

            scores.update(official(task, hypotheses, [r.references for r in records], [r.meta for r in records]))
        except Exception as e:  # MetricsError, a missing Java runtime, an unfinished metric: keep going
            scores["metrics_error"] = f"{type(e).__name__}: {e}"[:300]
    return scores


def primary_metric(task: str, lines: list[dict], evaluation: str = "test") -> str:
    """The task's headline metric if every line has it, else its sacreBLEU fallback."""
    name = PRIMARY[task]
    if all(name in line["metrics"].get(evaluation, {}) for line in lines):
        return name
    return FALLBACK.get(name, name)


def line_files(line: dict) -> list[str]:
    """The files a cell's line points at (its hypotheses, its loss curve), relative to the study directory."""
    return [*line.get("hypotheses", {}).values(), *([line["curve"]] if line.get("curve") else [])]


EVAL_DECODING = "decoding"  # key of an evaluation's options that overrides the scale's beams and test size


def run_cell(cell: Cell, ctx: Context, cell_id: str) -> dict:
    """Train, decode every evaluation's test inputs, score, and return the cell's JSONL line."""
    from ..generation import DecodingConfig
    from ..models import model_spec
    from ..train import train

    scale = ctx.scale
    model, tokenizer = ctx.ensure_model()
    started = time.perf_counter()
    train_records = ctx.records(cell.task, "train", **cell.train_options)
    dev_records = ctx.records(cell.task, "dev", **cell.train_options)  # DART: `holdout` picks the held-out entries
    work = ctx.out_dir / ".work" / cell_id
    ignore = ctx.out_dir / ".work" / ".gitignore"
    if not ignore.is_file():  # checkpoints of a killed cell must never be committed with the report
        atomic_write_bytes(ignore, b"*\n")
    config = cell.train_config(scale, ctx.model_name, str(work))
    pairs = sample_pairs(training_pairs(train_records), cell.train_size, seed=cell.sample)
    dev_pairs = sample_pairs(training_pairs(dev_records), config.dev_size, seed=cell.sample) if config.dev_size else []
    result = train(config, model, tokenizer, pairs, dev_pairs, resume=True, progress=False)
    curve = Path(CURVES_DIR) / f"{cell_id}.png"  # the run's loss curve outlives its work dir: a reading can cite it
    if (work / CURVE_FILE).is_file():
        (ctx.out_dir / CURVES_DIR).mkdir(parents=True, exist_ok=True)
        os.replace(work / CURVE_FILE, ctx.out_dir / curve)
    method = result.method
    train_s = time.perf_counter() - started

    decoding = DecodingConfig(max_new_tokens=scale.max_new_tokens, num_beams=scale.beams,
                              length_penalty=scale.length_penalty, dtype=scale.decode_dtype)
    metrics, hyp_files, primary, test_sizes = {}, {}, {}, {}
    decode_start = time.perf_counter()
    decoded = {}  # loader options -> the scale's own decoding of the whole split (for a subset's comparison)
    for name, options in cell.evals.items():
        options = dict(options)
        # an evaluation may decode otherwise than the scale: {"beams": 5, "test_size": 500} (DART's beam subset)
        override = options.pop(EVAL_DECODING, {})
        split = ctx.records(cell.task, "test", **options)
        keep = test_indices(len(split), override.get("test_size", scale.test_size))
        records = [split[i] for i in keep]
        how = replace(decoding, num_beams=override.get("beams", decoding.num_beams))
        hyps = method.generate([r.source for r in records], how, batch_size=scale.decode_batch)
        path = Path("hypotheses") / f"{cell_id}.{name}.txt"
        atomic_write_bytes(ctx.out_dir / path, ("\n".join(h.replace("\n", " ") for h in hyps) + "\n").encode())
        metrics[name] = score(cell.task, hyps, records, scale.full_metrics)
        key = PRIMARY[cell.task] if PRIMARY[cell.task] in metrics[name] else FALLBACK.get(PRIMARY[cell.task])
        primary[name] = metrics[name].get(key)
        hyp_files[name] = str(path)
        test_sizes[name] = len(records)
        whole = json.dumps(options, sort_keys=True)
        if not override and len(records) == len(split):
            decoded[whole] = hyps
        elif override and whole in decoded:  # the same inputs as the scale decodes them: what the override gains
            metrics[f"{name}:scale-decoding"] = score(cell.task, [decoded[whole][i] for i in keep], records,
                                                      scale.full_metrics)
    decode_s = time.perf_counter() - decode_start
    line = {
        "id": cell_id, "study": cell.study, "task": cell.task, "method": cell.method, "label": cell.label,
        "train_size": cell.train_size, "sample": cell.sample, "seed": cell.seed, "tags": cell.tags,
        "config": cell.config(scale, ctx.model_name), "scale": scale.name,
        **({"scale_epochs": scale.final_epochs} if scale.final_epochs is not None else {}),
        **({"rates_from": scale.rates_from} if scale.rates_from else {}), "model": ctx.model_name,
        "model_type": model_spec(model).model_type,
        "metrics": metrics, "primary": primary, "test_sizes": test_sizes, "hypotheses": hyp_files,
        "train_pairs": len(pairs), "lr": config.lr if config.lr is not None else method.default_lr,
        "trainable_params": result.trainable_params, "shipped_params": result.shipped_params,
        "trainable_pct": method.trainable_percent(), "shipped_pct": method.shipped_percent(),
        "steps": result.steps, "best_step": result.best_step, "best_dev_loss": result.best_dev_loss,
        "final_dev_loss": result.final_dev_loss, "tokens_per_s": result.tokens_per_s,
        "stop_reason": result.stop_reason, "epochs_run": result.epochs_run,
        "dev_history": [[h["step"], h["dev_loss"]] for h in result.history if h.get("dev_loss") is not None],
        **({"curve": str(curve)} if (ctx.out_dir / curve).is_file() else {}),
        "train_s": round(train_s, 2), "decode_s": round(decode_s, 2),
        "elapsed_s": round(time.perf_counter() - started, 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    del method, result
    shutil.rmtree(work, ignore_errors=True)  # checkpoints (a fine-tuned copy is ~1.6 GB): not kept
    return line


@contextlib.contextmanager
def claim(path: Path):
    """Hold an exclusive lock on `path` (True) or learn that another worker holds it (False).

    Several `prefixtune experiment` processes can share one study: each runs only the cells it has
    claimed. The lock goes away with its process, so a killed worker's cell is free again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_cells(planner: Callable[[dict], list[Cell]], ctx: Context, desc: str, poll_s: float = 20.0,
              complete: Callable[[dict], bool] = lambda done: False) -> dict:
    """Run unfinished cells until the plan has none left; returns every finished line by id.

    `planner(done)` gives the cells known so far from the finished lines (a learning-rate sweep
    adds a configuration's cells once its sweep has finished), so the plan is asked again after
    every cell. Cells claimed by another worker are skipped; when only those are left, this worker
    waits for them, since their lines may add cells to the plan, unless `complete(done)` says the
    plan can no longer grow: then it returns and is free for the next study.
    """
    from tqdm.auto import tqdm

    store = CellStore(ctx.out_dir / CELLS_FILE)
    locks = ctx.out_dir / ".work"
    with tqdm(desc=desc, unit="cell", dynamic_ncols=True, disable=not ctx.progress) as bar:
        while True:
            done = store.load()
            planned = {c.id(ctx.scale, ctx.model_name): c for c in planner(done)}
            todo = [(i, c) for i, c in planned.items() if i not in done]
            bar.total, bar.n = len(planned), len(planned) - len(todo)
            bar.refresh()
            if not todo:
                return done
            ran = False
            for cell_id, cell in todo:
                with claim(locks / f"{cell_id}.lock") as mine:
                    if not mine or cell_id in store.load():  # another worker's, or it finished meanwhile
                        continue
                    bar.set_postfix_str(f"{cell.label} n={cell.train_size} s{cell.sample} seed{cell.seed} "
                                        f"lr={cell.params.get('lr', '-')}")
                    store.append(run_cell(cell, ctx, cell_id))
                    (locks / f"{cell_id}.lock").unlink(missing_ok=True)  # a late opener sees the line and skips
                    release_memory()  # else the next cell starts on this one's peak (memory.py)
                    ran = True
                    break
            if not ran:
                if complete(done):
                    return done
                time.sleep(poll_s)
