"""Every file prefixtune writes gets the mode an ordinary file gets (0666 less the umask), not the
temporary file's 0600: exports, checkpoints, configs and model folders are meant to be shared."""
from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import ByteTokenizer, tiny_model


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in sorted(folder.rglob("*"))}


class SavingTokenizer(ByteTokenizer):
    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer.json").write_text("{}")


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_every_writer_gives_the_umask_mode(tmp_path, mask):
    from prefixtune.atomic import atomic_save_pretrained, atomic_torch_save, atomic_write_bytes
    from prefixtune.evaluate import write_results
    from prefixtune.interop.hub import save_pretrained
    from prefixtune.prefix_file import load_prefix
    from prefixtune.train import TrainConfig, train

    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    pairs = [("name : Aromi | food : Thai", "Aromi serves Thai food."), ("name : Zizzi", "Zizzi is a pub.")] * 4
    with umask(mask):
        model = tiny_model("llama")
        run = tmp_path / "run"
        config = TrainConfig(output_dir=str(run), max_steps=2, batch_size=4, prefix_len=2, mlp_dim=8, eval_every=1,
                             save_every=1, precision="fp32")
        result = train(config, model, ByteTokenizer(), pairs, pairs[:2], progress=False)
        exported = load_prefix(result.prefix_file)
        save_pretrained(exported, tmp_path / "hf")                 # prefix.safetensors + README.md
        save_pretrained(exported, tmp_path / "peft", fmt="peft")   # adapter_config.json + adapter_model + README.md
        write_results(tmp_path / "eval", ["a", "b"], {"sacreBLEU": 1.0})
        atomic_save_pretrained(model, SavingTokenizer(), tmp_path / "model")
        atomic_torch_save({"x": 1}, tmp_path / "plain.pt")
        atomic_write_bytes(tmp_path / "plain.bin", b"x")

    written = modes(run)
    assert {"train_config.json", "checkpoint.pt", "prefix.safetensors", "README.md", "result.json"} <= set(written)
    for folder in (run, tmp_path / "hf", tmp_path / "peft", tmp_path / "eval", tmp_path / "model"):
        for name, mode in modes(folder).items():
            assert mode == file_mode, (folder.name, name, oct(mode))
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == dir_mode  # the folder, made by mkdtemp (0700)
    for name in ("plain.pt", "plain.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == file_mode


def test_rewriting_a_file_keeps_its_mode(tmp_path):
    from prefixtune.atomic import atomic_write_bytes

    path = tmp_path / "kept.json"
    path.write_text("{}")
    path.chmod(0o640)  # a rewritten file keeps its mode, as with open(path, "w")
    with umask(0o022):
        atomic_write_bytes(path, b"[]")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_bytes() == b"[]"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
