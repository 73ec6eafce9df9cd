"""Tiny random models of every family, built from configs (offline), and shared fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from prefixtune.models import freeze

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


class ByteTokenizer:
    """A tiny stand-in tokenizer (bytes + specials) so tests need no downloaded vocab."""

    def __init__(self, vocab_size=300):
        self.pad_token_id, self.eos_token_id, self.bos_token_id = 0, 1, 2
        self.pad_token, self.eos_token = "<pad>", "</s>"
        self.padding_side = "left"
        self.vocab_size = vocab_size
        self.name_or_path = "byte-tokenizer"

    def _encode(self, text):
        return [3 + b for b in text.encode("utf-8")]

    def __call__(self, text, add_special_tokens=True, **kw):
        if isinstance(text, list):
            return {"input_ids": [self(t, add_special_tokens)["input_ids"] for t in text]}
        return {"input_ids": self._encode(text)}

    def encode(self, text, add_special_tokens=True):
        return self._encode(text)

    def decode(self, ids, skip_special_tokens=False):
        ids = [int(i) for i in (ids.tolist() if torch.is_tensor(ids) else ids)]
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")

    def batch_decode(self, seqs, skip_special_tokens=False):
        return [self.decode(s, skip_special_tokens) for s in seqs]

    def get_vocab(self):
        return {f"t{i}": i for i in range(self.vocab_size)}

    def __hash__(self):
        return id(self)


def tiny_model(family: str, seed: int = 0):
    from transformers import (BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, T5Config, T5ForConditionalGeneration)

    torch.manual_seed(seed)
    common = dict(vocab_size=300, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=256, **common))
    elif family == "llama":  # grouped-query attention: 4 query heads, 2 key/value heads
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             hidden_size=32, intermediate_size=64, max_position_embeddings=256,
                                             **common))
    elif family == "bart":
        model = BartForConditionalGeneration(BartConfig(
            encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, d_model=32,
            encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256, decoder_start_token_id=2,
            forced_bos_token_id=None, **common))
    elif family == "t5":
        model = T5ForConditionalGeneration(T5Config(
            num_layers=2, num_decoder_layers=2, num_heads=4, d_model=32, d_kv=8, d_ff=64,
            decoder_start_token_id=0, vocab_size=300, pad_token_id=0, eos_token_id=1))
    else:
        raise ValueError(family)
    model.config._name_or_path = f"tiny-{family}"
    return freeze(model)


FAMILIES = ["gpt2", "llama", "bart", "t5"]


@pytest.fixture
def tokenizer():
    return ByteTokenizer()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def data_dir():
    path = Path(os.environ.get("PREFIXTUNE_DATA", SHARED_DATA))
    if not (path / "e2e").is_dir():
        pytest.skip(f"no data directory at {path} (set PREFIXTUNE_DATA)")
    return path


@pytest.fixture(scope="session")
def data_root() -> str:
    """$PREFIXTUNE_DATA, else <repo>/../shared/data, as a string; skip when neither exists."""
    root = os.environ.get("PREFIXTUNE_DATA") or str(SHARED_DATA)
    if not Path(root).is_dir():
        pytest.skip(f"shared data not found at {root} (set PREFIXTUNE_DATA to the folder holding e2e/, webnlg2017/, ...)")
    return root


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama (GQA) saved as a local model directory with the embedded model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefixtune.models import load_base_model

    try:
        _, tokenizer = load_base_model("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                         intermediate_size=64, vocab_size=len(tokenizer), max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def invoke(*args, stdin=None):
    """The CLI run in-process, as a user would type it (arguments made strings)."""
    from typer.testing import CliRunner

    from prefixtune.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], input=stdin)


def error_line(result) -> str:
    """The one `error:` line a refused command prints (exit 2, no traceback)."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]
