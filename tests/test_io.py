"""Exported prefix files: round trips, corruption, mismatched models, atomic writes."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from prefixtune.prefix_file import PrefixFileError, load_prefix, load_prefix_bytes, save_prefix
from prefixtune.models import model_spec
from prefixtune.prefix import PrefixConfig, build_prefix_encoder


@pytest.fixture
def exported(tokenizer, tmp_path):
    model = tiny_model("llama")
    spec = model_spec(model)
    enc = build_prefix_encoder(model, tokenizer, spec, PrefixConfig(prefix_len=5, mlp_dim=16))
    with torch.no_grad():
        p = enc()
    path = save_prefix(tmp_path / "p.safetensors", p, spec, "tiny-llama", {"lr": 0.1})
    return path, p, spec


def test_round_trip_keeps_tensors_and_metadata(exported):
    path, p, spec = exported
    loaded = load_prefix(path, spec)
    assert set(loaded.p) == set(p)
    for g in p:
        assert torch.equal(loaded.p[g], p[g])
    assert loaded.metadata["base_model"] == "tiny-llama"
    assert loaded.metadata["fingerprint"] == spec.fingerprint()
    assert loaded.metadata["prefix_len"] == "5"
    assert "layers x 2 x kv_heads x head_dim" in loaded.metadata["layout"]
    assert loaded.metadata["dtype"] == "float32"
    assert '"lr": 0.1' in loaded.metadata["train_config"]
    assert loaded.prefix_len == 5


def test_no_temp_files_left(exported):
    path, _, _ = exported
    assert [f.name for f in path.parent.iterdir()] == ["p.safetensors"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_corrupt_file_is_refused_clearly(exported, damage):
    path, _, spec = exported
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-10] ^= 0xFF  # inside the tensor bytes: only the checksum can see it
    elif damage == "garbage":
        data = bytearray(b"not a safetensors file at all" * 3)
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(PrefixFileError, match="corrupt|not a valid|not a prefixtune"):
        load_prefix(path, spec)


def test_mismatched_model_is_refused_naming_the_difference(exported):
    path, _, _ = exported
    other = model_spec(tiny_model("gpt2"))
    with pytest.raises(PrefixFileError, match="num_kv_heads"):
        load_prefix(path, other)


def test_missing_file(tmp_path):
    with pytest.raises(PrefixFileError, match="not found"):
        load_prefix(tmp_path / "nope.safetensors")


def test_foreign_safetensors_is_refused(tmp_path):
    from safetensors.torch import save

    with pytest.raises(PrefixFileError, match="not a prefixtune"):
        load_prefix_bytes(save({"w": torch.zeros(2)}))


def test_unknown_model_is_a_clear_error(monkeypatch, tmp_path):
    from prefixtune.models import load_base_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="model 'no-such-org/no-such-model' is not in the local hub cache "
                                                "and HF_HUB_OFFLINE is set"):
        load_base_model("no-such-org/no-such-model")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_base_model(str(tmp_path / "missing.gguf"))


def test_readable_metadata_has_real_json_values(exported):
    from prefixtune.prefix_file import readable_metadata

    path, _, spec = exported
    meta = readable_metadata(load_prefix(path, spec).metadata)
    assert meta["prefix_len"] == 5 and meta["groups"] == {"decoder": 2}
    assert meta["model_spec"]["num_kv_heads"] == 2 and meta["train_config"] == {"lr": 0.1}
    assert isinstance(meta["sha256"], str) and isinstance(meta["fingerprint"], str)
    assert readable_metadata({"fingerprint": "1234567890123456"})["fingerprint"] == "1234567890123456"


# -- one validation for every way in (issue 10) ----------------------------------------------------
def _forged(data: bytes, tensors=None, **metadata) -> bytes:
    """`data` with tensors transformed / metadata replaced and the checksum made to match again."""
    import json
    import struct

    from safetensors.torch import load, save

    from prefixtune.prefix_file import _digest

    meta = {**json.loads(data[8: 8 + struct.unpack("<Q", data[:8])[0]])["__metadata__"], **metadata}
    loaded = load(data)
    loaded = tensors(loaded) if tensors else loaded
    return save(loaded, metadata={**meta, "sha256": _digest(loaded)})


@pytest.mark.parametrize("template", ["{source:>20000000}", "{source.__class__.__mro__}", "{source[0]}",
                                      "{source!r}", "{other}", "{}", "{source", "}{source}", "no field",
                                      "{source}{source}", "x" * 1001 + "{source}", 7])
def test_a_template_is_data_not_code(exported, tokenizer, template):
    import json

    from prefixtune.bank import PrefixBank
    from prefixtune.prefix_file import ExportedPrefix

    path, p, spec = exported
    bad = save_prefix(path.parent / "bad.safetensors", p, spec, "tiny-llama", {"template": template})
    with pytest.raises(PrefixFileError, match="template"):
        load_prefix(bad, spec)
    bank = PrefixBank(tiny_model("llama"), tokenizer)  # the same rule for a prefix built in memory
    metadata = {"fingerprint": spec.fingerprint(), "train_config": json.dumps({"template": template})}
    with pytest.raises(PrefixFileError, match="template"):
        bank.add("p", ExportedPrefix(p, metadata))
    assert bank.ids() == []


def test_a_template_is_filled_without_str_format(exported, tokenizer):
    from prefixtune.bank import PrefixBank
    from prefixtune.templates import fill_template

    assert fill_template("{{x}} {source}\n", "{source.__class__} {0}") == "{x} {source.__class__} {0}\n"
    path, p, spec = exported
    ok = save_prefix(path.parent / "ok.safetensors", p, spec, "tiny-llama", {"template": "In: {source} {{Out}}:"})
    bank = PrefixBank(tiny_model("llama"), tokenizer)
    bank.add("p", ok)
    assert bank.encode("{source:>99}", "p") == tokenizer("In: {source:>99} {Out}:")["input_ids"]


def test_malformed_files_are_prefix_file_errors(exported):
    import json
    import struct

    from safetensors.torch import save

    from prefixtune.prefix_file import FORMAT

    path, _, spec = exported
    good = path.read_bytes()
    list_header = struct.pack("<Q", 2) + b"[]"
    scalar = save({"prefix.decoder": torch.tensor(1.0)}, metadata={"format": FORMAT, "sha256": "0"})
    cases = {"list header": (list_header, "not an object"),
             "metadata not strings": (_with_header(good, lambda h: {**h, "__metadata__": {"format": 1}}),
                                      "not a valid"),
             "scalar tensor": (scalar, "inconsistent shapes"),
             "int32": (_forged(good, lambda d: {k: v.to(torch.int32) for k, v in d.items()}), "is int32"),
             "bool": (_forged(good, lambda d: {k: v > 0 for k, v in d.items()}), "is bool"),
             "float64": (_forged(good, lambda d: {k: v.double() for k, v in d.items()}, dtype="float64"),
                         "is float64"),
             "fp16 said float32": (_forged(good, lambda d: {k: v.half() for k, v in d.items()}), "declares"),
             "no tokens": (_forged(good, lambda d: {k: v[:0] for k, v in d.items()}), "0 virtual tokens"),
             "nan": (_forged(good, lambda d: {k: v * float("nan") for k, v in d.items()}), "NaN"),
             "train_config a list": (_forged(good, train_config=json.dumps([1])), "not a JSON object"),
             "model_spec a list": (_forged(good, fingerprint="x", model_spec="[]"), "different shape")}
    for label, (data, message) in cases.items():
        with pytest.raises(PrefixFileError, match=message):
            load_prefix_bytes(data, spec, source=label)
    half = _forged(good, lambda d: {k: v.half() for k, v in d.items()}, dtype="float16")
    assert load_prefix_bytes(half, spec).prefix_len == 5  # an fp16 export that says so is fine


def test_a_header_of_many_tensors_or_megabytes_is_refused_before_it_is_parsed(exported):
    """200,000 empty tensors in 11 MB (an upload's size) cost 160 MB and seconds to parse; 1 MB of padding
    in a header is no prefix either."""
    from safetensors.torch import save

    from prefixtune.interop.peft import check_adapter
    from prefixtune.prefix_file import MAX_TENSORS

    path, _, spec = exported
    many = save({f"t{i}": torch.zeros(0) for i in range(MAX_TENSORS + 1)}, metadata={"format": "x"})
    with pytest.raises(PrefixFileError, match=f"it holds {MAX_TENSORS + 1} tensors; a prefix file holds at most"):
        load_prefix_bytes(many, spec)
    config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 5, "num_layers": 2,
              "token_dim": 16, "num_attention_heads": 2}
    with pytest.raises(PrefixFileError, match="tensors; a prefix file holds at most"):
        check_adapter(config, many)
    padded = _with_header(path.read_bytes(), lambda h: {**h, "__metadata__": {**h["__metadata__"],
                                                                               "pad": "x" * (1 << 20)}})
    with pytest.raises(PrefixFileError, match="its header is .* bytes; a prefix file's is at most"):
        load_prefix_bytes(padded, spec)


def _with_header(data: bytes, change) -> bytes:
    import json
    import struct

    n = struct.unpack("<Q", data[:8])[0]
    header = json.dumps(change(json.loads(data[8: 8 + n]))).encode()
    return struct.pack("<Q", len(header)) + header + data[8 + n:]


def test_a_checkpoint_is_fsynced_before_it_takes_the_name(tmp_path, monkeypatch):
    """Else a power loss after the rename can leave checkpoint.pt empty: the run and its best step lost."""
    import os

    from prefixtune import atomic

    events, fsync, rename = [], os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)), fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (events.append(("replace", os.stat(a).st_ino)),
                                                            rename(a, b))[1])
    atomic.atomic_torch_save({"step": 3, "t": torch.ones(2)}, tmp_path / "checkpoint.pt")
    assert [e[0] for e in events] == ["fsync", "replace"] and events[0][1] == events[1][1]  # the temp file's bytes
    assert torch.load(tmp_path / "checkpoint.pt")["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.parametrize("change", ["int64", "float64", "3-d", "1-d", "two lengths"])
def test_an_in_memory_prefix_is_checked_as_a_file_is(exported, tokenizer, change):
    """bank.add(ExportedPrefix) goes through check_prefix: a tensor no prefix file may hold is refused there too,
    not decoded (an int64 prefix decoded as if it were zeros)."""
    from prefixtune.bank import PrefixBank
    from prefixtune.prefix_file import ExportedPrefix

    path, _, spec = exported
    good = load_prefix(path, spec)
    p = good.p["decoder"]
    bad = {"int64": {"decoder": p.long()}, "float64": {"decoder": p.double()},
           "3-d": {"decoder": p.unsqueeze(-1)}, "1-d": {"decoder": p[0]},
           "two lengths": {"decoder": p, "extra": p[:2]}}[change]
    bank = PrefixBank(tiny_model("llama"), tokenizer)
    bank.add("good", good)
    with pytest.raises(PrefixFileError, match="float32, float16 or bfloat16|inconsistent shapes"):
        bank.add("bad", ExportedPrefix(bad, good.metadata))
    assert bank.ids() == ["good"]


def test_weights_of_another_shape_are_a_prefix_file_error(tmp_path, tokenizer):
    """A weights file whose tensors do not fit its method (fingerprint equal) raised RuntimeError from
    load_state_dict, a traceback out of `generate`; it is a PrefixFileError naming the file."""
    import json

    from safetensors.torch import save_file

    from prefixtune.exported import load_weights

    model = tiny_model("llama")
    meta = {"format": "prefixtune.weights/1", "method": "finetune", "base_model": "tiny-llama",
            "fingerprint": model_spec(model).fingerprint(), "train_config": json.dumps({"method": "finetune"})}
    path = tmp_path / "w.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, str(path), metadata=meta)
    with pytest.raises(PrefixFileError, match="size mismatch for model.embed_tokens.weight"):
        load_weights(path, model, tokenizer)


def test_bank_generate_refuses_prefix_ids_of_another_length(exported, tokenizer):
    """generate(3 inputs, 2 prefix ids) returned 2 outputs: zip dropped the third input silently."""
    from prefixtune.bank import PrefixBank

    path, _, spec = exported
    bank = PrefixBank(tiny_model("llama"), tokenizer)
    bank.add("a", path)
    with pytest.raises(ValueError, match="3 inputs but 2 prefix ids"):
        bank.generate(["one", "two", "three"], ["a", None], max_new_tokens=2)
    assert len(bank.generate(["one", "two"], ["a", None], max_new_tokens=2)) == 2
