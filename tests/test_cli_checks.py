"""The CLI checks what it can before loading the model (seconds), and says what is wrong in one line."""
from __future__ import annotations

import json


from conftest import error_line, invoke

from prefixtune.train_config import TrainConfig

NO_MODEL = "/no/such/model-dir"  # loading it would fail: an error about anything else proves the order




def test_empty_stdin_is_an_error():
    assert "stdin was empty" in error_line(invoke("generate", "--model", NO_MODEL, stdin=""))
    assert "stdin was empty" in error_line(invoke("generate", "--model", NO_MODEL, stdin="\n  \n"))


def test_empty_or_missing_input_file_is_an_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert "holds no non-empty line" in error_line(invoke("generate", "--model", NO_MODEL, "--input-file", empty))
    assert "input file not found" in error_line(invoke("generate", "--model", NO_MODEL, "--input-file",
                                                       tmp_path / "nope.txt"))


def test_generate_checks_the_prefix_before_the_model(tmp_path):
    line = error_line(invoke("generate", "--model", NO_MODEL, "--prefix", tmp_path / "missing.safetensors", "x"))
    assert "prefix file not found" in line
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    assert "not a valid safetensors file" in error_line(invoke("generate", "--model", NO_MODEL, "--prefix", bad, "x"))
    assert "without an exported prefix.safetensors" in error_line(
        invoke("generate", "--model", NO_MODEL, "--prefix", tmp_path, "x"))
    assert "device must be one of" in error_line(invoke("generate", "--model", NO_MODEL, "--device", "tpu", "x"))
    assert "no_repeat_ngram_size" in error_line(
        invoke("generate", "--model", NO_MODEL, "--no-repeat-ngram-size", "-1", "x"))


def test_a_many_users_run_given_as_a_prefix_says_where_its_prefixes_are(tmp_path):
    (tmp_path / "train_config.json").write_text(json.dumps({"method": "prefix-flat", "users": {"tenant": "acme"}}))
    line = error_line(invoke("generate", "--model", NO_MODEL, "--prefix", tmp_path, "x"))
    assert f"holds a many-users run: each user's prefix is in {tmp_path / 'store'}/<tenant hash>/" in line
    assert "prefixtune export" not in line  # what it said: export has no checkpoint to read there


def test_eval_checks_data_and_prefix_before_the_model(tmp_path, data_dir):
    line = error_line(invoke("eval", "--model", NO_MODEL, "--prefix", tmp_path / "p.safetensors",
                             "--data-dir", tmp_path / "no-data"))
    assert "data directory" in line and "does not exist" in line
    line = error_line(invoke("eval", "--model", NO_MODEL, "--prefix", tmp_path / "p.safetensors",
                             "--data-dir", data_dir))
    assert "prefix file not found" in line


def test_train_checks_data_and_output_dir_before_the_model(tmp_path):
    line = error_line(invoke("train", "-o", tmp_path / "run", "--model", NO_MODEL, "--data-dir", tmp_path / "nope"))
    assert "data directory" in line
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "result.json").write_text(json.dumps({}))
    line = error_line(invoke("train", "-o", finished, "--model", NO_MODEL))
    assert "holds a finished run: pass --overwrite to replace it, or choose another" in line
    line = error_line(invoke("train", "-o", finished, "--model", NO_MODEL, "--overwrite"))
    assert "model directory not found" in line and (finished / "result.json").is_file()  # a typo clears no run
    line = error_line(invoke("train", "-o", tmp_path / "run", "--model", NO_MODEL, "--method", "lora"))
    assert "unknown method 'lora'" in line
    # options that would train nothing (or the default epochs) silently, or fail after the model loads
    for flag, value, message in (("--max-steps", "-5", "max_steps must be >= 1"), ("--max-steps", "0", ">= 1"),
                                 ("--train-size", "0", "train_size must be >= 1"), ("--epochs", "0", "epochs must"),
                                 ("--lr", "-1e-3", "lr must be > 0"), ("--eval-every", "-1", "eval_every must"),
                                 ("--prefix-dropout", "1.5", "prefix_dropout must"), ("--precision", "fp8", "fp8")):
        line = error_line(invoke("train", "-o", tmp_path / "run", "--model", NO_MODEL, flag, value))
        assert message in line, (flag, line)
    assert not (tmp_path / "run").exists()


def test_train_refuses_prefix_options_for_a_method_without_a_prefix(tmp_path):
    """--init and --prefix-dropout were accepted by finetune, finetune-top2 and adapter and ignored silently (and
    written in train_config.json as if applied): refused before data or model load, naming the option and the
    methods that use it. At their defaults they are no error; the methods with a prefix take them."""
    for method, flag, value in (("adapter", "--init", "words:table-to-text:"), ("finetune", "--prefix-dropout", "0.2"),
                                ("finetune-top2", "--init", "words:x"), ("embedding-only", "--prefix-dropout", "0.1")):
        line = error_line(invoke("train", "-o", tmp_path / "run", "--model", NO_MODEL, "--method", method, flag, value))
        assert f"{flag} (" in line and f"method {method!r} has no prefix" in line, line
    assert "applies to the methods prefix, prefix-flat, infix, embedding-only;" in error_line(
        invoke("train", "-o", tmp_path / "run", "--model", NO_MODEL, "--method", "adapter", "--init", "words:x"))
    assert not (tmp_path / "run").exists()
    for args in (("--method", "adapter", "--init", "random", "--prefix-dropout", "0"),  # the defaults, typed
                 ("--method", "infix", "--init", "words:x", "--prefix-dropout", "0.1"),
                 ("--method", "embedding-only", "--init", "words:x")):
        line = error_line(invoke("train", "-o", tmp_path / "run", "--model", NO_MODEL, *args))
        assert "has no prefix" not in line and NO_MODEL in line, (args, line)


