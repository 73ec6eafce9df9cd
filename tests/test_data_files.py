"""The user's own data files (`data/files.py`, `data/chat.py`): every format to the same records, every bad
input to one error naming file, line and field, held-out dev by seed, chat rows masked to assistant turns."""
from __future__ import annotations

import json

import pytest

from prefixtune.data import DataFileError, load_records, split_dev, training_pairs
from prefixtune.data.chat import ChatRowTooLong, Conversation, chat_prompt_ids, encode_chat, encode_chat_prompt
from prefixtune.data.collate import encode_example

ROWS = [{"source": f"name : Place {i} | food : Thai", "target": f"Place {i} serves Thai food.", "user": f"u{i % 3}"}
        for i in range(7)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path, rows, sep=","):
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=sep)
        writer.writeheader()
        writer.writerows(rows)
    return path


def simple(records):
    return [(r.source, r.references, r.meta.get("user")) for r in records]


def test_every_format_loads_to_the_same_records(tmp_path):
    import datasets

    expected = [(r["source"], [r["target"]], r["user"]) for r in ROWS]
    table = datasets.Dataset.from_list(ROWS)
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table, "test": table.select([0, 1])}).save_to_disk(str(tmp_path / "saved-dict"))
    (tmp_path / "files").mkdir()
    write_jsonl(tmp_path / "files" / "train.jsonl", ROWS)
    sources = [write_jsonl(tmp_path / "d.jsonl", ROWS), write_csv(tmp_path / "d.csv", ROWS),
               write_csv(tmp_path / "d.tsv", ROWS, "\t"), tmp_path / "d.parquet", tmp_path / "saved",
               tmp_path / "saved-dict", tmp_path / "files"]
    for path in sources:
        assert simple(load_records(path, user_field="user")) == expected, path
    assert simple(load_records(tmp_path / "saved-dict", split="test", user_field="user")) == expected[:2]
    with pytest.raises(DataFileError, match="no split 'dev'; it has 'train', 'test'"):
        load_records(tmp_path / "saved-dict", split="dev")


@pytest.mark.parametrize("suffix,sep", [(".csv", ","), (".tsv", "\t")])
def test_csv_cells_are_read_as_text_not_as_numbers(tmp_path, suffix, sep):
    """pandas alone would read '00123' as 123.0 and merge users '007' and '7'."""
    path = tmp_path / f"d{suffix}"
    path.write_text(sep.join(["user", "source", "target"]) + "\n" + sep.join(["007", "1e5", "00123"]) + "\n"
                    + sep.join(["7", "True", "2.50"]) + "\n", encoding="utf-8-sig")
    assert simple(load_records(path, user_field="user")) == [("1e5", ["00123"], "007"), ("True", ["2.50"], "7")]
    folder = tmp_path / "files"  # a folder of data files, read the same way
    folder.mkdir()
    path.rename(folder / f"train{suffix}")
    assert simple(load_records(folder, user_field="user")) == [("1e5", ["00123"], "007"), ("True", ["2.50"], "7")]


def test_line_numbers_skip_blank_lines_and_count_the_csv_header(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    assert [r.meta["line"] for r in load_records(path)] == [1, 3]
    assert [r.meta["line"] for r in load_records(write_csv(tmp_path / "d.csv", ROWS[:2]))] == [2, 3]


@pytest.mark.parametrize("source,target", [("input", "output"), ("prompt", "completion"), ("question", "answer")])
def test_fields_are_auto_detected(tmp_path, source, target):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": 1, source: "x", target: "y"}])
    [record] = load_records(path)
    assert (record.source, record.references) == ("x", ["y"])


def test_fields_given_by_name_and_list_targets_are_reference_groups(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"mr": "a", "refs": ["one", "two"], "source": "s", "target": "t"}])
    [record] = load_records(path, source_field="mr", target_field="refs")
    assert (record.source, record.references) == ("a", ["one", "two"])
    assert training_pairs([record]) == [("a", "one"), ("a", "two")]


