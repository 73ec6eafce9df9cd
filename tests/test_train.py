"""The trainer: it learns, keeps the best step, resumes a killed run exactly, runs on 2 processes."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_model
from prefixtune.prefix_file import load_prefix
from prefixtune.train import CHECKPOINT, TrainConfig, train

PAIRS = [(f"name : Place{i} | food : {f}", f"Place{i} serves {f} food.") for i, f in
         enumerate(["Thai", "French", "Chinese", "Italian", "English", "Indian"] * 3)]


def config(tmp_path, **kw):
    dropout = 0.1 if kw.get("method", "prefix") in ("prefix", "prefix-flat", "infix") else 0.0  # the others: none
    base = dict(output_dir=str(tmp_path / "run"), max_steps=6, batch_size=4, lr=5e-3, prefix_len=3, mlp_dim=16,
                eval_every=2, save_every=3, seed=7, prefix_dropout=dropout, precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_training_lowers_dev_loss_and_exports(family, tokenizer, tmp_path):
    model = tiny_model(family)
    result = train(config(tmp_path, max_steps=30, eval_every=10, lr=3e-2), model, tokenizer, PAIRS, PAIRS[:6],
                   progress=False)
    losses = [h["dev_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.best_dev_loss == min(losses)
    exported = load_prefix(result.prefix_file)
    assert exported.prefix_len == 3
    assert json.loads(exported.metadata["train_config"])["best_step"] == result.best_step
    assert result.shipped_params < result.trainable_params  # the MLP is dropped


@pytest.mark.parametrize("method", ["prefix", "adapter", "finetune-top2"])
def test_resume_continues_a_killed_run_exactly(method, tokenizer, tmp_path):
    # adapter and finetune-top2 checkpoints hold the trained weights alone: the rest must come from the model
    straight = train(config(tmp_path / "a", method=method), tiny_model("llama"), tokenizer, PAIRS, PAIRS[:4],
                     progress=False)

    class Killed(Exception):
        pass

    def kill_at_4(step, logs, module):
        if step == 4:
            raise Killed

    cfg = config(tmp_path / "b", method=method)
    with pytest.raises(Killed):
        train(cfg, tiny_model("llama"), tokenizer, PAIRS, PAIRS[:4], on_step=kill_at_4, progress=False)
    assert torch.load(Path(cfg.output_dir) / CHECKPOINT, weights_only=False)["step"] == 3
    resumed = train(cfg, tiny_model("llama"), tokenizer, PAIRS, PAIRS[:4], resume=True, progress=False)
    a, b = load_file(straight.prefix_file), load_file(resumed.prefix_file)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [h["dev_loss"] for h in straight.history] == [h["dev_loss"] for h in resumed.history]


def test_bf16_autocast_matches_fp32_dev_loss(tokenizer, tmp_path):
    from prefixtune.precision import bf16_available

    if not bf16_available(torch.device("cpu")):
        pytest.skip("this CPU has no bf16")
    results = [train(config(tmp_path / p, precision=p, max_steps=10, prefix_dropout=0.0), tiny_model("llama"),
                     tokenizer, PAIRS, PAIRS[:6], progress=False) for p in ("fp32", "bf16")]
    fp32, bf16 = (r.final_dev_loss for r in results)
    assert abs(bf16 - fp32) / fp32 < 0.02


DIST_SCRIPT = r"""
import os, sys, torch
sys.path.insert(0, sys.argv[2])
from conftest import ByteTokenizer, tiny_model
from prefixtune.train import TrainConfig, train

out, rank = sys.argv[1], int(os.environ["RANK"])  # set by torchrun
pairs = [(f"name : P{i}", f"P{i} is a pub near {i}.") for i in range(16)]
cfg = TrainConfig(output_dir=out, max_steps=4, batch_size=4, lr=1e-2, prefix_len=2, mlp_dim=8, eval_every=2,
                  save_every=0, precision="fp32", prefix_dropout=0.0)

def dump(step, logs, module):
    if step == cfg.max_steps:
        torch.save(module.state_dict(), f"{out}/rank{rank}.pt")

