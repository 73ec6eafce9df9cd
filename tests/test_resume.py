"""`train --resume` (and `train(..., resume=True)`) continues the run in the directory as it was started."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import error_line, invoke, tiny_model
from prefixtune.checkpoint import load_checkpoint_file
from prefixtune.train import CHECKPOINT, RESULT, TrainConfig, train

PAIRS = [(f"name : Place{i} | food : {f}", f"Place{i} serves {f} food.") for i, f in
         enumerate(["Thai", "French", "Chinese", "Italian", "English", "Indian"] * 3)]


class Killed(Exception):
    pass


def kill_at(at):
    def on_step(step, logs, module):
        if step == at:
            raise Killed
    return on_step




@pytest.fixture
def killed_run(tmp_path, tiny_dir, data_dir):
    """A CLI-style run (task data from --data-dir, a local model) killed at step 3 of 6, checkpointed at step 2."""
    from prefixtune.models import load_base_model

    config = TrainConfig(output_dir=str(tmp_path / "run"), model=str(tiny_dir), data_dir=str(data_dir), train_size=12,
                         max_steps=6, batch_size=4, prefix_len=2, mlp_dim=8, eval_every=2, save_every=2, dev_size=4,
                         precision="fp32")
    model, tokenizer = load_base_model(str(tiny_dir))
    with pytest.raises(Killed):
        train(config, model, tokenizer, on_step=kill_at(3), progress=False)
    return Path(config.output_dir)


def test_a_bare_resume_continues_the_saved_run_and_keeps_its_config(killed_run):
    saved = (killed_run / "train_config.json").read_bytes()
    result = invoke("train", "-o", killed_run, "--resume")
    assert result.exit_code == 0, result.output
    assert "resumed from step 2 of 6" in result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 6  # the saved --max-steps, not the default epochs of E2E
    assert (killed_run / "train_config.json").read_bytes() == saved  # never rewritten
    done = json.loads((killed_run / RESULT).read_text())
    assert done["steps"] == 6


def test_a_flag_that_contradicts_the_run_is_refused_naming_both_values(killed_run):
    line = error_line(invoke("train", "-o", killed_run, "--resume", "--max-steps", 9))
    assert "--max-steps 6" in line and "not 9" in line
    line = error_line(invoke("train", "-o", killed_run, "--resume", "--task", "webnlg"))
    assert "--task 'e2e'" in line and "'webnlg'" in line
    line = error_line(invoke("train", "-o", killed_run, "--resume", "--data-dir", killed_run))
    assert "--data-dir" in line and str(killed_run) in line
    # a flag that agrees with the run (or only says where to run it) is fine
    result = invoke("train", "-o", killed_run, "--resume", "--max-steps", 6, "--prefix-len", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output


def test_a_finished_run_says_so_and_trains_nothing(killed_run):
    assert invoke("train", "-o", killed_run, "--resume").exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in killed_run.iterdir()}
    result = invoke("train", "-o", killed_run, "--resume")
    assert result.exit_code == 0, result.output
    assert "holds a finished run (6 steps" in result.stderr and "nothing to resume" in result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["steps"] == 6
    assert {p.name: p.stat().st_mtime_ns for p in killed_run.iterdir()} == before  # nothing written
    line = error_line(invoke("train", "-o", killed_run, "--resume", "--max-steps", 100))
    assert "--max-steps 6" in line  # extending a finished run is a new run


def test_resume_needs_a_run_to_continue(tmp_path):
    line = error_line(invoke("train", "-o", tmp_path / "empty", "--resume"))
    assert "nothing to resume" in line and "empty" in line
    line = error_line(invoke("train", "-o", tmp_path / "x", "--resume", "--overwrite"))
    assert "give one" in line


def test_the_api_resumes_the_saved_run_too(tmp_path, tokenizer):
    out = tmp_path / "run"
    config = TrainConfig(output_dir=str(out), max_steps=6, batch_size=4, prefix_len=3, mlp_dim=16, eval_every=2,
                         save_every=2, precision="fp32", lr=5e-3)
    with pytest.raises(Killed):
        train(config, tiny_model("llama"), tokenizer, PAIRS, PAIRS[:4], on_step=kill_at(3), progress=False)
    saved = (out / "train_config.json").read_bytes()
    with pytest.raises(ValueError, match=r"max_steps 6, not 9"):
        train(TrainConfig(output_dir=str(out), max_steps=9), tiny_model("llama"), tokenizer, PAIRS, PAIRS[:4],
              resume=True, progress=False)
    # only the output directory given: the run's own options (prefix length, steps, ...) are used
    resumed = train(TrainConfig(output_dir=str(out)), tiny_model("llama"), tokenizer, PAIRS, PAIRS[:4], resume=True,
                    progress=False)
    assert resumed.steps == 6 and resumed.method.config.prefix_len == 3
    assert (out / "train_config.json").read_bytes() == saved
    finished_mtime = (out / CHECKPOINT).stat().st_mtime_ns
    again = train(TrainConfig(output_dir=str(out)), tiny_model("llama"), tokenizer, PAIRS, resume=True, progress=False)
    assert (again.steps, again.best_step, again.best_dev_loss) == (6, resumed.best_step, resumed.best_dev_loss)
    assert (out / CHECKPOINT).stat().st_mtime_ns == finished_mtime  # a finished run is not trained again
    assert again.method.generate(["name : Zizzi"], batch_size=1) == resumed.method.generate(["name : Zizzi"],
                                                                                             batch_size=1)


def test_a_run_is_not_continued_on_data_that_changed_since_it_started(tmp_path, tokenizer):
    """A --data file with rows added or removed since the kill: the run would go on silently on other rows."""
    out = tmp_path / "run"
    config = TrainConfig(output_dir=str(out), max_steps=6, batch_size=4, prefix_len=3, mlp_dim=16, eval_every=2,
                         save_every=2, precision="fp32")
    with pytest.raises(Killed):
        train(config, tiny_model("llama"), tokenizer, PAIRS, PAIRS[:4], on_step=kill_at(3), progress=False)
    for pairs, dev in ((PAIRS[:10], PAIRS[:4]), (PAIRS, PAIRS[:3])):
        with pytest.raises(ValueError, match="started on 18 train and 4 dev pairs, but its data now gives"):
            train(TrainConfig(output_dir=str(out)), tiny_model("llama"), tokenizer, pairs, dev, resume=True,
                  progress=False)
    assert train(TrainConfig(output_dir=str(out)), tiny_model("llama"), tokenizer, PAIRS, PAIRS[:4], resume=True,
                 progress=False).steps == 6


def test_a_run_on_api_pairs_is_not_continued_on_the_task_data(tmp_path, tokenizer, data_dir):
    out = tmp_path / "run"
    config = TrainConfig(output_dir=str(out), max_steps=6, batch_size=4, prefix_len=3, mlp_dim=16, eval_every=2,
                         save_every=2, precision="fp32", data_dir=str(data_dir), train_size=8)
    with pytest.raises(Killed):
        train(config, tiny_model("llama"), tokenizer, PAIRS, PAIRS[:4], on_step=kill_at(3), progress=False)
    with pytest.raises(ValueError, match="trained on 18 .source, target. pairs given to the Python API"):
        train(TrainConfig(output_dir=str(out)), tiny_model("llama"), tokenizer, resume=True, progress=False)


class Payload:
    """What a hostile pickle holds: unpickling it calls exec, which writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_a_checkpoint_that_would_run_code_is_refused_naming_the_file(killed_run, tmp_path):
    """A shared run directory: `export` and `--resume` unpickle checkpoint.pt, which must not run its code."""
    marker, path = tmp_path / "ran", killed_run / CHECKPOINT
    torch.save({**load_checkpoint_file(path), "history": Payload(marker)}, path)
    for command in (("train", "-o", killed_run, "--resume"), ("export", killed_run)):
        line = error_line(invoke(*command))
        assert str(path) in line and "could run code" in line and "(it names exec)" in line, line
    with pytest.raises(ValueError, match="could run code"):
        train(TrainConfig(output_dir=str(killed_run)), resume=True, progress=False)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: the old loader ran it
    assert marker.read_text() == "ran"