BAD = {  # file name -> (content, what the error must say)
    "missing-column.jsonl": ('{"source": "a", "answer": "b"}\n', r"line 1: no target field \('source' is there, 'target' is not\): name it with --target-field"),
    "missing-field.jsonl": ('{"source": "a", "target": "b"}\n{"source": "c"}\n', r"line 2: field 'target' \(the target\) is missing"),
    "empty.jsonl": ("", "line 1: empty file"),
    "blank.jsonl": ("\n\n", "line 1: empty file"),
    "header-only.csv": ("source,target\n", "line 2: empty: no rows after the header"),
    "malformed.jsonl": ('{"source": "a", "target": "b"}\n\n{"source": "c", "target" "d"}\n', r"line 3: malformed JSON"),
    "not-object.jsonl": ('{"source": "a", "target": "b"}\n[1, 2]\n', "line 2: not a JSON object"),
    "empty-target.jsonl": ('{"source": "a", "target": "b"}\n{"source": "c", "target": "  "}\n', r"line 2: field 'target' \(the target\) is empty"),
    "empty-target.csv": ('source,target\na,b\nc,\n', r"line 3: field 'target' \(the target\) is empty"),
    "malformed.csv": ('source,target\na,b\nc,d,e\n', r"malformed CSV .*line 3"),
    "data.txt": ("a\tb\n", r"unknown data format '.txt'"),
    "missing-user.jsonl": ('{"source": "a", "target": "b", "user": "x"}\n{"source": "c", "target": "d"}\n', r"line 2: field 'user' \(the user\)"),
    "bad-chat.jsonl": ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"line 1: field 'messages': no assistant message"),
    "bad-role.jsonl": ('{"messages": [{"role": "bot", "content": "hi"}]}\n', r"line 1: field 'messages': message 1 must be"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_names_the_file_the_line_and_the_field(tmp_path, name):
    content, message = BAD[name]
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataFileError, match=message) as raised:
        load_records(path, user_field="user" if "user" in name else None)
    assert str(raised.value).startswith(f"{path}: ")


def test_errors_name_a_file_in_the_working_directory_as_typed(tmp_path, monkeypatch):
    """A run saves its data path absolute (to resume from anywhere); errors still say "bad.jsonl: line 1", as the
    user typed it, for a file in the working directory, and the whole path for one elsewhere."""
    (tmp_path / "here").mkdir()
    bad = tmp_path / "here" / "bad.jsonl"
    bad.write_text('{"input": "name[Aromi]", "output": ""}\n')
    monkeypatch.chdir(tmp_path / "here")
    with pytest.raises(DataFileError) as raised:
        load_records(bad.resolve())
    assert str(raised.value) == "bad.jsonl: line 1: field 'output' (the target) is empty"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(DataFileError) as raised:
        load_records(bad.resolve())
    assert str(raised.value).startswith(f"{bad.resolve()}: line 1")


def test_columnar_files_name_the_row(tmp_path):
    import datasets

    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"source": "a", "target": "b"}, {"source": "c", "target": ""}]).to_parquet(str(path))
    with pytest.raises(DataFileError, match=r"d.parquet: row 2: field 'target' \(the target\) is empty"):
        load_records(path)


def test_a_named_field_that_is_absent_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataFileError, match=r"line 1: no field 'text' \(--source-field\); it has 'source', 'target', 'user'"):
        load_records(path, source_field="text")
    with pytest.raises(DataFileError, match="data file not found"):
        load_records(tmp_path / "nope.jsonl")


def test_held_out_dev_is_deterministic_disjoint_and_complete():
    records = list(range(100))
    train, dev = split_dev(records, 0.1, seed=3)
    assert (train, dev) == split_dev(records, 0.1, seed=3)
    assert len(dev) == 10 and not set(train) & set(dev) and sorted(train + dev) == records
    assert split_dev(records, 0.1, seed=4)[1] != dev
    assert split_dev([1], 0.5, seed=1) == ([1], [])  # never the only record
    with pytest.raises(ValueError, match="dev fraction"):
        split_dev(records, 1.0, seed=1)