# a different init per rank: the ranks must still agree (DDP broadcasts rank 0, updates are synced)
torch.manual_seed(rank)
train(cfg, tiny_model("llama"), ByteTokenizer(), pairs, pairs[:4], on_step=dump, progress=False)
"""


def test_two_process_run_keeps_ranks_identical(tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(script), str(out), str(REPO / "tests")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert (out / "prefix.safetensors").is_file()


def test_early_stopping_stops_after_patience_evaluations_without_a_new_best(tokenizer, tmp_path):
    # A rate far too high makes the dev loss climb after the first evaluations.
    cfg = config(tmp_path, max_steps=None, epochs=40, eval_every=1, early_stop_patience=2, lr=3.0, save_every=0)
    result = train(cfg, tiny_model("llama"), tokenizer, PAIRS, PAIRS[:6], progress=False)
    steps_per_epoch = 5  # 18 pairs, batch 4
    assert result.stop_reason == "early_stop"
    assert result.steps < 40 * steps_per_epoch
    evaluated = [h for h in result.history if h.get("dev_loss") is not None]
    after_best = [h for h in evaluated if h["step"] > result.best_step]
    assert len(after_best) == 2 and all(h["dev_loss"] >= result.best_dev_loss for h in after_best)
    assert result.epochs_run == pytest.approx(result.steps / steps_per_epoch, abs=1e-3)


def test_stop_reason_names_the_limit_that_ended_training(tokenizer, tmp_path):
    by_epochs = train(config(tmp_path / "e", max_steps=None, epochs=2, save_every=0), tiny_model("llama"), tokenizer,
                      PAIRS, PAIRS[:4], progress=False)
    assert (by_epochs.stop_reason, by_epochs.steps, by_epochs.epochs_run) == ("epoch_limit", 10, 2.0)
    by_steps = train(config(tmp_path / "s", max_steps=3, save_every=0), tiny_model("llama"), tokenizer, PAIRS,
                     PAIRS[:4], progress=False)
    assert (by_steps.stop_reason, by_steps.steps) == ("step_limit", 3)
    assert json.loads((tmp_path / "s" / "run" / "result.json").read_text())["stop_reason"] == "step_limit"


def test_a_resumed_run_keeps_its_early_stop_count(tokenizer, tmp_path):
    cfg = config(tmp_path, max_steps=None, epochs=40, eval_every=1, early_stop_patience=2, lr=3.0, save_every=1)
    straight = train(cfg, tiny_model("llama"), tokenizer, PAIRS, PAIRS[:6], progress=False)

    class Killed(Exception):
        pass

    def kill(step, logs, module):
        if step == straight.steps - 1:
            raise Killed

    cfg2 = config(tmp_path / "k", max_steps=None, epochs=40, eval_every=1, early_stop_patience=2, lr=3.0, save_every=1)
    with pytest.raises(Killed):
        train(cfg2, tiny_model("llama"), tokenizer, PAIRS, PAIRS[:6], on_step=kill, progress=False)
    resumed = train(cfg2, tiny_model("llama"), tokenizer, PAIRS, PAIRS[:6], resume=True, progress=False)
    assert (resumed.steps, resumed.best_step, resumed.stop_reason) == (straight.steps, straight.best_step, "early_stop")


def test_a_run_is_never_replaced_silently(tokenizer, tmp_path):
    from dataclasses import replace

    cfg = config(tmp_path, max_steps=2, eval_every=0, save_every=0)
    out = tmp_path / "run"
    train(cfg, tiny_model("llama"), tokenizer, PAIRS, PAIRS[:4], progress=False)
    with pytest.raises(FileExistsError, match="holds a finished run: pass --overwrite"):
        train(cfg, tiny_model("llama"), tokenizer, PAIRS, PAIRS[:4], progress=False)
    assert train(cfg, tiny_model("llama"), tokenizer, PAIRS, PAIRS[:4], resume=True, progress=False).steps == 2
    (out / "result.json").unlink()  # as after a kill: a checkpoint, no result
    with pytest.raises(FileExistsError, match="holds an interrupted run"):
        train(cfg, tiny_model("llama"), tokenizer, PAIRS, PAIRS[:4], progress=False)
    other = replace(cfg, method="embedding-only", prefix_dropout=0.0)  # embedding-only has no prefix dropout
    result = train(other, tiny_model("llama"), tokenizer, PAIRS, PAIRS[:4], progress=False, overwrite=True)
    assert result.steps == 2 and not (out / "prefix.safetensors").exists()  # the old run's export is gone
    assert (out / "prompt-embeddings.safetensors").is_file()



def _poison_at(at):
    """on_step: every trained weight NaN after step `at`, so step at+1's loss is NaN (a run that diverges)."""
    def poison(step, logs, module):
        if step == at:
            with torch.no_grad():
                for p in module.parameters():
                    if p.requires_grad:
                        p.fill_(float("nan"))
    return poison


