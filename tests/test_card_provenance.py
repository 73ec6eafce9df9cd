"""The model card and `info` state the data a run actually trained on, and the card's command reproduces it."""
from __future__ import annotations

import json
import re
import shlex

from huggingface_hub import ModelCard
from typer.testing import CliRunner

from conftest import ByteTokenizer, tiny_model
from prefixtune.cli import app

OWN = ('mr,ref\n"name[Aromi], colour[red]",Aromi is red.\n"name[Zizzi], colour[blue]",Zizzi is blue.\n'
       '"name[Mill], colour[green]",The Mill is green.\n"name[Eagle], colour[gold]",The Eagle is gold.\n')


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def own_data(tmp_path):
    folder = tmp_path / "my-data"
    (folder / "e2e").mkdir(parents=True)
    for name in ("trainset.csv", "devset.csv"):
        (folder / "e2e" / name).write_text(OWN)
    return folder


def card_command(card_text: str) -> str:
    return re.search(r"```bash\n(prefixtune train .*)\n```", card_text).group(1)


def test_a_run_on_local_data_is_carded_as_local_and_its_command_reproduces_it(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("PREFIXTUNE_DATA", raising=False)
    data = own_data(tmp_path)
    run = tmp_path / "run"
    invoke("train", "-o", run, "--model", tiny_dir, "--data-dir", data, "--max-steps", 2, "--batch-size", 2,
           "--prefix-len", 2, "--mlp-dim", 8, "--eval-every", 1)
    card = ModelCard.load(run / "README.md")
    assert not card.data.to_dict().get("datasets")  # not tuetschek/e2e_nlg: these are not E2E's files
    assert "tuetschek/e2e_nlg" not in card.data.to_yaml()
    assert f"Trained on the e2e train split from {data} (--data-dir)" in card.text
    assert "local files" in card.text
    command = card_command(card.text)
    assert f"--data-dir {data}" in command

    # following the card's command trains on the same files with the same options
    args = shlex.split(command)[2:]
    args[args.index("-o") + 1] = str(tmp_path / "again")
    invoke("train", *args)
    first = json.loads((run / "train_config.json").read_text())
    again = json.loads((tmp_path / "again" / "train_config.json").read_text())
    assert {**first, "output_dir": None} == {**again, "output_dir": None}

    info = json.loads(invoke("info", run / "prefix.safetensors").stdout)["training"]
    assert info["data"].startswith(f"the e2e train split from {data} (--data-dir)") and "4 train pairs" in info["data"]
    assert info["steps"] == 2 and info["method"] == "prefix" and isinstance(info["best_dev_loss"], float)
    assert info["best_step"] in (1, 2) and info["template"].startswith("default")

    # exports made later from the checkpoint say the same
    invoke("export", run, "--out", tmp_path / "later.safetensors", "--which", "last")
    later = json.loads(invoke("info", tmp_path / "later.safetensors").stdout)["training"]
    assert later["data"] == info["data"] and later["steps"] == 2 and later["exported_from_step"] == 2
    invoke("export", run, "--format", "hf", "--out", tmp_path / "hf")
    folder_card = ModelCard.load(tmp_path / "hf" / "README.md")
    assert not folder_card.data.to_dict().get("datasets") and f"--data-dir {data}" in card_command(folder_card.text)


def test_a_run_on_api_pairs_is_carded_as_the_users_own_data(tmp_path):
    from prefixtune.exported import training_summary
    from prefixtune.prefix_file import load_prefix
    from prefixtune.train import TrainConfig, train

    pairs = [("name : Aromi | food : Thai", "Aromi serves Thai food."), ("name : Zizzi", "Zizzi is a pub.")] * 4
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=4, prefix_len=2, mlp_dim=8,
                         eval_every=1, save_every=0, template="Data: {source}\nText: ")
    result = train(config, tiny_model("llama"), ByteTokenizer(), pairs, pairs[:2], progress=False)
    card = ModelCard.load(tmp_path / "run" / "README.md")
    meta = card.data.to_dict()
    assert not meta.get("datasets") and "e2e" not in meta["tags"]
    assert "Trained on the user's own data: 8 (source, target) pairs given to the Python API" in card.text
    assert "train(TrainConfig(" in card.text and "max_steps=2" in card.text and "prefixtune train" not in card.text
    summary = training_summary(load_prefix(result.prefix_file).metadata)
    assert summary["data"].startswith("8 (source, target) pairs given to the Python API")
    assert summary["template"] == "Data: {source}\nText: " and summary["steps"] == 2


def test_a_run_on_the_default_data_location_names_the_public_dataset(tmp_path, monkeypatch):
    from prefixtune.train import TrainConfig, train

    monkeypatch.delenv("PREFIXTUNE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "e2e").mkdir(parents=True)  # ./data: the default location, where E2E's release goes
    for name in ("trainset.csv", "devset.csv"):
        (tmp_path / "data" / "e2e" / name).write_text(OWN.replace("colour", "food"))
    config = TrainConfig(output_dir="run", max_steps=1, batch_size=4, prefix_len=2, mlp_dim=8, eval_every=1,
                         save_every=0)
    train(config, tiny_model("llama"), ByteTokenizer(), progress=False)
    card = ModelCard.load(tmp_path / "run" / "README.md")
    assert card.data.to_dict()["datasets"] == ["tuetschek/e2e_nlg"]
    assert "--data-dir" not in card_command(card.text)