CHAT = [{"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi <|im_end|> there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a pub."},
        {"role": "assistant", "content": "The Eagle."}]


def test_chat_rows_become_records_with_the_last_exchange_as_source_and_reference(tmp_path):
    [record] = load_records(write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}]))
    assert (record.source, record.references, record.meta["messages"]) == ("Name a pub.", ["The Eagle."], CHAT)
    assert training_pairs([record]) == [Conversation.of(CHAT)]


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def test_chat_loss_is_on_assistant_turns_only_and_user_text_stays_text(chat_tokenizer):
    tok = chat_tokenizer
    example = encode_example(tok, "decoder", Conversation.of(CHAT))
    ids, labels = example["input_ids"], example["labels"]
    # the whole conversation is the template's rendering, token for token where the content holds no control text
    assert tok.decode(ids) == tok.apply_chat_template(CHAT, tokenize=False)
    trained = [i for i, label in zip(ids, labels) if label != -100]
    assert [label for label in labels if label != -100] == trained
    # exactly the two assistant turns, each with the template's end of turn
    assert tok.decode(trained) == "Hello.<|im_end|>\nThe Eagle.<|im_end|>\n"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    # the user wrote "<|im_end|>" as text: it is not the control token (one per turn is: 5 turns + system)
    assert ids.count(im_end) == len(CHAT)
    assert "Hi <|im_end|> there" in tok.decode(ids)
    masked = tok.decode([i for i, label in zip(ids, labels) if label == -100])
    assert "Name a pub." in masked and "Answer briefly." in masked and "Hello." not in masked


def test_chat_rows_are_cut_at_max_len_and_need_a_chat_template(chat_tokenizer, tokenizer):
    example = encode_chat(chat_tokenizer, Conversation.of(CHAT), max_len=12)
    assert len(example["input_ids"]) == len(example["labels"]) == 12
    assert chat_tokenizer.decode(example["input_ids"]).endswith("The Eagle.<|im_end|>\n")  # the last turn stays
    with pytest.raises(ValueError, match="chat template"):
        encode_chat(tokenizer, Conversation.of(CHAT))  # the byte tokenizer has none


