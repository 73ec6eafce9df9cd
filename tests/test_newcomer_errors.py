"""The mistakes a newcomer makes with their own data and model each end in one clear `error:` line
(no traceback): wrong field names, a missing file, an empty file, the wrong file format, a wrong --model;
and the Python API refuses pairs it would otherwise train on as nonsense."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from conftest import ByteTokenizer, tiny_model
from prefixtune.cli import app

NO_MODEL = "/no/such/model-dir"  # data is read before the model: an error about data proves the order
GOOD_CSV = "mr,ref\n\"name[Aromi], food[Thai]\",Aromi serves Thai food.\n\"name[Zizzi], area[riverside]\",Zizzi is by the river.\n"


def error_line(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2 and result.stdout == "", (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def data_dir(tmp_path, train: str | bytes | None, dev: str = GOOD_CSV):
    folder = tmp_path / "data"
    (folder / "e2e").mkdir(parents=True)
    if train is not None:
        path = folder / "e2e" / "trainset.csv"
        path.write_bytes(train) if isinstance(train, bytes) else path.write_text(train)
    (folder / "e2e" / "devset.csv").write_text(dev)
    return folder


def train_error(tmp_path, folder, model=NO_MODEL) -> str:
    return error_line("train", "-o", tmp_path / "run", "--model", model, "--data-dir", folder, "--max-steps", 1)


def test_wrong_field_names(tmp_path):
    line = train_error(tmp_path, data_dir(tmp_path, "input,output\nname[Aromi],Aromi.\n"))
    assert "trainset.csv: expected an E2E CSV with the columns mr, ref" in line and "'input', 'output'" in line


def test_a_missing_file(tmp_path):
    line = train_error(tmp_path, data_dir(tmp_path, None))
    assert "E2E train file not found" in line and "trainset.csv" in line


@pytest.mark.parametrize("content", ["", "mr,ref\n"])
def test_an_empty_file(tmp_path, content):
    line = train_error(tmp_path, data_dir(tmp_path, content))
    assert "trainset.csv" in line and ("is empty" in line or "holds no rows" in line)


def test_the_wrong_file_format(tmp_path):
    jsonl = '{"mr": "name[Aromi]", "ref": "Aromi."}\n'
    assert "looks like JSON" in train_error(tmp_path, data_dir(tmp_path, jsonl))
    parquet = b"PAR1\x15\x04\x15\x80\xff\xfe\x00\x00" * 8
    line = train_error(tmp_path / "p", data_dir(tmp_path / "p", parquet))
    assert "trainset.csv" in line and ("not UTF-8 text" in line or "not a readable CSV" in line)


def test_a_meaning_representation_in_the_wrong_form_shows_the_expected_one(tmp_path):
    line = train_error(tmp_path, data_dir(tmp_path, "mr,ref\nname=Aromi;food=Thai,Aromi.\n"))
    assert "trainset.csv, line 2" in line and "expected attribute[value], attribute[value]" in line


def test_a_data_dir_that_is_a_file(tmp_path):
    not_a_folder = tmp_path / "train.csv"
    not_a_folder.write_text(GOOD_CSV)
    line = train_error(tmp_path, not_a_folder)
    assert "is a file, not a directory" in line and "does not exist" not in line


def test_a_wrong_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network wait: a hub id fails at once
    folder = data_dir(tmp_path, GOOD_CSV)
    line = train_error(tmp_path, folder, model="smollm2")
    assert "model 'smollm2'" in line and "did you mean 'smollm2-135m'?" in line
    line = train_error(tmp_path, folder, model=folder / "e2e" / "trainset.csv")
    assert "is a file, not a model" in line
    empty = tmp_path / "empty-model"
    empty.mkdir()
    assert "cannot load model directory" in train_error(tmp_path, folder, model=empty)


# -- the Python API ------------------------------------------------------------------------------------


def api_train(tmp_path, pairs, dev=None):
    from prefixtune.train import TrainConfig, train

    config = TrainConfig(output_dir=str(tmp_path / "api"), max_steps=1, batch_size=2, prefix_len=2, mlp_dim=8,
                         eval_every=0, save_every=0, precision="fp32")
    return train(config, tiny_model("llama"), ByteTokenizer(), pairs, dev, progress=False)


@pytest.mark.parametrize("pairs, error, words", [
    ([{"source": "name : Aromi", "target": "Aromi."}], TypeError, ["train_pairs[0] is a dict", "'source'"]),
    ([{"input": "name : Aromi", "output": "Aromi."}], TypeError, ["train_pairs[0] is a dict", "'input'"]),
    ([("name : Aromi", "Aromi."), ("name : Zizzi", "")], ValueError, ["train_pairs[1]", "target is empty"]),
    ([("name : Aromi", "Aromi."), ("a", "b", "c")], TypeError, ["train_pairs[1]", "(source, target) pair"]),
    ([("name : Aromi", "Aromi."), (3, "x")], TypeError, ["train_pairs[1]", "source is int"]),
    (["name : Aromi"], TypeError, ["train_pairs[0] is str"]),
    ("name : Aromi\tAromi.", TypeError, ["train_pairs must be a list"]),
    ([], ValueError, ["no training examples", "train_pairs is empty"]),
])
def test_the_api_refuses_pairs_that_are_not_pairs_of_text(tmp_path, pairs, error, words):
    with pytest.raises(error) as caught:
        api_train(tmp_path, pairs)
    for word in words:
        assert word in str(caught.value)


def test_the_api_checks_dev_pairs_and_takes_records(tmp_path):
    from prefixtune.data import Record, check_pairs

    with pytest.raises(TypeError, match=r"dev_pairs\[0\] is a dict"):
        api_train(tmp_path, [("name : Aromi", "Aromi.")], [{"source": "a", "target": "b"}])
    records = [Record("name : Aromi", ["Aromi serves food.", "Aromi."]), Record("name : Zizzi", ["Zizzi."])]
    assert check_pairs(records) == [("name : Aromi", "Aromi serves food."), ("name : Aromi", "Aromi."),
                                    ("name : Zizzi", "Zizzi.")]
    with pytest.raises(ValueError, match=r"train_pairs\[0\] is a Record without references"):
        check_pairs([Record("name : Aromi", [])])
    result = api_train(tmp_path, records + [["name : Mill", "The Mill."]])  # lists of two strings are pairs too
    assert result.steps == 1


def test_dart_json_with_other_field_names(tmp_path):
    folder = tmp_path / "data"
    (folder / "dart").mkdir(parents=True)
    (folder / "dart" / "dart-v1.1.1-full-dev.json").write_text('[{"triples": [["a", "b", "c"]], "text": "a b c"}]')
    line = error_line("train", "-o", tmp_path / "run", "--model", NO_MODEL, "--task", "dart", "--train-from", "dev",
                      "--data-dir", folder)
    assert "example 0: expected a \"tripleset\"" in line and "'triples'" in line
    (folder / "dart" / "dart-v1.1.1-full-dev.json").write_text("")
    assert "is not a DART JSON file" in error_line("train", "-o", tmp_path / "run", "--model", NO_MODEL, "--task",
                                                   "dart", "--train-from", "dev", "--data-dir", folder)
