"""A study's cells as Ray tasks (`prefixtune experiment ... --ray [ADDRESS]`): one machine or a cluster.

The driver (the process that runs the command) plans the cells, submits every runnable one as a Ray
task asking for the CPUs or the GPU it needs, and appends each finished cell's line to
`cells.jsonl` itself as tasks finish: the nodes never write to OUT, so nothing depends on a cluster's
shared file system honouring locks. A learning-rate sweep makes the plan grow as its cells finish, so
the driver asks the planner again after every finished cell. It claims each cell's lock in OUT/.work
before submitting it, as today's workers do, so workers (or a second driver) on the same study and
machine run none of its cells twice; a cell another process holds is waited for, not run.

A task runs the same `run_cell` as today's workers, in a scratch directory on its node, and returns
the line with the files the line names (hypotheses, loss curve); the driver writes them under OUT,
so a cluster needs no shared file system. A task whose worker process or node dies is submitted
again, up to `retries` times; the line records its `attempts`, and the report counts the retried cells.
A cell that raises an error is not retried: the tasks already running finish and are recorded, then
the error is raised.
"""
from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..atomic import atomic_write_bytes
from ..memory import release_memory
from .cell import Cell, Scale
from .runner import CELLS_FILE, CellStore, Context, Loader, claim, line_files, run_cell

RAY_EXTRA = "pip install 'prefixtune[ray]'"
POLL_S = 20.0  # how often a driver looks again at cells that another process holds


class CellDied(RuntimeError):
    """A cell whose task died more often than it may be retried."""


def require_ray():
    """The `ray` module, or a ValueError that names the extra to install."""
    try:
        import ray
    except ImportError:
        raise ValueError(f"--ray needs Ray, which is not installed: {RAY_EXTRA}") from None
    return ray


@dataclass
class CellTask:
    """What a task needs besides its cell: everything of the driver's `Context` but the loaded model."""

    scale: Scale
    model_name: str
    data_dir: str | None
    loader: Loader | None
    threads: int


_MODELS: dict = {}  # model name -> (model, tokenizer): a worker process loads a model once for all its tasks


def run_cell_task(task: CellTask, cell: Cell, cell_id: str, model_and_tokenizer=None) -> tuple[dict, dict]:
    """Runs on a Ray worker: the cell in a scratch directory of its node; returns (line, {relative path: bytes}).

    A killed attempt's scratch directory keeps its checkpoints, so a retry on the same node resumes from the
    last one (with the scale's `save_every`)."""
    import torch

    torch.set_num_threads(task.threads)
    if model_and_tokenizer is None:  # a cluster: each worker loads the model by name, once
        if task.model_name not in _MODELS:
            from ..models import load_base_model

            _MODELS[task.model_name] = load_base_model(task.model_name)
        model_and_tokenizer = _MODELS[task.model_name]
    scratch = Path(tempfile.gettempdir()) / "prefixtune-ray" / cell_id
    ctx = Context(scratch, task.scale, task.model_name, task.data_dir, *model_and_tokenizer, task.loader,
                  progress=False)
    line = run_cell(cell, ctx, cell_id)
    files = {rel: (scratch / rel).read_bytes() for rel in line_files(line)}
    shutil.rmtree(scratch, ignore_errors=True)
    release_memory()  # a worker process runs task after task: each starts on the last one's peak otherwise
    return line, files


