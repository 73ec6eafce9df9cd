"""The benchmark scripts' own logic (no timing: what they compare, and how they refuse bad arguments)."""
from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


def test_train_throughput_peft_takes_as_many_steps_as_ours():
    # the trainer goes on into a second epoch for --steps; PEFT's loop stopped after one (25 of 30 steps at the
    # defaults: 200 rows, batch 8), so its dev loss was compared after fewer steps
    from train_throughput import peft_batches

    batches = peft_batches(200, 8, 30, seed=1)
    assert len(batches) == 30 and all(len(b) == 8 for b in batches)
    assert sorted(i for b in batches[:25] for i in b) == list(range(200))  # the first epoch: every row once
    assert batches[25:] != batches[:5]  # a new shuffle for the next epoch
    assert len(peft_batches(200, 8, 3, seed=1)) == 3


SCRIPTS = ("decode_adapter", "decode_dtype_quality", "decode_throughput", "serve_load", "serve_mixed", "share_passes",
           "tenant_steps", "train_many", "train_profile", "train_throughput")


def run_main(monkeypatch, script: str, *argv: str):
    """The script's main() on these arguments, as `python benchmarks/SCRIPT.py ARGV` would run it."""
    import importlib

    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    return module.main()


def usage_error(monkeypatch, capsys, script: str, *argv: str) -> str:
    import pytest

    extra = ("--prefix", "p.safetensors") if script == "decode_dtype_quality" else ()  # its required flag
    with pytest.raises(SystemExit) as exit_:
        run_main(monkeypatch, script, *extra, *argv)
    assert exit_.value.code == 2, (script, argv)  # argparse's usage error, before any model loads
    return capsys.readouterr().err


def test_negative_threads_are_a_usage_error(monkeypatch, capsys):
    # torch.set_num_threads(-1) raised a RuntimeError traceback (in the scripts that set it)
    for script in SCRIPTS:
        err = usage_error(monkeypatch, capsys, script, "--threads", "-1")
        assert "argument --threads: must be >= " in err and "got -1" in err, script
    for script in ("serve_load", "train_many"):  # their threads are other processes': 0 means nothing there
        assert "--threads: must be >= 1, got 0" in usage_error(monkeypatch, capsys, script, "--threads", "0"), script


class Loaded(Exception):
    """Raised in place of loading the model: the arguments were taken."""


def test_threads_0_means_pytorchs_default(monkeypatch):
    # tenant_steps and serve_mixed called torch.set_num_threads(0): a RuntimeError traceback
    import pytest
    import torch

    import prefixtune.models
    import serve_mixed

    def load(*a, **k):
        raise Loaded

    before = torch.get_num_threads()
    monkeypatch.setattr(prefixtune.models, "load_base_model", load)
    monkeypatch.setattr(serve_mixed, "load_base_model", load)
    try:
        for script in ("tenant_steps", "serve_mixed"):
            with pytest.raises(Loaded):
                run_main(monkeypatch, script, "--threads", "0")
            assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


BAD_ARGUMENTS = [  # each was a traceback (some only after the whole run), or a run that measured nothing
    ("train_throughput", "--rounds", "0"),  # ZeroDivisionError once the (zero) rounds were done
    ("train_throughput", "--steps", "0"),
    ("train_profile", "--steps", "0"),  # ZeroDivisionError after the warm-up steps
    ("train_profile", "--method", "lora"),  # ValueError from build_method, after loading the model
    ("train_profile", "--precision", "fp16"),  # ValueError from TrainConfig, after loading the model
    ("decode_throughput", "--batch-size", "0"),  # range() step 0, after loading the model
    ("decode_throughput", "--rounds", "0"),
    ("decode_adapter", "--rounds", "0"),
    ("decode_adapter", "--dtypes", "fp16"),  # ValueError from DecodingConfig, after loading the model
    ("decode_dtype_quality", "--limit", "0"),
    ("serve_mixed", "--rounds", "0"),  # ZeroDivisionError after loading the model
    ("serve_mixed", "--requests", "0"),
    ("tenant_steps", "--rate", "0"),
    ("tenant_steps", "--seconds", "-1"),
    ("train_many", "--steps", "0"),
    ("train_many", "--memory-only"),  # a job of 0 users, which failed in its subprocess
    ("train_many", "--memory-users", "1"),
    ("train_many", "--precision", "fp16"),
    ("serve_load", "--seconds", "0"),
    ("serve_load", "--min-tokens", "64", "--max-tokens", "8"),
    ("serve_load", "--tenants", "20", "--prefixes", "10"),  # tenants with no prefix: an IndexError mid-load
    ("serve_load", "--tenants", "1", "--phases", "saturation,beam"),  # the beam phase takes two tenants
]


def test_bad_arguments_are_usage_errors(monkeypatch, capsys):
    for script, *argv in BAD_ARGUMENTS:
        err = usage_error(monkeypatch, capsys, script, *argv)
        assert f"{script}.py: error: " in err and "Traceback" not in err, (script, argv, err)


def test_tenant_steps_refuses_a_phase_with_no_arrival():
    import pytest
    from tenant_steps import condition

    with pytest.raises(SystemExit, match="no greedy request arrives"):
        condition(None, None, [[1]], 0, 4, seconds=0.01, rate=0.01)


def test_train_many_compares_the_processes_cpu_time_too(tiny_dir, data_dir, tmp_path):
    # the joint job and the separate runs are different processes: their wall-clock ratio alone moves with
    # whatever else the machine runs; the CPU time of each process is now measured beside it
    import json
    import subprocess

    done = subprocess.run([sys.executable, str(BENCHMARKS / "train_many.py"), "--model", str(tiny_dir),
                           "--data-dir", str(data_dir), "--users", "2", "--examples", "8", "--dev", "2", "--steps",
                           "1", "--batch-size", "4", "--precision", "fp32", "--work-dir", str(tmp_path), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["joint"]["cpu_s"] > 0 and out["separate"]["cpu_s"] > 0
    assert out["ratio_vs_separate_runs_cpu"] > 0 and out["ratio_vs_separate_runs"] > 0
    assert out["same_steps"] is True and out["users"] == 2
    # --precision reaches every training process: in fp32 the joint job's prefixes are the lone runs' (1e-5)
    assert out["precision"] == "fp32" and out["max_rel_diff_vs_separate"] < 1e-5