def test_a_diverged_run_stops_and_keeps_its_best_step(tokenizer, tmp_path):
    # it trained every later step on NaN; without a dev loss it wrote NaN weights as its result, exit code 0
    cfg = config(tmp_path / "a", method="finetune", max_steps=6, eval_every=0, save_every=0)
    with pytest.raises(ValueError, match=r"diverged: the loss is not finite \(nan on this process\) at step 3"):
        train(cfg, tiny_model("llama"), tokenizer, PAIRS, [], progress=False, on_step=_poison_at(2))
    assert not (tmp_path / "a" / "run" / "finetuned-model.safetensors").exists()
    # with a best step measured before it, the run stops there and exports that step
    cfg = config(tmp_path / "b", max_steps=6, eval_every=1, save_every=0)
    result = train(cfg, tiny_model("llama"), tokenizer, PAIRS, PAIRS[:4], progress=False, on_step=_poison_at(3))
    assert (result.stop_reason, result.steps) == ("diverged", 4) and result.best_step <= 3
    assert all(torch.isfinite(t).all() for t in load_file(result.prefix_file).values())


LONG_PAIRS = [(f"name : Place{i} | " + "food : Thai | " * 30, "It serves Thai food. " * 15) for i in range(8)]


def test_lengths_past_gpt2s_learned_positions_are_refused_before_training(tokenizer, tmp_path):
    """GPT-2's positions end at n_positions (256 here): a row of prefix + source + target past them was an
    IndexError out of the forward (a traceback out of `prefixtune train`). The configured lengths that cannot fit
    are refused, naming the limit and the flags, before any file is written; lengths that fit exactly train."""
    from prefixtune.users import train_users

    cfg = config(tmp_path / "a", prefix_len=10, max_source_len=200, max_target_len=50)  # 260 > 256
    with pytest.raises(ValueError, match=r"--prefix-len 10 \+ --max-source-len 200 \+ --max-target-len 50 = 260 "
                                         r"positions .* tiny-gpt2 has 256 learned positions"):
        train(cfg, tiny_model("gpt2"), tokenizer, LONG_PAIRS, LONG_PAIRS[:2], progress=False)
    with pytest.raises(ValueError, match="256 learned positions"):  # the many-users job too
        train_users(config(tmp_path / "u", prefix_len=10, max_source_len=200, max_target_len=50), tiny_model("gpt2"),
                    tokenizer, {"a": LONG_PAIRS[:4], "b": LONG_PAIRS[4:]}, progress=False)
    assert not (tmp_path / "a" / "run").exists() and not (tmp_path / "u" / "run").exists()
    for method, prefix_len in (("prefix", 6), ("embedding-only", 6), ("finetune-top2", 10)):  # exactly 256
        virtual = prefix_len if method != "finetune-top2" else 0
        fits = config(tmp_path / method, method=method, prefix_len=prefix_len, max_source_len=200 - virtual,
                      max_target_len=56, max_steps=1, eval_every=0, save_every=0)
        assert train(fits, tiny_model("gpt2"), tokenizer, LONG_PAIRS, LONG_PAIRS[:2], progress=False).steps == 1
    # an encoder-decoder model: the encoder reads the source, the decoder the target, each within 256
    bart = config(tmp_path / "bart", prefix_len=10, max_source_len=256, max_target_len=256, max_steps=1,
                  eval_every=0, save_every=0)
    assert train(bart, tiny_model("bart"), tokenizer, LONG_PAIRS, LONG_PAIRS[:2], progress=False).steps == 1
    with pytest.raises(ValueError, match="--max-source-len 257 = 257 positions"):
        train(config(tmp_path / "b2", max_source_len=257), tiny_model("bart"), tokenizer, LONG_PAIRS, progress=False)


def test_a_non_finite_dev_loss_is_null_in_result_json(tokenizer, tmp_path, monkeypatch):
    """result.json is standard JSON: a dev loss that is NaN (as a bf16 overflow on a dev row gives; never the
    best step) was written `NaN`, which no JSON reader but Python's takes. Now null; finite losses stay numbers."""
    import prefixtune.methods.prefix as prefix_method

    lm_loss, dev_calls = prefix_method.lm_loss, []

    def nan_after_the_first_dev_loss(*args):
        loss, n = lm_loss(*args)
        if not torch.is_grad_enabled():  # a dev batch (4 dev pairs: one batch an evaluation)
            dev_calls.append(1)
            loss = loss if len(dev_calls) == 1 else loss * float("nan")
        return loss, n

    monkeypatch.setattr(prefix_method, "lm_loss", nan_after_the_first_dev_loss)
    result = train(config(tmp_path, max_steps=4, eval_every=2, save_every=0), tiny_model("llama"), tokenizer, PAIRS,
                   PAIRS[:4], progress=False)
    assert result.best_step == 2 and math.isnan(result.final_dev_loss)  # the API keeps the float

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    saved = json.loads((tmp_path / "run" / "result.json").read_text(), parse_constant=refuse)
    assert saved["final_dev_loss"] is None and [h["dev_loss"] for h in saved["history"]][1] is None
    assert saved["best_dev_loss"] == result.best_dev_loss and isinstance(saved["history"][0]["dev_loss"], float)
