"""The README as a new user types it, in a fresh directory laid out like a clone (`.venv` and
`../shared/data` beside it, no $PREFIXTUNE_DATA, `prefixtune` not on PATH until activated):

* "The command line" block exactly as written, except the number of training steps:
  `--max-steps 200` becomes $PREFIXTUNE_README_STEPS (default 4; 200 reproduces the README);
* "The Python API" block, with `max_steps=200` shortened the same way;
* the "Serving" walk-through and its `openai` snippet, on a free port instead of 8000 (other
  jobs on the machine may hold 8000);
* "Your own data", every block of the section, with the same two changes (a test of its own).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

STEPS = int(os.environ.get("PREFIXTUNE_README_STEPS", "4"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def readme_blocks(section: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block under the README heading `## {section}`, in order."""
    text = (REPO / "README.md").read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README has no section {section!r}"
    return [(lang, code) for lang, code in FENCE.findall(match.group(1)) if lang in ("bash", "python")]


def replace_once(code: str, old: str, new: str) -> str:
    assert code.count(old) == 1, f"the README no longer says {old!r} once: update tests/test_readme.py"
    return code.replace(old, new)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_script(blocks: list[tuple[str, str]], name: str, scratch: Path) -> str:
    """Bash blocks as they are; a Python block is saved (outside the clone) and run with `python`."""
    lines = [f"echo '=== {name} ==='"]
    for i, (lang, code) in enumerate(blocks):
        if lang == "python":
            path = scratch / f"{name.replace(' ', '-')}-{i}.py"
            path.write_text(code)
            code = f"python {path}"
        lines += [f"echo '=== {name} {i} ==='", code]
    return "\n".join(lines)


def fresh_clone(tmp_path: Path, data_dir) -> tuple[Path, Path]:
    """(clone, scratch): an empty directory laid out like a clone after `make setup`, `../shared/data` beside it."""
    clone, scratch = tmp_path / "prefixtune", tmp_path / "scratch"
    clone.mkdir()
    scratch.mkdir()
    (clone / ".venv").symlink_to(Path(sys.prefix))  # what `make setup` made (this interpreter's venv)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(Path(data_dir).resolve())
    return clone, scratch


def run_in_clone(script: str, clone: Path, scratch: Path) -> tuple[str, str, int]:
    """(stdout, stderr, exit code) of a bash script run in the clone as a new user's shell would run it."""
    venv_bin = str(Path(sys.prefix) / "bin")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFIXTUNE_DATA", "VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env.setdefault("OMP_NUM_THREADS", "1")
    out_path, err_path = scratch / "stdout.txt", scratch / "stderr.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        # its own session: the walk-through leaves `prefixtune serve` running in the background
        proc = subprocess.Popen(["bash", "-c", script], cwd=clone, env=env, stdout=out, stderr=err,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=1500)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    stdout, stderr = out_path.read_text(), err_path.read_text()
    return stdout, stderr, code


@pytest.mark.slow
def test_readme_runs_as_written(tmp_path, data_dir):
    clone, scratch = fresh_clone(tmp_path, data_dir)

    [(lang, cli)] = readme_blocks("The command line")
    cli = replace_once(cli, "--max-steps 200", f"--max-steps {STEPS}")
    api = [(lang, replace_once(code, "max_steps=200", f"max_steps={STEPS}"))
           for lang, code in readme_blocks("The Python API")]
    port = str(free_port())
    serving = [(lang, code.replace("8000", port)) for lang, code in readme_blocks("Serving")]
    script = "\n".join(["set -eo pipefail -x", "echo '=== command line ==='", cli,
                        as_script(api, "python api", scratch), as_script(serving, "serving", scratch)])

    stdout, stderr, code = run_in_clone(script, clone, scratch)
    assert code == 0, f"README step failed (exit {code}); stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-6000:]}"

    info = json.loads(re.search(r"^\{\n.*?^\}$", stdout, re.S | re.M).group(0))
    assert info["prefix_len"] == 10 and info["shapes"]["decoder"][0] == 10
    assert (clone / "inputs.txt").is_file() and (clone / "eval-e2e-test" / "hypotheses.txt").is_file()
    scores = json.loads([line for line in stdout.splitlines() if line.startswith('{"BLEU"')][-1])
    assert set(scores) >= {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
    assert "scoring the first 100 of the 630 items of the e2e test split" in stderr
    assert (clone / "runs" / "e2e" / "prefix.safetensors").is_file()
    assert (clone / "runs" / "e2e-api" / "prefix.safetensors").is_file()  # the API run did not overwrite it

    # the server's access log shares stdout (uvicorn's default) and may land inside another line
    health = json.loads(re.search(r'\{"status":[^{}]*\}', stdout).group(0))
    assert health["status"] == "ok" and health["worker_alive"]
    assert stdout.count('"object":"text_completion"') == 2
    assert "prefixtune_batch_size_max 2" in stdout and "prefixtune_batch_prefixes_max 2" in stdout
    streamed = re.sub(r'INFO: +\S+ - "[^"]*" \d+[^\n]*\n?', "", stdout.split("=== serving 4 ===")[1])
    assert re.search(r"[A-Za-z]{3}", streamed), f"the openai snippet printed no text: {streamed!r}"


@pytest.mark.slow
def test_readme_own_data_runs_as_written(tmp_path, data_dir):
    """"Your own data": every block of the section (its subsections too), fewer steps, a free port."""
    clone, scratch = fresh_clone(tmp_path, data_dir)
    blocks = readme_blocks("Your own data")
    assert sum(len(re.findall(r"--max-steps \d+", code)) for _, code in blocks) >= 1
    port = str(free_port())
    blocks = [(lang, re.sub(r"--max-steps \d+", f"--max-steps {STEPS}", code).replace("8000", port))
              for lang, code in blocks]
    stdout, stderr, code = run_in_clone("\n".join(["set -eo pipefail -x", as_script(blocks, "own data", scratch)]),
                                        clone, scratch)
    assert code == 0, f"README step failed (exit {code}); stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-6000:]}"

    # the data path is saved absolute (resume from any directory)
    assert re.search(r'"data": "/[^"]*/mine\.jsonl"', stdout), [l for l in stdout.splitlines() if '"data"' in l]
    assert (clone / "runs" / "mine" / "prefix.safetensors").is_file()
    outputs = [json.loads(line) for line in (clone / "runs/mine/eval-mine-test/outputs.jsonl").read_text().splitlines()]
    assert len(outputs) == 20 and max(len(row["references"]) for row in outputs) > 1  # grouped references
    scores = json.loads([line for line in stdout.splitlines() if line.startswith('{"BLEU"')][-1])
    assert set(scores) == {"BLEU", "chrF", "ROUGE_L"}
    assert "error: bad.jsonl: line 1: field 'output' (the target) is empty" in stderr
    assert not (clone / "runs" / "bad").exists()
    assert '"object":"text_completion"' in stdout and '"id":"mine"' in stdout
    # many users in one job: three prefixes in one store, named after the users, and a completion for each
    store = clone / "runs" / "users" / "store"
    assert sorted(p.name for p in store.glob("*/*.safetensors")) == [
        "alice.safetensors", "bob.safetensors", "carol-example.com.safetensors"]
    assert "carol@example.com  carol-example.com  27" in stdout
    assert stdout.count('"object":"text_completion"') == 4  # the section's own prefix, then one per user
    for user in ("alice", "bob", "carol-example.com"):
        assert f'"model":"{user}"' in stdout