def test_a_run_removes_the_temp_files_a_killed_save_left_and_nothing_else(killed_run):
    stale = [killed_run / ".checkpoint.pt.a1b2c3d_.tmp", killed_run / ".result.json.zz99zz99.tmp",
             killed_run / ".prefix.safetensors.k3j4h5g6.tmp"]
    kept = [killed_run / ".checkpoint.pt.tmp", killed_run / ".mine.pt.a1b2c3d4.tmp", killed_run / "notes.tmp",
            killed_run / ".checkpoint.pt.a1b2c3d4e.tmp", killed_run / "checkpoint.pt.a1b2c3d4.tmp"]
    for path in stale + kept:
        path.write_bytes(b"half a checkpoint")
    result = invoke("train", "-o", killed_run, "--resume")
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)


def copy_run(tiny_dir, out, **kw) -> TrainConfig:
    """An adapter run on the tiny model directory (export reloads the model by its name)."""
    return TrainConfig(output_dir=str(out), model=str(tiny_dir), method="adapter", adapter_budget=0.01, max_steps=6,
                       batch_size=4, eval_every=2, save_every=3, precision="fp32", lr=5e-3, **kw)


def trained_now(at, into):
    """on_step: keep the trained weights at step `at`, named as the method exports them (no `model.` wrapper)."""
    def on_step(step, logs, module):
        if step == at:
            into.update({n.removeprefix("model."): p.detach().clone() for n, p in module.named_parameters()
                         if p.requires_grad})
    return on_step


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("method", ["adapter", "finetune-top2"])
def test_a_copy_methods_checkpoint_holds_the_trained_weights_alone(method, tmp_path, tokenizer):
    """adapter and finetune-top2 train a copy of the whole model: its frozen weights are not the run's to keep."""
    config = TrainConfig(output_dir=str(tmp_path / "run"), method=method, max_steps=4, batch_size=4, eval_every=2,
                         save_every=2, precision="fp32", lr=5e-3)
    result = train(config, tiny_model("llama"), tokenizer, PAIRS, PAIRS[:4], progress=False)
    saved = load_checkpoint_file(tmp_path / "run" / CHECKPOINT)
    module = result.method.module
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert len(trained) < len(module.state_dict())  # there is something frozen to leave out
    for state in (saved["module"], saved["best"]["state"]):
        assert set(state) == trained
        assert sum(t.numel() for t in state.values()) == result.trainable_params


