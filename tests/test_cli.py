"""The CLI as a user runs it: train, info, export, generate (args, file, stdin), eval, and clear errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

PAIRS_SRC = ["name : Aromi | food : Thai", "name : Zizzi | area : riverside", "name : The Mill | price : cheap"]


def run(*args, stdin=None, check=True):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-m", "prefixtune.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_train_export_info_generate_eval(tiny_dir, tmp_path, data_dir):
    out = tmp_path / "run"
    res = run("train", "-o", out, "--model", tiny_dir, "--data-dir", data_dir, "--train-size", 16, "--max-steps", 4,
              "--batch-size", 4, "--prefix-len", 3, "--mlp-dim", 16, "--eval-every", 2, "--dev-size", 8,
              "--init", "words:table-to-text:")
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 4 and os.path.isfile(summary["prefix_file"])

    info = json.loads(run("info", summary["prefix_file"]).stdout)
    assert info["prefix_len"] == 3 and info["shapes"]["decoder"] == [3, 2 * 2 * 2 * 8]
    assert info["groups"] == {"decoder": 2} and info["model_spec"]["num_layers"] == 2  # real JSON, not strings

    exported = tmp_path / "again.safetensors"
    run("export", out, "--out", exported)
    assert json.loads(run("info", exported).stdout)["sha256"] == info["sha256"]  # best step, same P

    generated = run("generate", "--model", tiny_dir, "--prefix", exported, "--max-new-tokens", 5, *PAIRS_SRC)
    by_args = generated.stdout
    assert len(by_args.splitlines()) == 3
    assert "Loading weights" not in generated.stderr  # no progress bar for loading a local model
    src_file = tmp_path / "inputs.txt"
    src_file.write_text("\n".join(PAIRS_SRC) + "\n")
    by_file = run("generate", "--model", tiny_dir, "--prefix", exported, "--max-new-tokens", 5,
                  "--input-file", src_file).stdout
    by_stdin = run("generate", "--model", tiny_dir, "--prefix", exported, "--max-new-tokens", 5,
                   stdin="\n".join(PAIRS_SRC)).stdout
    by_run_dir = run("generate", "--model", tiny_dir, "--prefix", out, "--max-new-tokens", 5, *PAIRS_SRC).stdout
    assert by_args == by_file == by_stdin == by_run_dir  # a training directory means the prefix inside it

    eval_dir = tmp_path / "eval"
    scores = json.loads(run("eval", "--model", tiny_dir, "--prefix", exported, "--data-dir", data_dir, "--limit", 4,
                            "--max-new-tokens", 5, "--out-dir", eval_dir, "--bleu-only").stdout.splitlines()[-1])
    assert "sacreBLEU" in scores
    assert len((eval_dir / "hypotheses.txt").read_text().splitlines()) == 4


def test_clear_errors(tiny_dir, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    proc = run("generate", "--model", tiny_dir, "--prefix", bad, "x", check=False)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("train", "-o", tmp_path / "r", "--model", tiny_dir, "--task", "nope", check=False)
    assert proc.returncode == 2 and "unknown task" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("export", tmp_path / "missing", check=False)
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr


def test_finetune_output_works_with_info_generate_and_eval(tiny_dir, tmp_path, data_dir):
    """Every method's export decodes with the CLI (tests/test_methods.py checks each method's tokens)."""
    from typer.testing import CliRunner

    from prefixtune.cli import app

    def invoke(*args):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result

    out = tmp_path / "ft"
    invoke("train", "-o", out, "--model", tiny_dir, "--method", "finetune", "--data-dir", data_dir,
           "--train-size", 8, "--max-steps", 2, "--batch-size", 4, "--eval-every", 0, "--dev-size", 4)
    weights = out / "finetuned-model.safetensors"
    assert weights.is_file() and not (out / "prefix.safetensors").exists()
    info = json.loads(invoke("info", weights).stdout)
    assert info["method"] == "finetune" and info["format"] == "prefixtune.weights/1" and info["params"] > 0
    by_dir = invoke("generate", "--model", tiny_dir, "--prefix", out, "--max-new-tokens", 4, *PAIRS_SRC).stdout
    by_file = invoke("generate", "--model", tiny_dir, "--prefix", weights, "--max-new-tokens", 4, *PAIRS_SRC).stdout
    assert len(by_dir.splitlines()) == 3 and by_dir == by_file
    evaluated = invoke("eval", "--model", tiny_dir, "--prefix", weights, "--data-dir", data_dir, "--limit", 3,
                       "--max-new-tokens", 4, "--bleu-only")
    assert "scoring 3 hypotheses: sacreBLEU" in evaluated.stderr  # eval says what it does while it scores
    assert "of the first 3 of 630 e2e test items written to" in evaluated.stderr
    assert len((out / "eval-e2e-test" / "hypotheses.txt").read_text().splitlines()) == 3


def test_bad_files_and_options_end_in_one_error_line(tiny_dir, tmp_path, data_dir):
    """Each of these once ended in a traceback (or, for NaN, in an empty answer and exit 0)."""
    import struct

    from safetensors.torch import save

    from prefixtune.prefix_file import FORMAT, prefix_to_bytes
    from prefixtune.models import load_base_model, model_spec
    from prefixtune.prefix import group_width, groups_of

    spec = model_spec(load_base_model(str(tiny_dir))[0])
    p = {g: torch.randn(3, group_width(spec, n)) for g, n in groups_of(spec).items()}
    files = {"list-header": struct.pack("<Q", 2) + b"[]",
             "scalar": save({"prefix.decoder": torch.tensor(1.0)}, metadata={"format": FORMAT, "sha256": "0"}),
             "template": prefix_to_bytes(p, spec, "tiny", {"template": "{source"}),
             "nan": prefix_to_bytes({g: t * float("nan") for g, t in p.items()}, spec, "tiny")}
    for name, data in files.items():
        (tmp_path / f"{name}.safetensors").write_bytes(data)
    commands = [("info", tmp_path / "list-header.safetensors"), ("info", tmp_path / "scalar.safetensors")]
    commands += [("generate", "--model", tiny_dir, "--prefix", tmp_path / f"{name}.safetensors", "x")
                 for name in ("list-header", "template", "nan")]
    commands += [("train", "-o", tmp_path / "run", "--model", tiny_dir, "--data-dir", data_dir, "--train-size", 4,
                  "--max-steps", 1, "--batch-size", 0),
                 ("train", "-o", tmp_path / "run", "--model", tiny_dir, "--template", "{source.__class__}")]
    from typer.testing import CliRunner

    from prefixtune.cli import app

    for args in commands:  # in this process: a traceback would be an exception here, not exit code 2
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 2 and result.stdout == "", (args, result.exit_code, result.exception)
        last = result.stderr.strip().splitlines()[-1]  # after the model's loading bar, if any
        assert last.startswith("error: "), (args, result.stderr[-2000:])