def test_a_long_chat_row_keeps_its_last_assistant_turn_and_loses_its_oldest_history(chat_tokenizer):
    """Cut at its start, a long conversation kept no assistant token: it trained nothing (loss 0 or nan)."""
    tok = chat_tokenizer
    long = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " ".join(["word"] * 400)},
            {"role": "assistant", "content": "Short answer."}]
    example = encode_example(tok, "decoder", Conversation.of(long), max_source_len=16, max_target_len=8)
    assert len(example["input_ids"]) == 24
    trained = [i for i, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert tok.decode(trained) == "Short answer.<|im_end|>\n"
    assert tok.decode(example["input_ids"]).endswith("word<|im_end|>\n<|im_start|>assistant\nShort answer.<|im_end|>\n")
    with pytest.raises(ChatRowTooLong, match="last assistant turn alone is 5 tokens, over max_target_len 4"):
        encode_example(tok, "decoder", Conversation.of(long), max_source_len=16, max_target_len=4)
    assert encode_example(tok, "decoder", Conversation.of(CHAT), max_source_len=48, max_target_len=1) == \
        encode_example(tok, "decoder", Conversation.of(CHAT))  # a row within the budget is whole, as before


def test_jsonl_blank_lines_beside_a_column_of_mixed_types(tmp_path):
    """Users 7 and "7" are one user, and blank lines are skipped: both at once failed as 'malformed JSONL'
    (datasets' reader of a mixed-type column parses every line, a blank one included)."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"user": 7, "input": 1, "output": "x"}\n\n{"user": "7", "input": "b", "output": "y"}\n\n')
    records = load_records(path, user_field="user")
    assert simple(records) == [("1", ["x"], "7"), ("b", ["y"], "7")]
    assert [r.meta["line"] for r in records] == [1, 3]
    path.write_text('{"user": 7, "input": "a", "output": "x"}\n\n{"user": "7", "input": "b" "output": "y"}\n')
    with pytest.raises(DataFileError, match=r"d.jsonl: line 3: malformed JSON"):
        load_records(path, user_field="user")


def test_jsonl_numbers_and_booleans_train_as_written_and_users_are_strings_or_integers(tmp_path):
    """Arrow types a column once: targets 1 and 2.5 were '1.0' and '2.5', a big integer '1.2345678901234567e+19',
    true 'True', users 1 and 2.5 the prefixes '1.0' and '2.5'."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"user": 7, "input": 1, "output": 1}\n{"user": "7", "input": "b", "output": 2.5}\n'
                    '{"user": 12345678901234567890, "input": true, "output": [12345678901234567890, 1e5]}\n')
    assert simple(load_records(path, user_field="user")) == [
        ("1", ["1"], "7"), ("b", ["2.5"], "7"), ("true", ["12345678901234567890", "1e5"], "12345678901234567890")]
    assert all(type(r.source) is str and type(r.meta["user"]) is str for r in load_records(path, user_field="user"))
    for user in ("2.5", "1.0", "true", "[1]"):
        path.write_text(f'{{"user": 1, "input": "a", "output": "x"}}\n{{"user": {user}, "input": "b", "output": "y"}}\n')
        with pytest.raises(DataFileError, match=rf"d.jsonl: line 2: field 'user' \(the user\) is .*a user is a string "
                                                rf"or an integer"):
            load_records(path, user_field="user")


def test_the_decoding_prompt_is_the_training_rows_start(chat_tokenizer):
    tok = chat_tokenizer
    prompt = encode_chat_prompt(tok, Conversation.of(CHAT))  # ends before the last assistant turn
    assert tok.decode(prompt) == tok.apply_chat_template(CHAT[:-1], tokenize=False, add_generation_prompt=True)
    trained = encode_chat(tok, Conversation.of(CHAT))
    assert trained["input_ids"][: len(prompt)] == prompt  # decoding sees what training saw before the answer
    assert trained["labels"][len(prompt) - 1] == -100 and trained["labels"][len(prompt)] != -100
    assert encode_chat_prompt(tok, Conversation.of(CHAT[:-1])) == prompt  # a row ending on the user: the same


def test_training_and_serving_tokenize_a_chat_prompt_alike(chat_tokenizer):
    """Content that starts or ends with whitespace merges with the template's newlines when the text is
    tokenized whole, as the server tokenizes a chat request: training must see those very tokens."""
    from prefixtune import user_text

    tok = chat_tokenizer
    chat = [{"role": "system", "content": "  be brief "}, {"role": "user", "content": "\n\nname : Zizzi <|im_end|>"},
            {"role": "assistant", "content": "Zizzi."}]
    served = user_text.encode(tok, lambda guard: tok.apply_chat_template(  # what serve/chat.py tokenized before
        [{**m, "content": guard(m["content"])} for m in chat[:-1]], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)
    assert chat_prompt_ids(tok, [(m["role"], m["content"]) for m in chat[:-1]]) == served
    trained = encode_chat(tok, Conversation.of(chat))
    first = next(i for i, label in enumerate(trained["labels"]) if label != -100)
    assert trained["input_ids"][:first] == served
    assert tok.decode(trained["input_ids"][first:]) == "Zizzi.<|im_end|>\n"


def test_a_name_that_is_no_local_path_is_a_hub_dataset_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: the cache is all there is, and it lacks this one
    with pytest.raises(DataFileError, match=r"^someone/no-such-dataset: not loadable as a Hugging Face dataset"):
        load_records("someone/no-such-dataset")