def run_cells_on_ray(planner: Callable[[dict], list[Cell]], ctx: Context, desc: str, address: str | None = None,
                     retries: int = 2, cpus_per_cell: int = 1, gpus_per_cell: float | None = None,
                     complete: Callable[[dict], bool] = lambda done: False) -> dict:
    """Run the plan's unfinished cells as Ray tasks until the plan has none left; returns every finished line by id.

    Cells that another process has claimed (a worker beside the driver) are not run: the driver waits for
    their lines, which may add cells to the plan, unless `complete(done)` says the plan can no longer grow.

    `address`: "local" (a new Ray on this machine), a running cluster ("auto", "HOST:6379", "ray://HOST:10001"),
    or None (`ray.init()`'s own choice); a Ray this process has already started is used as it is.
    `gpus_per_cell`: default 1 when the cluster has GPUs, else 0. A model loaded in `ctx` (the tests' tiny one)
    is shipped to the tasks; otherwise each worker loads `ctx.model_name` itself.
    """
    from tqdm.auto import tqdm

    ray = require_ray()
    started_here = not ray.is_initialized()
    if started_here:
        try:
            # a new Ray on this machine talks to itself over loopback, not the machine's network address
            ray.init(address=address, **({"_node_ip_address": "127.0.0.1"} if address == "local" else {}))
        except (ConnectionError, RuntimeError) as e:  # no cluster there, or its token is missing: one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"--ray {address or 'local'}: could not start or join Ray: {first} (a cluster with "
                             f"token authentication needs RAY_AUTH_MODE=token and its token; docs/experiments.md)") \
                from e
    if gpus_per_cell is None:
        gpus_per_cell = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    remote = ray.remote(run_cell_task).options(num_cpus=cpus_per_cell, num_gpus=gpus_per_cell, max_retries=0)
    task = CellTask(ctx.scale, ctx.model_name, ctx.data_dir, ctx.loader, cpus_per_cell)
    model_ref = ray.put((ctx.model, ctx.tokenizer)) if ctx.model is not None else None
    store = CellStore(ctx.out_dir / CELLS_FILE)
    locks = ctx.out_dir / ".work"
    done = store.load()
    running: dict = {}  # ObjectRef -> (cell id, cell, attempt)
    held: dict[str, contextlib.ExitStack] = {}  # cell id -> its claimed lock, held until its line is written
    failure: BaseException | None = None

    def submit(cell_id: str, cell: Cell, attempt: int):
        running[remote.remote(task, cell, cell_id, model_ref)] = (cell_id, cell, attempt)

    def take(cell_id: str) -> bool:
        lock = contextlib.ExitStack()
        if not lock.enter_context(claim(locks / f"{cell_id}.lock")):
            lock.close()
            return False
        held[cell_id] = lock
        return True

    def release(cell_id: str, finished: bool):
        if finished:  # a late opener sees the line and skips, as with today's workers
            (locks / f"{cell_id}.lock").unlink(missing_ok=True)
        held.pop(cell_id).close()

    try:
        with tqdm(desc=desc, unit="cell", dynamic_ncols=True, disable=not ctx.progress) as bar:
            while True:
                done = store.load()  # workers beside the driver append too
                elsewhere = 0  # planned cells that another process holds
                if failure is None:  # after a failure no new cell starts; the running ones are still recorded
                    planned = {c.id(ctx.scale, ctx.model_name): c for c in planner(done)}
                    for cell_id, cell in planned.items():
                        if cell_id in done or cell_id in held:
                            continue
                        if not take(cell_id):
                            elsewhere += 1
                        elif cell_id in store.load():  # it finished meanwhile
                            release(cell_id, finished=True)
                        else:
                            submit(cell_id, cell, 1)
                    bar.total, bar.n = len(planned), sum(i in done for i in planned)
                    bar.refresh()
                if not running:
                    if not elsewhere or complete(done):
                        break
                    time.sleep(POLL_S)
                    continue
                ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S if elsewhere else None)
                if not ready:
                    continue
                ref = ready[0]
                cell_id, cell, attempt = running.pop(ref)
                try:
                    line, files = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # the cell raised: the same error would come again
                    failure = failure or e.as_instanceof_cause()
                    release(cell_id, finished=False)
                    continue
                except ray.exceptions.RayError as e:  # its worker process or node died
                    if attempt > retries:
                        why = (str(e).strip().splitlines() or [""])[0][:300]
                        failure = failure or CellDied(f"cell {cell_id} ({cell.label}) died {attempt} times; "
                                                      f"last: {type(e).__name__}: {why}")
                        release(cell_id, finished=False)
                    else:  # on stderr, with the progress bar: stdout carries the command's JSON
                        bar.write(f"cell {cell_id} ({cell.label}): its task died ({type(e).__name__}); "
                                  f"retry {attempt} of {retries}", file=sys.stderr)
                        submit(cell_id, cell, attempt + 1)
                    continue
                for rel, data in files.items():  # the files first: a line in the store points at whole files
                    atomic_write_bytes(ctx.out_dir / rel, data)
                line["attempts"] = attempt
                store.append(line)
                done[cell_id] = line
                release(cell_id, finished=True)
    finally:
        for ref in running:  # interrupted: the cluster's tasks stop with the driver
            ray.cancel(ref, force=True)
        for cell_id in list(held):
            release(cell_id, finished=False)
        if started_here:
            ray.shutdown()
    if failure is not None:
        raise failure
    return store.load()
