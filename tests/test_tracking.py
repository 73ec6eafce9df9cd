"""Watching a run: TensorBoard through accelerate's trackers, the loss-curve PNG, a missing tracker's one line."""
from __future__ import annotations

import json
import struct
import sys

import pytest
import torch
from typer.testing import CliRunner

torch.set_num_threads(1)

from conftest import error_line, tiny_model
from prefixtune.cli import app
from prefixtune.tracking import CURVE_FILE, LOG_DIR, PROJECT, check_trackers, log_user_dev_losses, write_loss_curve
from prefixtune.train import TrainConfig, train

PAIRS = [(f"name : Place{i} | food : {f}", f"Place{i} serves {f} food.") for i, f in
         enumerate(["Thai", "French", "Chinese", "Italian", "English", "Indian"] * 3)]
PNG = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG
    return struct.unpack(">II", data[16:24])


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under `log_dir`, read back by TensorBoard itself."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_tensorboard_gets_losses_lr_and_throughput_at_every_evaluation(tokenizer, tmp_path):
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    config = TrainConfig(output_dir=str(run_dir), max_steps=6, batch_size=4, lr=5e-3, prefix_len=3, mlp_dim=16,
                         eval_every=2, save_every=0, seed=7, precision="fp32", report_to="tensorboard")
    result = train(config, tiny_model("llama"), tokenizer, PAIRS, PAIRS[:4], progress=False)

    logged = scalars(run_dir / LOG_DIR / PROJECT)
    assert {"train/loss", "dev/loss", "train/lr", "train/tokens_per_s"} <= set(logged)
    evaluations = [h["step"] for h in result.history]
    assert evaluations == [2, 4, 6]
    for tag in ("train/loss", "dev/loss", "train/lr", "train/tokens_per_s"):
        assert [step for step, _ in logged[tag]] == evaluations, tag
    assert [v for _, v in logged["dev/loss"]] == pytest.approx([h["dev_loss"] for h in result.history], rel=1e-6)
    # train/loss is the mean over the steps since the previous evaluation (2 steps here), not one step's loss
    seen = []
    train(TrainConfig(**{**config.__dict__, "output_dir": str(tmp_path / "again"), "report_to": "none"}),
          tiny_model("llama"), tokenizer, PAIRS, PAIRS[:4], progress=False,
          on_step=lambda step, logs, module: seen.append(logs["loss"]))
    means = [sum(seen[i:i + 2]) / 2 for i in (0, 2, 4)]
    assert [v for _, v in logged["train/loss"]] == pytest.approx(means, rel=1e-5)
    assert [h["train_loss"] for h in result.history] == pytest.approx(means, rel=1e-5)
    assert not (tmp_path / "again" / LOG_DIR).exists()  # no tracker asked for: nothing written for one

    # the curve, and `info` says where it is
    assert png_size(run_dir / CURVE_FILE) == (600, 360)
    shown = CliRunner().invoke(app, ["info", str(run_dir)])
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.stdout)
    assert info["loss_curve"] == str(run_dir / CURVE_FILE)
    assert info["tracker_logs"] == str(run_dir / LOG_DIR)


def test_user_dev_losses_reach_the_tracker(tmp_path):
    pytest.importorskip("tensorboard")
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    accelerator = Accelerator(cpu=True, log_with="tensorboard",
                              project_config=ProjectConfiguration(project_dir=str(tmp_path), logging_dir=str(tmp_path)))
    accelerator.init_trackers(PROJECT)
    log_user_dev_losses(accelerator, 10, {"alice": 1.5, "bob": 2.25})
    log_user_dev_losses(accelerator, 20, {"alice": 1.25, "bob": 2.0})
    for tracker in accelerator.trackers:
        tracker.finish()
    logged = scalars(tmp_path)
    assert logged["dev/loss/alice"] == [(10, 1.5), (20, 1.25)]
    assert logged["dev/loss/bob"] == [(10, 2.25), (20, 2.0)]