def test_export_from_a_trimmed_checkpoint_is_the_runs_export(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    from prefixtune.models import load_base_model
    from prefixtune.train import export_checkpoint

    at_six = {}
    model, tokenizer = load_base_model(str(tiny_dir))
    result = train(copy_run(tiny_dir, tmp_path / "run"), model, tokenizer, PAIRS, PAIRS[:4],
                   on_step=trained_now(6, at_six), progress=False)
    assert result.best_step is not None
    best = export_checkpoint(tmp_path / "run", tmp_path / "best.safetensors", "best")
    assert_same_tensors(load_file(best), load_file(result.prefix_file))
    last = export_checkpoint(tmp_path / "run", tmp_path / "last.safetensors", "last")
    assert_same_tensors(load_file(last), at_six)


def test_an_older_full_state_checkpoint_still_exports_and_resumes_exactly(tiny_dir, tmp_path, monkeypatch):
    """Checkpoints written before trimming hold every weight (module and best): they load as they always did."""
    from safetensors.torch import load_file

    import prefixtune.train as trainer
    from prefixtune.models import load_base_model
    from prefixtune.train import export_checkpoint

    model, tokenizer = load_base_model(str(tiny_dir))
    straight = train(copy_run(tiny_dir, tmp_path / "a"), model, tokenizer, PAIRS, PAIRS[:4], progress=False)
    old = tmp_path / "b"
    at_three = {}

    def keep_3_kill_at_4(step, logs, module):
        trained_now(3, at_three)(step, logs, module)
        kill_at(4)(step, logs, module)
    with monkeypatch.context() as patch:  # what train wrote before: the full state_dict
        patch.setattr(trainer, "trained_state", lambda module: module.state_dict())
        with pytest.raises(Killed):
            train(copy_run(tiny_dir, old), *load_base_model(str(tiny_dir)), PAIRS, PAIRS[:4],
                  on_step=keep_3_kill_at_4, progress=False)
    saved = load_checkpoint_file(old / CHECKPOINT)
    assert saved["step"] == 3 and "model.model.embed_tokens.weight" in saved["module"]
    assert "model.model.embed_tokens.weight" in saved["best"]["state"]
    exported = export_checkpoint(old, tmp_path / "old-last.safetensors", "last")
    assert_same_tensors(load_file(exported), at_three)
    resumed = train(copy_run(tiny_dir, old), *load_base_model(str(tiny_dir)), PAIRS, PAIRS[:4], resume=True,
                    progress=False)
    assert_same_tensors(load_file(resumed.prefix_file), load_file(straight.prefix_file))
    assert [h["dev_loss"] for h in resumed.history] == [h["dev_loss"] for h in straight.history]
    rewritten = load_checkpoint_file(old / CHECKPOINT)  # the resumed run keeps what trains, its old best too
    assert "model.model.embed_tokens.weight" not in rewritten["module"]
    assert "model.model.embed_tokens.weight" not in rewritten["best"]["state"]


def test_a_state_that_does_not_fit_the_module_is_refused_before_anything_loads(tokenizer):
    from prefixtune.checkpoint import load_trained_state, trained_state
    from prefixtune.methods import build_method
    from prefixtune.models import model_spec

    def built(family, method):
        model = tiny_model(family)
        return build_method(method, model, tokenizer, model_spec(model), TrainConfig(method=method))

    adapter = built("llama", "adapter").module
    state = {n: t + 1 for n, t in trained_state(adapter).items()}
    fresh = built("llama", "adapter").module
    before = {n: t.clone() for n, t in fresh.state_dict().items()}
    lacking = next(iter(state))
    with pytest.raises(ValueError, match=rf"1 trained weights missing \({lacking}\)"):
        load_trained_state(fresh, {n: t for n, t in state.items() if n != lacking})
    with pytest.raises(ValueError, match=r"1 keys this module does not have \(model.extra.weight\)"):
        load_trained_state(fresh, {**state, "model.extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="trained weights missing"):  # another method's state
        load_trained_state(fresh, trained_state(built("llama", "finetune-top2").module))
    assert_same_tensors(fresh.state_dict(), before)  # a refused state changes nothing
    load_trained_state(fresh, state)
    assert_same_tensors(trained_state(fresh), state)

    # full fine-tuning of a model with tied embeddings: the tied weight is kept under both its names
    tied = built("gpt2", "finetune").module
    with torch.no_grad():
        tied.model.transformer.wte.weight.add_(1)
    state = trained_state(tied)
    assert "model.lm_head.weight" in state and "model.transformer.wte.weight" in state
    fresh = built("gpt2", "finetune").module
    load_trained_state(fresh, state)
    assert fresh.model.lm_head.weight is fresh.model.transformer.wte.weight  # still tied
    assert_same_tensors(fresh.state_dict(), tied.state_dict())


def test_data_paths_are_compared_as_the_files_they_name(tmp_path, monkeypatch):
    """A run saves its local --data absolute (so it resumes from any directory); a config saved with a relative
    path by an earlier version still resumes from its own directory, given the path either way."""
    from prefixtune.run_dir import resumed_config, with_local_paths

    start = tmp_path / "start"
    start.mkdir()
    (start / "rows.jsonl").write_text('{"input": "a", "output": "b"}\n')
    monkeypatch.chdir(start)
    saved = with_local_paths(TrainConfig(output_dir=str(tmp_path / "run"), data="rows.jsonl", dev_data="hub/ds"))
    assert (saved.data, saved.dev_data) == (str(start / "rows.jsonl"), "hub/ds")  # a hub dataset id as given
    old = tmp_path / "old"
    old.mkdir()
    (old / "train_config.json").write_text(json.dumps({"data": "rows.jsonl", "max_steps": 2}))
    for given in ("rows.jsonl", str(start / "rows.jsonl"), "./rows.jsonl"):
        assert resumed_config(old, {"data": given}).data == "rows.jsonl"
    with pytest.raises(ValueError, match="with data 'rows.jsonl', not 'other.jsonl'"):
        resumed_config(old, {"data": "other.jsonl"})