def test_train_refuses_infinite_epochs_and_lr_before_the_model(tmp_path):
    # --epochs inf was an OverflowError traceback once the model loaded; --lr inf trained every step on NaN
    for flag, message in (("--epochs", "epochs must be > 0 and finite"), ("--lr", "lr must be > 0 and finite")):
        line = error_line(invoke("train", "-o", tmp_path / "run", "--model", NO_MODEL, flag, "inf"))
        assert message in line, (flag, line)
    assert not (tmp_path / "run").exists()


def test_train_refuses_an_adapter_budget_that_is_no_fraction_before_the_model(tmp_path):
    # inf was an OverflowError traceback once the model loaded; nan "cannot convert float NaN to integer"
    for value in ("inf", "nan", "0"):
        line = error_line(invoke("train", "-o", tmp_path / "run", "--model", NO_MODEL, "--method", "adapter",
                                 "--adapter-budget", value))
        assert "adapter_budget must be a fraction > 0" in line, (value, line)


def test_early_stopping_without_a_dev_loss_during_training_is_refused(tmp_path):
    # it was ignored silently: --eval-every 0 measures the dev loss at the end only, --dev-size 0 never
    for flags in (("--eval-every", "0"), ("--dev-size", "0"), ("--data", tmp_path / "d.jsonl", "--user-field", "u",
                                                               "--eval-every", "0")):
        line = error_line(invoke("train", "-o", tmp_path / "run", "--model", NO_MODEL, "--early-stop-patience", "2",
                                 *flags))
        assert "early_stop_patience 2 needs a dev loss during training" in line, (flags, line)
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_negative_or_nan_grad_clip(tmp_path):
    # clip_grad_norm_ with a negative norm scales every gradient by a negative factor: the loss went up
    # (tiny gpt2, 20 steps: 5.696 -> 5.714 with -1, -> 5.664 with 1); NaN made every weight NaN
    for value in ("-1", "nan"):
        line = error_line(invoke("train", "-o", tmp_path / "run", "--model", NO_MODEL, "--grad-clip", value))
        assert "grad_clip must be >= 0" in line, (value, line)
    assert TrainConfig(grad_clip=0).grad_clip == 0  # 0: no clipping, as documented


def test_export_refuses_a_misspelt_which_instead_of_exporting_the_last_step(tmp_path):
    import pytest

    from prefixtune.checkpoint import Checkpoint

    for fmt in ("file", "hf"):
        line = error_line(invoke("export", tmp_path, "--which", "bset", "--format", fmt))
        assert "--which must be best or last, not 'bset'" in line, line
    ckpt = Checkpoint({"w": 1}, {}, {}, 3, {"loss": 0.5, "step": 2, "state": {"w": 0}}, [], {}, {})
    assert ckpt.state("best") == {"w": 0} and ckpt.state("last") == {"w": 1}
    with pytest.raises(ValueError, match="not 'Best'"):
        ckpt.state("Best")  # was the last step, silently


def test_a_model_that_cannot_load_is_one_line():
    assert "model directory not found" in error_line(invoke("generate", "--model", NO_MODEL, "x"))


def test_generate_refuses_options_it_would_ignore(tmp_path):
    """Arguments and --input-file together read only the arguments; --source-field on a text file and --raw on chat
    rows did nothing: each is refused before the model is loaded."""
    text = tmp_path / "in.txt"
    text.write_text("one\ntwo\n")
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert "not both" in error_line(invoke("generate", "--model", NO_MODEL, "--input-file", text, "three"))
    assert "not both" in error_line(invoke("generate", "--model", NO_MODEL, "--input-file", text, "-", stdin="x\n"))
    assert "--source-field applies to a data --input-file" in error_line(
        invoke("generate", "--model", NO_MODEL, "--input-file", text, "--source-field", "input"))
    assert "--source-field applies" in error_line(invoke("generate", "--model", NO_MODEL, "--source-field", "q", "x"))
    assert "--raw applies to text inputs" in error_line(
        invoke("generate", "--model", NO_MODEL, "--input-file", chats, "--raw"))


def test_eval_refuses_a_limit_below_one(tmp_path):
    """eval --limit -1 decoded and scored all items but the last (Python's every[:-1]); --limit 0 none of them."""
    for limit in ("0", "-1"):
        assert "--limit must be >= 1" in error_line(invoke("eval", "--model", NO_MODEL, "--prefix",
                                                           tmp_path / "p.safetensors", "--limit", limit))


def test_a_run_dir_with_a_broken_train_config_is_named(tmp_path):
    """find_export read train_config.json bare: `generate` printed only json's message, `info` a traceback."""
    run = tmp_path / "run"
    run.mkdir()
    for text, message in (('{"method": "prefix",', "train_config.json: unreadable"),
                          ("[1]", "train_config.json: holds a JSON list")):
        (run / "train_config.json").write_text(text)
        assert message in error_line(invoke("generate", "--model", NO_MODEL, "--prefix", run, "x"))
        assert message in error_line(invoke("info", run))


def test_generate_and_eval_refuse_a_batch_size_below_one(tmp_path):
    """--batch-size 0 or -3 decoded one input at a time, silently."""
    assert "--batch-size must be >= 1" in error_line(invoke("generate", "--model", NO_MODEL, "--batch-size", "0", "x"))
    assert "--batch-size must be >= 1" in error_line(invoke("eval", "--model", NO_MODEL, "--prefix",
                                                            tmp_path / "p.safetensors", "--batch-size", "-3"))