def test_the_curve_marks_the_best_step(tmp_path):
    history = [{"step": 10, "loss": 2.0, "train_loss": 2.2, "dev_loss": 2.1},
               {"step": 20, "loss": 1.5, "train_loss": 1.6, "dev_loss": 1.7},
               {"step": 30, "loss": 1.2, "train_loss": 1.3, "dev_loss": 1.9}]
    marked, plain = tmp_path / "marked.png", tmp_path / "plain.png"
    assert write_loss_curve(history, 20, marked) == marked
    assert write_loss_curve(history, None, plain) == plain
    assert png_size(marked) == png_size(plain) == (600, 360)
    assert marked.read_bytes() != plain.read_bytes()  # the marker and its legend entry are drawn
    assert write_loss_curve([], None, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    # a run without dev pairs: train loss alone, nothing to mark
    assert write_loss_curve([{"step": 5, "loss": 1.0, "dev_loss": None}], None, tmp_path / "train.png")



def test_a_tracker_that_is_not_installed_is_one_line_naming_its_extra(tmp_path, monkeypatch):
    for module in ("tensorboard", "tensorboardX", "wandb"):  # None in sys.modules: `import` raises ImportError
        monkeypatch.setitem(sys.modules, module, None)
    # a model that cannot load and no data: the tracker is checked before either
    args = ["train", "-o", str(tmp_path / "run"), "--model", "/no/such/model-dir", "--data-dir", str(tmp_path / "no")]
    line = error_line(CliRunner().invoke(app, args + ["--report-to", "tensorboard"]))
    assert "tensorboard is not installed" in line and "pip install 'prefixtune[tensorboard]'" in line
    line = error_line(CliRunner().invoke(app, args + ["--report-to", "none,wandb"]))
    assert "pip install 'prefixtune[wandb]'" in line
    line = error_line(CliRunner().invoke(app, args + ["--report-to", "tensorbored"]))
    assert "unknown tracker 'tensorbored'" in line
    assert not (tmp_path / "run").exists()  # nothing half-written
    assert "tensorboard" not in check_trackers("all") and "wandb" not in check_trackers("all")
    assert check_trackers("none") == check_trackers(None) == check_trackers("") == []
    # names are case-insensitive ("TensorBoard" is tensorboard), "none" as well
    assert check_trackers("None") == check_trackers("NONE") == []


def test_every_tracker_names_an_extra_that_installs_it():
    import tomllib

    from conftest import REPO
    from prefixtune.tracking import TRACKERS

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name, (modules, extra) in TRACKERS.items():
        assert extra in extras, name
        wanted = {req.split(">")[0].split("<")[0].split("=")[0].strip().replace("-", "_") for req in extras[extra]}
        assert wanted & set(modules), (name, extras[extra])


def test_a_tracker_that_does_not_start_is_a_value_error_naming_it(tmp_path):
    from prefixtune.tracking import TrainingLog

    class NotLoggedIn:  # what an Accelerator with a W&B tracker does without a login
        trackers, is_main_process = [], True

        def init_trackers(self, *args, **kwargs):
            raise RuntimeError("api key not configured")

    watch = TrainingLog("none", tmp_path)
    watch.trackers = ["wandb"]  # as if installed
    with pytest.raises(ValueError, match="--report-to wandb: the tracker did not start: RuntimeError: api key"):
        watch.step(NotLoggedIn(), {"step": 1, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 10.0}, [])


def test_a_reused_cell_brings_its_curve(tmp_path):
    from prefixtune.experiments import copy_reused
    from prefixtune.experiments.runner import CellStore

    source = tmp_path / "sweep-study"
    line = {"id": "abc", "hypotheses": {"test": "hypotheses/abc.test.txt"}, "curve": "curves/abc.png"}
    (source / "hypotheses").mkdir(parents=True)
    (source / "hypotheses" / "abc.test.txt").write_text("a sentence\n")
    write_loss_curve([{"step": 1, "loss": 1.0, "dev_loss": 1.1}], 1, source / "curves" / "abc.png")
    store = CellStore(tmp_path / "study" / "cells.jsonl")
    assert copy_reused(store, lambda done: ["abc"], {"abc": line}, source) == 1
    assert (tmp_path / "study" / "curves" / "abc.png").read_bytes() == (source / "curves" / "abc.png").read_bytes()


def test_a_many_users_job_logs_each_users_losses_and_checks_its_tracker(tokenizer, tmp_path):
    """--report-to with --user-field: checked as a single run's, and each user's losses reach the tracker."""
    from prefixtune.users import train_users

    with pytest.raises(ValueError, match="unknown tracker 'nosuchtracker'"):
        train_users(TrainConfig(output_dir=str(tmp_path / "bad"), report_to="nosuchtracker"),
                    train={"ann": PAIRS[:4]})
    assert not (tmp_path / "bad").exists()
    pytest.importorskip("tensorboard")
    config = TrainConfig(output_dir=str(tmp_path / "users"), method="prefix-flat", max_steps=4, batch_size=2,
                         eval_every=2, prefix_len=3, lr=5e-3, precision="fp32", report_to="tensorboard")
    result = train_users(config, tiny_model("llama"), tokenizer, {"ann": PAIRS[:6], "bob": PAIRS[6:10]},
                         {"ann": PAIRS[10:12], "bob": PAIRS[12:14]}, progress=False)
    logged = scalars(tmp_path / "users" / LOG_DIR / PROJECT)
    rows = {r["user"]: r for r in result.users}
    for user in ("ann", "bob"):
        assert [step for step, _ in logged[f"train/loss/{user}"]] == [2, 4]
        assert [step for step, _ in logged[f"dev/loss/{user}"]] == [2, 4]
        assert logged[f"dev/loss/{user}"][-1][1] == pytest.approx(rows[user]["final_dev_loss"], rel=1e-6)
