"""A study on a local Ray (`--ray`): the same cells and numbers as today's workers, a dead task retried and
counted, a resumed study running only its missing cells, and one `error:` line where Ray is missing."""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

torch.set_num_threads(1)

from conftest import ByteTokenizer, tiny_model
from prefixtune.cli import app
from test_experiments import lines_of, synthetic

TESTS = Path(__file__).resolve().parent
NUMBERS = ("metrics", "primary", "best_dev_loss", "final_dev_loss", "best_step", "steps", "dev_history", "lr",
           "train_pairs", "config", "test_sizes", "stop_reason")


class DiesOnce:
    """The synthetic loader, except that the first task to call it kills its worker process (as an OOM kill or a
    lost node would): the marker file says whether that has happened."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __call__(self, task, split, **options):
        if not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)
        return synthetic(task, split, **options)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    # workers import this module (the loader) and prefixtune: they inherit the environment at ray.init. Ray's
    # memory monitor stays off: on a busy machine it could kill a task, a death the test did not plan.
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), *sys.path) if p), "RAY_memory_monitor_refresh_ms": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # "local": a new instance even where `ray start` left a cluster (ray.init() would join it)
    ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=100 * 1024 ** 2,
             log_to_driver=False, _node_ip_address="127.0.0.1")  # loopback only
    yield ray
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k)
        else:
            os.environ[k] = v


def run_lowdata_with_a_sweep(out, monkeypatch, **kw):
    """lowdata at tiny scale with a learning-rate sweep: the final cells join the plan only once the sweep has
    finished, so a driver that did not re-plan as tasks finish would stop short."""
    from prefixtune.experiments import lowdata, run_experiment

    tiny = lowdata.make_scale("tiny", "e2e")
    swept = replace(tiny, lr_sweep={"prefix": (1e-3, 3e-2), "finetune": (1e-4, 1e-3)}, sweep_size=6,
                    early_stop_patience=1, eval_every=1)
    monkeypatch.setattr(lowdata, "make_scale", lambda scale, task: swept)
    kw.setdefault("loader", synthetic)
    return run_experiment("lowdata", "e2e", "tiny", out=out, model_obj=tiny_model("llama"), tokenizer=ByteTokenizer(),
                          progress=False, **kw)


def by_id(out):
    return {line["id"]: line for line in lines_of(out)}


def assert_same_cells(workers_out, ray_out):
    a, b = by_id(workers_out), by_id(ray_out)
    assert sorted(a) == sorted(b)
    for cell_id, line in a.items():
        for key in NUMBERS:
            assert b[cell_id][key] == line[key], (cell_id, key)
        for rel in line["hypotheses"].values():
            assert (ray_out / rel).read_text() == (workers_out / rel).read_text()
        assert (ray_out / b[cell_id]["curve"]).read_bytes()[:4] == b"\x89PNG"


def test_a_study_on_local_ray_equals_todays_workers(local_ray, tmp_path, monkeypatch):
    workers = run_lowdata_with_a_sweep(tmp_path / "workers", monkeypatch)
    assert workers["ran"] == 6 and workers["retried"] == 0

    out = tmp_path / "ray"
    marker = tmp_path / "died"
    result = run_lowdata_with_a_sweep(out, monkeypatch, ray=True, loader=DiesOnce(marker))
    assert marker.exists()  # a task did die ...
    assert result["ran"] == 6 and result["cells"] == workers["cells"] == 4
    assert_same_cells(tmp_path / "workers", out)  # ... and the study is the same, cell for cell
    attempts = [line["attempts"] for line in lines_of(out)]
    assert sorted(attempts) == [1] * 5 + [2] and result["retried"] == 1
    report = (out / "report.md").read_text()
    assert "1 cell(s) ran again after their Ray task died" in report
    # tasks work in their node's scratch space; the driver writes OUT (its cell locks are gone once a line is in)
    assert not (out / ".work").exists() or not any((out / ".work").iterdir())

    # resume: the final cells' lines are lost; only they run again
    kept = [json.dumps(l, sort_keys=True) for l in lines_of(out) if l["train_size"] == 6]
    (out / "cells.jsonl").write_text("\n".join(kept) + "\n")
    again = run_lowdata_with_a_sweep(out, monkeypatch, ray=True)
    assert again["ran"] == 2
    assert_same_cells(tmp_path / "workers", out)


def test_a_cell_that_a_worker_beside_the_driver_holds_is_waited_for_not_run_twice(local_ray, tmp_path, monkeypatch):
    from prefixtune.experiments import ray_runner
    from prefixtune.experiments.runner import CellStore, claim, line_files

    run_lowdata_with_a_sweep(tmp_path / "workers", monkeypatch)
    theirs = by_id(tmp_path / "workers")
    sweep_ids = sorted(i for i, line in theirs.items() if line["train_size"] == 6)  # the sweep's cells
    held_id = sweep_ids[0]  # its configuration's final cell needs it: the driver must wait for this one
    out = tmp_path / "ray"
    monkeypatch.setattr(ray_runner, "POLL_S", 0.2)
    holding = threading.Event()

    def worker():  # a `prefixtune experiment` worker on the same study: it holds the cell, runs it, writes it
        with claim(out / ".work" / f"{held_id}.lock") as mine:
            assert mine
            holding.set()
            store = CellStore(out / "cells.jsonl")
            deadline = time.monotonic() + 600
            while not set(sweep_ids[1:]) <= set(store.load()) and time.monotonic() < deadline:
                time.sleep(0.1)  # the driver runs the other sweep cells meanwhile
            for rel in line_files(theirs[held_id]):
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_bytes((tmp_path / "workers" / rel).read_bytes())
            store.append(theirs[held_id])

    thread = threading.Thread(target=worker)
    thread.start()
    holding.wait()
    result = run_lowdata_with_a_sweep(out, monkeypatch, ray=True)
    thread.join()
    ids = [line["id"] for line in lines_of(out)]
    assert sorted(ids) == sorted(theirs)  # every cell once: the held one was not run a second time
    assert "attempts" not in by_id(out)[held_id]  # its line is the worker's, not a Ray task's
    assert result["cells"] == 4
    assert_same_cells(tmp_path / "workers", out)


class Broken(ValueError):
    pass


def broken_loader(task, split, **options):
    if split == "test":
        raise Broken("no test split here")
    return synthetic(task, split, **options)


def test_a_cell_that_raises_is_not_retried_and_its_error_comes_back(local_ray, tmp_path, monkeypatch):
    with pytest.raises(Broken, match="no test split here"):
        run_lowdata_with_a_sweep(tmp_path / "broken", monkeypatch, ray=True, loader=broken_loader)
    assert not (tmp_path / "broken" / "cells.jsonl").exists()


def test_ray_that_is_not_installed_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = CliRunner().invoke(app, ["experiment", "lowdata", "--scale", "tiny", "--out", str(tmp_path / "study"),
                                      "--model", "/no/such/model-dir", "--ray", "local"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "pip install 'prefixtune[ray]'" in lines[0]
    assert not (tmp_path / "study").exists()


def always_dies(task, split, **options):
    os._exit(1)


def test_a_cell_whose_task_keeps_dying_stops_the_study_with_one_message(local_ray, tmp_path):
    from prefixtune.experiments import lowdata
    from prefixtune.experiments.ray_runner import CellDied, run_cells_on_ray
    from prefixtune.experiments.runner import Context

    scale = lowdata.make_scale("tiny", "e2e")
    cell = lowdata.make_cells("e2e", scale)[0]
    ctx = Context(tmp_path, scale, "tiny-llama", model=tiny_model("llama"), tokenizer=ByteTokenizer(),
                  loader=always_dies, progress=False)
    with pytest.raises(CellDied, match=rf"cell {cell.id(scale, 'tiny-llama')} \(prefix\) died 2 times"):
        run_cells_on_ray(lambda done: [cell], ctx, "dies", retries=1)
    assert not (tmp_path / "cells.jsonl").exists()


def test_a_cluster_that_cannot_be_joined_is_one_line(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")

    def no_cluster(address=None, **kwargs):
        raise ConnectionError(f"Failed to connect to Ray cluster at {address}")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    result = CliRunner().invoke(app, ["experiment", "lowdata", "--scale", "tiny", "--out", str(tmp_path / "study"),
                                      "--model", "/no/such/model-dir", "--ray", "10.0.0.9:6379"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --ray 10.0.0.9:6379: could not start or join Ray: "
                                                   "Failed to connect to Ray cluster at 10.0.0.9:6379"), lines
    assert not (tmp_path / "study" / "cells.jsonl").exists()
