"""Loading the base model: device selection, quiet loads, and hub ids that fail fast without a network."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from prefixtune import models
from prefixtune.models import resolve_device


@pytest.mark.parametrize("cuda,mps,want", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto") == torch.device(want)
    assert resolve_device("cpu") == torch.device("cpu")


def test_an_absent_device_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name in ("cuda", "mps"):
        with pytest.raises(ValueError, match=f"device '{name}' was asked for.*available: cpu"):
            resolve_device(name)
    with pytest.raises(ValueError, match="auto, cpu, cuda, mps"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda") == torch.device("cuda")


def test_paths_that_do_not_exist_fail_without_the_hub():
    for name in ("./no-such-model", "/no/such/model", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="model directory not found"):
            models.load_base_model(name)


def test_the_tokenizer_alone_reads_a_name_as_the_model_loader_does_without_loading_weights(tiny_dir, monkeypatch):
    """`load_tokenizer` (rows are checked before the model loads) resolves a name with `load_base_model`'s one
    resolver: the same tokenizer for an embedded name and a directory, the same error for a missing path, and
    no weights loaded."""
    wanted = {name: models.load_base_model(name)[1] for name in ("smollm2-135m", str(tiny_dir))}
    monkeypatch.setattr(models, "_load_hub_or_dir", lambda *a, **k: pytest.fail("loaded the weights"))
    monkeypatch.setattr(models, "_from_gguf", lambda *a, **k: pytest.fail("loaded the weights"))
    text = "name : The Eagle | Type : coffee shop<|im_end|>"
    for name, want in wanted.items():
        got = models.load_tokenizer(name)
        assert got(text)["input_ids"] == want(text)["input_ids"] and got.pad_token_id == want.pad_token_id
        assert got.padding_side == want.padding_side == "left"
    for name, message in (("./no-such-model", "model directory not found"), ("/no/such.gguf", "GGUF file not found"),
                          (str(tiny_dir / "config.json"), "is a file, not a model")):
        with pytest.raises(FileNotFoundError, match=message):
            models.load_tokenizer(name)


def test_hub_id_in_offline_mode_fails_at_once(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="not in the local hub cache and HF_HUB_OFFLINE is set"):
        models.check_hub("some-org/some-model")


def test_hub_id_without_a_network_is_one_error_line(tmp_path):
    """The CLI with an unreachable hub (a closed local port stands in for no network)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-m", "prefixtune.cli", "generate", "--model", "some-org/some-model",
                           "x"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model 'some-org/some-model' needs the Hugging Face hub")


def test_a_model_loaded_in_bf16_keeps_ropes_fp32_frequencies_and_decodes_as_the_fp32_one(tiny_dir):
    """transformers casts RoPE's inverse frequencies with the weights: the server (bf16) and `generate`
    (fp32, decoded in bf16) would rotate by different angles and write other tokens."""
    from prefixtune.engine import Engine, Request

    low, tokenizer = models.load_base_model(str(tiny_dir), dtype=torch.bfloat16)
    full, _ = models.load_base_model(str(tiny_dir))
    for name in ("inv_freq", "original_inv_freq"):
        got, want = getattr(low.model.rotary_emb, name), getattr(full.model.rotary_emb, name)
        assert got.dtype == torch.float32 and torch.equal(got, want), name
    assert low.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    prompt = tokenizer("name : The Eagle | Type : coffee shop")["input_ids"]
    outs = [Engine(m, tokenizer, max_batch=2, max_len=256, dtype="bf16").generate(
        [Request(prompt, max_tokens=40, ignore_eos=True)])[0].choices[0].token_ids for m in (low, full)]
    assert outs[0] == outs[1]
