"""`--data FILE` from the command line: bad rows stop train/eval/generate/score with one `error:` line before
the model loads, writing nothing; a tiny JSONL (and a chat JSONL) trains, decodes, evaluates and scores."""
from __future__ import annotations

import json

import pytest

from conftest import error_line, invoke

NO_MODEL = "/no/such/model-dir"  # loading it would fail: an error about the data proves the order




def ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


ROWS = [{"input": f"name : Place {i} | food : {food}", "output": f"Place {i} serves {food} food."}
        for i, food in enumerate(["Thai", "Italian", "French", "Chinese"] * 3)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


BAD = {  # name -> (content, what the one error line must name besides the file)
    "missing.jsonl": ('{"input": "a", "output": "b"}\n{"input": "c"}\n', ["line 2", "'output'", "missing"]),
    "empty.jsonl": ("", ["line 1", "empty"]),
    "malformed.jsonl": ('{"input": "a", "output": "b"}\n{"input": "c", "output": \n', ["line 2", "malformed JSON"]),
    "empty-target.csv": ("input,output\na,b\nc,\n", ["line 3", "'output'", "empty"]),
    "wrong.xlsx": ("input,output\na,b\n", ["unknown data format '.xlsx'"]),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_data_is_one_error_line_before_the_model_and_nothing_is_written(tmp_path, name):
    content, parts = BAD[name]
    path = tmp_path / name
    path.write_text(content)
    run = tmp_path / "run"
    commands = [("train", "-o", run, "--model", NO_MODEL, "--data", path),
                ("eval", "--model", NO_MODEL, "--prefix", tmp_path / "p.safetensors", "--data", path,
                 "--out-dir", run),
                ("score", "--data", path, "--hyp", tmp_path / "hyp.txt")]
    if name in ("empty.jsonl", "malformed.jsonl"):  # decoding needs no target; any other file is lines of text
        commands.append(("generate", "--model", NO_MODEL, "--input-file", path))
    (tmp_path / "hyp.txt").write_text("a\nb\n")
    for command in commands:
        line = error_line(invoke(*command))
        assert str(path) in line and all(part in line for part in parts), (command, line)
        assert not run.exists(), command


def test_bad_data_leaves_an_existing_run_alone_even_with_overwrite(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "result.json").write_text("{}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": ""}\n')
    line = error_line(invoke("train", "-o", run, "--model", NO_MODEL, "--data", bad, "--overwrite"))
    assert "line 1" in line and "'output'" in line and (run / "result.json").is_file()


def test_task_options_do_not_apply_with_data(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    line = error_line(invoke("train", "-o", tmp_path / "r", "--model", NO_MODEL, "--data", data, "--task", "xsum"))
    assert "--task does not apply with --data" in line
    assert "--source-field" in error_line(invoke("train", "-o", tmp_path / "r", "--model", NO_MODEL,
                                                 "--source-field", "x"))
    assert "does not apply with --data" in error_line(invoke("score", "e2e", "--data", data, "--hyp", data))


def test_dev_fraction_out_of_range_is_refused(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    line = error_line(invoke("train", "-o", tmp_path / "r", "--model", NO_MODEL, "--data", data,
                             "--dev-fraction", "1.5"))
    assert "dev_fraction must be in [0, 1)" in line and not (tmp_path / "r").exists()


def test_score_text_reads_any_references():
    from prefixtune.metrics.generic import score_text

    cat, dog = "the cat sat on the warm mat", "a dog barks at the old postman"
    same = score_text([cat, dog], [[cat], ["one dog", dog]])
    assert same == pytest.approx({"BLEU": 100.0, "chrF": 100.0, "ROUGE_L": 100.0})
    best_of_two = score_text(["one dog barks"], [["a cat sleeps", "one dog barks"]])
    assert best_of_two["ROUGE_L"] == pytest.approx(100.0) and best_of_two["chrF"] == pytest.approx(100.0)
    assert score_text(["x y z"], [["a b c"]])["ROUGE_L"] == 0.0


def test_train_generate_eval_score_info_on_a_tiny_jsonl(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "mine.jsonl", ROWS)
    run = tmp_path / "run"
    out = json.loads(ok(invoke("train", "-o", run, "--model", tiny_dir, "--data", data, "--max-steps", 3,
                               "--batch-size", 4, "--dev-fraction", 0.25, "--eval-every", 1,
                               "--precision", "fp32")).stdout)
    assert out["steps"] == 3 and out["best_dev_loss"] is not None  # 3 of the 12 rows held out as dev
    config = json.loads((run / "train_config.json").read_text())
    assert config["data"] == str(data) and config["dev_fraction"] == 0.25
    info = json.loads(ok(invoke("info", run)).stdout)
    assert info["data"] == str(data) and "task" not in info

    generated = ok(invoke("generate", "--model", tiny_dir, "--prefix", run, "--input-file", data,
                          "--max-new-tokens", 4)).stdout.splitlines()
    sources = [r["input"] for r in ROWS]
    as_text = ok(invoke("generate", "--model", tiny_dir, "--prefix", run, "--max-new-tokens", 4, *sources))
    assert generated == as_text.stdout.splitlines() and len(generated) == len(ROWS)

    result = ok(invoke("eval", "--model", tiny_dir, "--prefix", run, "--data", data, "--limit", 5,
                       "--max-new-tokens", 4))
    scores = json.loads(result.stdout)
    assert set(scores) == {"BLEU", "chrF", "ROUGE_L"}
    folder = run / "eval-mine"
    rows = [json.loads(line) for line in (folder / "outputs.jsonl").read_text().splitlines()]
    assert [r["references"] for r in rows] == [[r["output"]] for r in ROWS[:5]]
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["hypothesis"] for r in rows] == (folder / "hypotheses.txt").read_text().splitlines()
    rescored = json.loads(ok(invoke("score", "--data", data, "--hyp", folder / "hypotheses.txt", "--limit", 5,
                                    "--json")).stdout)
    assert rescored == pytest.approx(json.loads((folder / "scores.json").read_text()))
    mismatch = error_line(invoke("score", "--data", data, "--hyp", folder / "hypotheses.txt"))
    assert "5 lines but" in mismatch and "12 rows" in mismatch and "--limit 5" in mismatch

    from prefixtune.interop.card import model_card
    from prefixtune.prefix_file import load_prefix

    card = model_card(load_prefix(run / "prefix.safetensors"))
    assert f"--data {data}" in card and "--task" not in card and f"| training data | `{data}`" in card


def test_a_separate_dev_file_and_the_same_split_by_seed(tiny_dir, tmp_path):
    from prefixtune.train import load_pairs
    from prefixtune.train_config import TrainConfig

    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    dev = write_jsonl(tmp_path / "dev.jsonl", ROWS[:2])
    train, held = load_pairs(TrainConfig(data=str(data), dev_fraction=0.25, seed=5))
    assert (train, held) == load_pairs(TrainConfig(data=str(data), dev_fraction=0.25, seed=5))
    assert len(held) == 3 and not set(train) & set(held)
    train, held = load_pairs(TrainConfig(data=str(data), dev_data=str(dev)))
    assert len(train) == 12 and held == [(r["input"], r["output"]) for r in ROWS[:2]]


CHATS = [{"messages": [{"role": "user", "content": f"Describe {name}."},
                       {"role": "assistant", "content": f"{name} is a {kind}."}]}
         for name, kind in [("The Eagle", "pub"), ("Zizzi", "restaurant"), ("Aromi", "coffee shop")] * 2]


def test_chat_rows_train_and_decode_through_the_chat_template(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    run = tmp_path / "run"
    out = json.loads(ok(invoke("train", "-o", run, "--model", tiny_dir, "--data", data, "--max-steps", 2,
                               "--batch-size", 2, "--dev-fraction", 0.34, "--precision", "fp32")).stdout)
    assert out["steps"] == 2 and out["best_dev_loss"] is not None
    ok(invoke("generate", "--model", tiny_dir, "--prefix", run, "--input-file", data, "--max-new-tokens", 3))
    from prefixtune.data.chat import Conversation
    from prefixtune.exported import ExportDecoder
    from prefixtune.generation import DecodingConfig
    from prefixtune.models import load_base_model

    decoder = ExportDecoder(*load_base_model(str(tiny_dir)), run / "prefix.safetensors")
    chats = [Conversation.of(c["messages"]) for c in CHATS]
    config = DecodingConfig(max_new_tokens=3)
    together = decoder.generate_chats(chats, config, batch_size=4)
    assert together == [decoder.generate_chats([c], config)[0] for c in chats]  # batched equals alone
    scores = json.loads(ok(invoke("eval", "--model", tiny_dir, "--prefix", run, "--data", data,
                                  "--max-new-tokens", 3)).stdout)
    assert set(scores) == {"BLEU", "chrF", "ROUGE_L"}
    rows = [json.loads(line) for line in (run / "eval-chat" / "outputs.jsonl").read_text().splitlines()]
    assert [r["references"] for r in rows] == [[c["messages"][1]["content"]] for c in CHATS]
    assert rows[0]["source"] == "Describe The Eagle."


STRICT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                   "supported') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def strict_tokenizer_only(tiny_dir, tmp_path):
    """A model folder holding only a tokenizer whose chat template refuses a system message (as Gemma's does):
    loading the model would fail, so an error about a row proves the rows were encoded before it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.chat_template = STRICT_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "strict")
    return tmp_path / "strict"


def test_a_chat_row_the_template_refuses_or_too_long_for_its_turn_is_refused_before_the_model(
        strict_tokenizer_only, tmp_path):
    """The template's TemplateError was a traceback after the model loaded; a row cut before its assistant turn
    trained nothing (loss 0.0, or nan alone). Both are one error line naming the row, and a later user's bad
    row stops a many-users job before any user trains."""
    users = [{"user": ("ann", "bob")[i % 2], **chat} for i, chat in enumerate(CHATS)]
    system = {"user": "cy", "messages": [{"role": "system", "content": "be nice"}, *CHATS[0]["messages"]]}
    long = {"user": "cy", "messages": [CHATS[0]["messages"][0], {"role": "assistant", "content": "word " * 50}]}
    cases = ((system, [], "refuses this conversation: System role not supported"),
             (long, ["--max-source-len", 8, "--max-target-len", 16],
              "its last assistant turn alone is 53 tokens, over max_target_len 16: raise --max-target-len"))
    for row, limits, message in cases:
        data = write_jsonl(tmp_path / "chat.jsonl", users + [row])
        for job in ([], ["--user-field", "user"]):
            run = tmp_path / "run"
            line = error_line(invoke("train", "-o", run, "--model", strict_tokenizer_only, "--data", data,
                                     "--method", "prefix-flat", *limits, *job))
            assert f"{data}: line 7: " in line and message in line, line
            assert not run.exists()


def test_dev_size_0_means_no_dev_rows(tmp_path):
    from prefixtune.train import TrainConfig, load_pairs
    from prefixtune.users.data import load_user_pairs

    data = write_jsonl(tmp_path / "d.jsonl", [{**r, "user": "ann"} for r in ROWS])
    train, dev = load_pairs(TrainConfig(data=str(data), dev_size=0))  # was "train size must be positive, got 0"
    assert len(train) == 11 and dev == []
    train, dev = load_user_pairs(TrainConfig(data=str(data), dev_size=0, user_field="user"))
    assert len(train["ann"]) == 11 and dev == {"ann": []}
