"""PEFT interop and HF-style prefix folders: every fact about PEFT's layout checked against peft 0.21.2 itself.

Round trips prefixtune -> PEFT -> prefixtune (through PEFT's own loader and saver), PEFT's logits against
ours for a row of a mixed batch, a prefix trained by PEFT decoding in a mixed batch exactly as PEFT's own
forward pass predicts (teacher-forced), seq2seq refusals, folders wherever a prefix file goes (bank, CLI,
server upload), model cards, and the hub commands against a pre-filled HF cache with HF_HUB_OFFLINE=1.
"""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import REPO, ByteTokenizer, tiny_model
from prefixtune import cache
from prefixtune.bank import PrefixBank
from prefixtune.generation import DecodingConfig, left_pad
from prefixtune.interop import peft as peft_io
from prefixtune.interop.folders import archive_to_prefix_bytes
from prefixtune.interop.folders import load_any
from prefixtune.interop.hub import from_pretrained, save_pretrained
from prefixtune.prefix_file import ExportedPrefix, PrefixFileError, load_prefix_bytes, prefix_to_bytes
from prefixtune.models import model_spec
from prefixtune.forward import position_ids, prefix_kv_from_groups, prefix_offsets
from prefixtune.prefix import PrefixConfig, build_prefix_encoder

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

ROWS = [[5, 17, 33, 99, 120, 7], [40, 41, 42], [9, 200, 31, 77, 12, 150, 88, 3, 64]]


def our_prefix(model, seed: int, length: int = 4, scale: float = 3.0) -> ExportedPrefix:
    """A random prefix, scaled up so that it clearly changes the model's predictions."""
    spec = model_spec(model)
    enc = build_prefix_encoder(model, ByteTokenizer(), spec, PrefixConfig(prefix_len=length, mlp_dim=16), seed=seed)
    with torch.no_grad():
        p = {g: t * scale for g, t in enc().items()}
    return load_prefix_bytes(prefix_to_bytes(p, spec, model.config._name_or_path), spec)


def peft_from(folder, family: str, seed: int = 0):
    """PEFT's own loader on a fresh copy of the tiny base model (default attention, not ours)."""
    return peft.PeftModel.from_pretrained(tiny_model(family, seed), str(folder)).eval()


def peft_logits(pm, row: list[int]) -> torch.Tensor:
    ids = torch.tensor([row])
    with torch.no_grad():
        return pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]


def prefixtune_logits(model, rows, prefixes) -> list[torch.Tensor]:
    """Our forward over a left-padded mixed batch, positions and prefixes exactly as training and decoding use."""
    spec = model_spec(model)
    ids, mask = left_pad(rows, 0, model.device)
    kv = prefix_kv_from_groups([None if p is None else p.p for p in prefixes], spec)
    cache.install(model)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, prefix_kv=kv,
                       position_ids=position_ids(mask, prefix_offsets(kv, len(rows), ids.device))).logits
    return [logits[i, -len(r):] for i, r in enumerate(rows)]


def greedy(rows, prefix_ids, bank, steps=8):
    return bank.generate_ids(rows, prefix_ids, DecodingConfig(max_new_tokens=steps, stop_at_newline=False,
                                                              ignore_eos=True))


# -- the layout, through PEFT itself ----------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_export_is_what_peft_itself_writes_and_round_trips_exactly(family, tmp_path):
    model = tiny_model(family)
    spec = model_spec(model)
    exported = our_prefix(model, seed=1, length=4)
    save_pretrained(exported, tmp_path / "peft", fmt="peft")
    ours = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    # PEFT's own config for this model: every shape field agrees (GQA: token_dim = kv_heads * head_dim)
    own = peft.get_peft_model(tiny_model(family), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    own = own.peft_config["default"].to_dict()
    for key in ("peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads",
                "num_transformer_submodules", "encoder_hidden_size"):
        assert ours[key] == (own[key].value if hasattr(own[key], "value") else own[key]), key
    assert ours["num_attention_heads"] == spec.num_kv_heads and ours["prefix_projection"] is False
    assert ours["token_dim"] == spec.num_kv_heads * spec.head_dim
    # PEFT loads it into its prompt encoder unchanged, and saves it back unchanged
    pm = peft_from(tmp_path / "peft", family)
    assert torch.equal(pm.prompt_encoder["default"].embedding.weight, exported.p["decoder"])
    pm.save_pretrained(tmp_path / "again")
    back = load_any(tmp_path / "again", spec)  # a PEFT folder, read where a prefix file is
    # a PEFT model set up for training takes the file as it is (what Trainer's resume does; peft #2256)
    from safetensors.torch import load_file

    training = peft.get_peft_model(tiny_model(family), peft.PrefixTuningConfig(**{**ours, "inference_mode": False}))
    peft.set_peft_model_state_dict(training, load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert torch.equal(training.prompt_encoder["default"].embedding.weight, exported.p["decoder"])
    assert torch.equal(back.p["decoder"], exported.p["decoder"])
    # and PEFT's cache holds our keys/values slot for slot, with no RoPE applied at load
    kv = prefix_kv_from_groups([exported.p], spec)
    prompt = pm.get_prompt(1)
    for i, layer in enumerate(prompt.layers):
        assert torch.equal(layer.keys, kv.keys[f"decoder.{i}"]) and torch.equal(layer.values, kv.values[f"decoder.{i}"])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peft_logits_equal_ours_for_a_row_of_a_mixed_batch(family, tmp_path):
    model = tiny_model(family)
    exported, other = our_prefix(model, seed=1, length=4), our_prefix(model, seed=2, length=7)
    save_pretrained(exported, tmp_path / "peft", fmt="peft")
    pm = peft_from(tmp_path / "peft", family)
    # rows 0 and 2 carry the exported prefix, row 1 another one: different lengths, left padding
    mixed = prefixtune_logits(model, ROWS, [exported, other, exported])
    for i in (0, 2):
        reference = peft_logits(pm, ROWS[i])
        assert (mixed[i] - reference).abs().max() < 1e-4
        assert (prefixtune_logits(model, [ROWS[i]], [exported])[0] - reference).abs().max() < 1e-5
    bare = tiny_model(family)(torch.tensor([ROWS[0]])).logits[0]
    assert (peft_logits(pm, ROWS[0]) - bare).abs().max() > 0.05  # the prefix matters


def test_a_prefix_trained_by_peft_decodes_in_a_mixed_batch_as_peft_predicts(tmp_path):
    torch.manual_seed(0)
    pm = peft.get_peft_model(tiny_model("llama"), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    prompts = torch.randint(3, 259, (8, 6))
    batch = torch.cat([prompts, torch.tensor([[42, 43, 44, 45, 46, 47]] * 8)], dim=1)
    losses = []
    for _ in range(8):
        loss = pm(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    pm.save_pretrained(tmp_path / "trained")

    model = tiny_model("llama")
    bank = PrefixBank(model, ByteTokenizer())
    bank.add("peft", tmp_path / "trained")  # a PEFT folder, where a prefix file goes
    bank.add("other", our_prefix(model, seed=3, length=2))
    bank.add("longer", our_prefix(model, seed=4, length=9))
    rows = [ROWS[0], ROWS[1], ROWS[2], ROWS[0], ROWS[2]]
    prefix_ids = ["peft", "other", "peft", None, "longer"]
    decoded = greedy(rows, prefix_ids, bank)
    reference = peft_from(tmp_path / "trained", "llama")
    for row, pid, tokens in zip(rows, prefix_ids, decoded):
        if pid != "peft":
            continue
        assert len(tokens) == 8
        for t in range(len(tokens)):  # PEFT's own forward pass, teacher-forced on the same tokens
            assert int(peft_logits(reference, row + tokens[:t])[-1].argmax()) == tokens[t], (row, t)
    assert decoded[0] != decoded[3]  # same input, with and without the PEFT prefix


def test_peft_generate_does_not_decode_with_the_prefix(tmp_path):
    """Why PEFT's generate cannot be the reference (README, "Coming from PEFT"): measured with peft 0.21.2 and
    transformers 5.24 on a Llama-family model, it returns the bare model's tokens."""
    model = tiny_model("llama")
    exported = our_prefix(model, seed=1)
    save_pretrained(exported, tmp_path / "peft", fmt="peft")
    pm = peft_from(tmp_path / "peft", "llama")
    ids = torch.tensor([ROWS[0]])
    with torch.no_grad():
        theirs = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        bare = tiny_model("llama").generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                            do_sample=False)
    bank = PrefixBank(model, ByteTokenizer())
    bank.add("p", exported)
    ours = greedy([ROWS[0]], ["p"], bank, steps=6)[0]
    assert theirs[0, len(ROWS[0]):].tolist() == bare[0, len(ROWS[0]):].tolist() != ours


# -- seq2seq: what PEFT's layout cannot carry --------------------------------------------------------
@pytest.mark.parametrize("family", ["bart", "t5"])
def test_seq2seq_export_is_refused_unless_lossy_is_allowed(family, tmp_path):
    model = tiny_model(family)
    exported = our_prefix(model, seed=1)
    with pytest.raises(peft_io.LossyExportError, match="cross.*encoder|encoder.*cross") as err:
        save_pretrained(exported, tmp_path / "refused", fmt="peft")
    assert "--allow-lossy" in str(err.value) and not (tmp_path / "refused").exists()
    save_pretrained(exported, tmp_path / "lossy", fmt="peft", allow_lossy=True)
    config = json.loads((tmp_path / "lossy" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM" and config["num_transformer_submodules"] == 2
    pm = peft.PeftModel.from_pretrained(tiny_model(family), str(tmp_path / "lossy"))
    # PEFT's decoder self-attention of layer 0 reads our decoder layer 0 (with 2 layers, PEFT's layer 1 reads it too)
    kv = prefix_kv_from_groups([exported.p], model_spec(model))
    first = pm.get_prompt(1).self_attention_cache.layers[0]
    assert torch.equal(first.keys, kv.keys["decoder.0"]) and torch.equal(first.values, kv.values["decoder.0"])
    with pytest.raises(PrefixFileError, match="SEQ_2_SEQ_LM"):
        load_any(tmp_path / "lossy", model_spec(model))


def test_seq2seq_lossy_export_follows_peft_layer_mapping():
    """PEFT reads a seq2seq tensor as decoder layer i <- slots of layer 2i mod L (checked here with 3 layers)."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(
        encoder_layers=3, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4, d_model=32,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, vocab_size=300,
        decoder_start_token_id=2, forced_bos_token_id=None)).eval()
    exported = our_prefix(model, seed=1)
    config, tensors = peft_io.to_peft(exported, model_spec(model), allow_lossy=True)
    pm = peft.get_peft_model(model, peft.PrefixTuningConfig(**{k: v for k, v in config.items()
                                                              if k not in ("revision", "auto_mapping")}))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(tensors["prompt_embeddings"])
    pm.eval()
    kv = prefix_kv_from_groups([exported.p], model_spec(model))
    for i, layer in enumerate(pm.get_prompt(1).self_attention_cache.layers):  # 3 layers: every one carried
        assert torch.equal(layer.keys, kv.keys[f"decoder.{i}"]), i


# -- validation: a PEFT folder is checked as a prefix file is ---------------------------------------
def test_peft_folders_are_validated_with_clear_errors(tmp_path):
    llama, gpt2 = tiny_model("llama"), tiny_model("gpt2")
    save_pretrained(our_prefix(gpt2, seed=1), tmp_path / "gpt2", fmt="peft")
    bank = PrefixBank(llama, ByteTokenizer())
    with pytest.raises(PrefixFileError, match="num_layers|num_attention_heads|token_dim"):
        bank.add("wrong", tmp_path / "gpt2")
    with pytest.raises(PrefixFileError, match="prefixtune import"):
        load_any(tmp_path / "gpt2")  # no base model to read it against

    good = tmp_path / "good"
    save_pretrained(our_prefix(llama, seed=1), good, fmt="peft")
    config = json.loads((good / "adapter_config.json").read_text())
    weights = (good / "adapter_model.safetensors").read_bytes()
    spec = model_spec(llama)

    def broken(name, cfg=None, data=None):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(cfg if cfg is not None else config))
        if data is not None:
            (folder / "adapter_model.safetensors").write_bytes(data)
        return folder

    cases = {
        "lora": (broken("lora", {**config, "peft_type": "LORA"}, weights), "not PREFIX_TUNING"),
        "missing": (broken("missing"), "without adapter_model.safetensors"),
        "garbage": (broken("garbage", data=b"not safetensors" * 4), "not a valid safetensors"),
        "length": (broken("length", {**config, "num_virtual_tokens": 5}, weights), "shape"),
        "json": (broken("json", {}, weights), "not PREFIX_TUNING"),
    }
    (cases["json"][0] / "adapter_config.json").write_text("{not json")
    cases["json"] = (cases["json"][0], "unreadable adapter_config.json")
    for label, (folder, message) in cases.items():
        with pytest.raises(PrefixFileError, match=message):
            bank.add(label, folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PrefixFileError, match="expected prefix.safetensors"):
        load_any(empty, spec)
    assert bank.ids() == []


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_archives_of_either_folder_become_the_same_prefix_file(tmp_path):
    model = tiny_model("llama")
    spec = model_spec(model)
    exported = our_prefix(model, seed=1)
    save_pretrained(exported, tmp_path / "peft", fmt="peft")
    save_pretrained(exported, tmp_path / "hf")
    for data in (_zip(_folder_files(tmp_path / "peft")), _tar_gz({"x/" + k: v for k, v in
                                                                  _folder_files(tmp_path / "hf").items()})):
        back = load_prefix_bytes(archive_to_prefix_bytes(data, spec, 1 << 20), spec)
        assert torch.equal(back.p["decoder"], exported.p["decoder"])
    with pytest.raises(PrefixFileError, match="expected"):
        archive_to_prefix_bytes(_zip({"notes.txt": b"hi"}), spec, 1 << 20)
    with pytest.raises(PrefixFileError, match="limit"):
        archive_to_prefix_bytes(_zip(_folder_files(tmp_path / "peft")), spec, 100)


def test_server_takes_an_archived_peft_adapter_and_decodes_it_like_the_bank(tmp_path):
    import httpx

    from prefixtune.serve import BackgroundServer, KeyRing, ServeSettings, create_app

    model = tiny_model("llama")
    tokenizer = ByteTokenizer()
    exported = our_prefix(model, seed=1)
    save_pretrained(exported, tmp_path / "peft", fmt="peft")
    save_pretrained(our_prefix(tiny_model("gpt2"), seed=1), tmp_path / "wrong", fmt="peft")
    settings = ServeSettings(store_dir=tmp_path / "store", dtype="fp32")  # as the bank below
    server = BackgroundServer(create_app(model, tokenizer, settings, KeyRing([("sk-alice-0123456789", "alice")]))).start()
    try:
        url, headers = f"{server.url}/v1/prefixes", {"Authorization": "Bearer sk-alice-0123456789"}
        r = httpx.put(f"{url}/adapter", content=_zip(_folder_files(tmp_path / "peft")), headers=headers, timeout=60)
        assert r.status_code == 201, r.text
        assert r.json()["prefix_len"] == 4
        r = httpx.put(f"{url}/wrong", content=_zip(_folder_files(tmp_path / "wrong")), headers=headers, timeout=60)
        assert r.status_code == 400 and "made for base model 'tiny-gpt2', not this server's tiny-llama" in \
            r.json()["error"]["message"]
        r = httpx.put(f"{url}/empty", content=_zip({"README.md": b"# hi"}), headers=headers, timeout=60)
        assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
        stored = list((tmp_path / "store").rglob("*.safetensors"))
        assert len(stored) == 1 and torch.equal(load_any(stored[0], model_spec(model)).p["decoder"],
                                                exported.p["decoder"])
        body = {"model": "adapter", "prompt": "name : Aromi", "max_tokens": 6, "temperature": 0}
        text = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=60).json()
        bank = PrefixBank(model, tokenizer)
        bank.add("adapter", tmp_path / "peft")
        ids = bank.generate_ids([bank.encode("name : Aromi", "adapter")], ["adapter"], DecodingConfig(max_new_tokens=6))
        assert text["choices"][0]["text"] == tokenizer.decode(ids[0], skip_special_tokens=True)
    finally:
        server.stop()


# -- HF-style folders, model cards, the hub --------------------------------------------------------
def test_save_and_from_pretrained_keep_the_file_exactly(tmp_path):
    model = tiny_model("llama")
    spec = model_spec(model)
    exported = our_prefix(model, seed=1)
    folder = save_pretrained(exported, tmp_path / "e2e-prefix", base_params=12345)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "prefix.safetensors"]
    back = from_pretrained(folder, spec)
    assert back.metadata == exported.metadata and torch.equal(back.p["decoder"], exported.p["decoder"])
    assert from_pretrained(folder / "prefix.safetensors").metadata == exported.metadata
    with pytest.raises(PrefixFileError, match="num_kv_heads"):
        from_pretrained(folder, model_spec(tiny_model("gpt2")))


def _hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = "0" * 40) -> Path:
    """What a download leaves in the HF cache: snapshots/<commit>/FILES and refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An HF cache under tmp_path, with the hub unreachable (HF_HUB_OFFLINE=1), in this process and in children."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_from_pretrained_reads_a_hub_id_from_the_cache_offline(tmp_path, offline_hub):
    model = tiny_model("llama")
    exported = our_prefix(model, seed=1)
    save_pretrained(exported, tmp_path / "up")
    _hub_cache(offline_hub, "alice/e2e-prefix", _folder_files(tmp_path / "up"))
    back = from_pretrained("alice/e2e-prefix", model_spec(model))
    assert torch.equal(back.p["decoder"], exported.p["decoder"])
    with pytest.raises(PrefixFileError, match="cannot fetch 'alice/missing'"):
        from_pretrained("alice/missing")


def test_training_writes_a_model_card_with_hub_metadata(tmp_path):
    from huggingface_hub import ModelCard

    from prefixtune.train import TrainConfig, train

    model = tiny_model("llama")
    pairs = [("name : Aromi | food : Thai", "Aromi serves Thai food."), ("name : Zizzi", "Zizzi is a pub.")] * 4
    config = TrainConfig(output_dir=str(tmp_path / "run"), model="tiny-llama", max_steps=2, batch_size=4,
                         prefix_len=3, mlp_dim=16, eval_every=1, save_every=0, init="words:table-to-text:")
    result = train(config, model, ByteTokenizer(), pairs, pairs[:2], progress=False)
    card = ModelCard.load(tmp_path / "run" / "README.md")
    meta = card.data.to_dict()
    assert meta["base_model"] == "tiny-llama" and meta["library_name"] == "prefixtune"
    # trained on pairs given to the API: the user's own data, not E2E (test_card_provenance.py covers the rest)
    assert {"prefixtune", "prefix-tuning"} <= set(meta["tags"]) and not meta.get("datasets")
    dev = meta["model-index"][0]["results"][0]
    assert dev["metrics"][0]["type"] == "loss" and dev["metrics"][0]["value"] == round(result.best_dev_loss, 4)
    params = result.shipped_params
    share = 100 * params / sum(p.numel() for p in model.parameters())
    assert "| prefix length | 3 virtual tokens |" in card.text
    assert f"| parameters | {params:,} ({share:.3f}% of the base model's" in card.text
    assert "train(TrainConfig(" in card.text and "prefix_len=3" in card.text and "mlp_dim=16" in card.text
    assert "init='words:table-to-text:'" in card.text and "max_steps=2" in card.text
    for usage in ("prefixtune generate --model tiny-llama --prefix", "bank.add(", "/v1/prefixes/run"):
        assert usage in card.text


# -- the commands a PEFT user types ------------------------------------------------------------------


def cli(*args, check=True):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-m", "prefixtune.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_peft_user_commands_import_generate_export_push_pull(tiny_dir, tmp_path, offline_hub, monkeypatch):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from prefixtune.cli import app

    # a PEFT user's adapter, made and saved by PEFT
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    pm = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.mul_(50)
    pm.save_pretrained(tmp_path / "adapter")
    weight = pm.prompt_encoder["default"].embedding.weight.detach().clone()

    def inline(*args, code=0):  # in this process (fast); the lines a user types run as subprocesses below
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == code, result.output
        return result

    summary = json.loads(cli("import", tmp_path / "adapter", "--model", tiny_dir, "-o", tmp_path / "p.safetensors").stdout)
    assert summary["prefix_len"] == 4
    assert torch.equal(load_any(tmp_path / "p.safetensors").p["decoder"], weight)
    by_folder = cli("generate", "--model", tiny_dir, "--prefix", tmp_path / "adapter", "--max-new-tokens", 5,
                    "name : Aromi").stdout
    assert by_folder == inline("generate", "--model", tiny_dir, "--prefix", tmp_path / "p.safetensors",
                               "--max-new-tokens", 5, "name : Aromi").stdout
    assert by_folder != inline("generate", "--model", tiny_dir, "--max-new-tokens", 5, "name : Aromi").stdout

    # back to PEFT, and to an HF-style folder; both with a model card
    inline("export", tmp_path / "p.safetensors", "--format", "peft", "--out", tmp_path / "to-peft")
    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(tmp_path / "to-peft"))
    assert torch.equal(reloaded.prompt_encoder["default"].embedding.weight, weight)
    inline("export", tmp_path / "p.safetensors", "--format", "hf", "--out", tmp_path / "e2e-prefix")
    assert "Trained with PEFT" in (tmp_path / "e2e-prefix" / "README.md").read_text()
    assert json.loads(inline("info", tmp_path / "e2e-prefix").stdout)["prefix_len"] == 4  # real JSON values
    assert "--out" in inline("export", tmp_path / "p.safetensors", "--format", "peft", code=2).output

    # push (the hub replaced by the local cache), then pull offline in a fresh process
    pushed = []

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, **kw):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir() if p.name in allow_patterns}
        pushed.append(sorted(files))
        _hub_cache(offline_hub, repo_id, files, commit="1" * 40)
        return "https://huggingface.co/alice/e2e-prefix/commit/" + "1" * 40

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", lambda self, repo_id, **kw: repo_id)
    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", upload_folder)
    inline("push", tmp_path / "e2e-prefix", "alice/e2e-prefix")
    assert pushed == [["README.md", "prefix.safetensors"]]
    inline("push", tmp_path / "to-peft", "alice/e2e-peft")
    assert pushed[-1] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"broken")
    inline("push", tmp_path / "adapter", "alice/broken", code=2)
    assert len(pushed) == 2  # checked before anything is uploaded
    folder = Path(cli("pull", "alice/e2e-prefix").stdout.strip())
    assert folder.is_relative_to(offline_hub) and (folder / "README.md").is_file()
    assert torch.equal(load_any(folder).p["decoder"], weight)
    missing = cli("pull", "alice/nothing-here", check=False)
    assert missing.returncode == 2 and "cannot fetch" in missing.stderr


# -- the embedded SmolLM2-135M (30 layers, GQA 9/3 heads) -------------------------------------------
@pytest.mark.slow
def test_smollm2_round_trip_logits_and_peft_generate(tmp_path):
    from prefixtune.models import load_base_model

    try:
        model, tokenizer = load_base_model("smollm2-135m")
        reference_base, _ = load_base_model("smollm2-135m")  # PEFT's copy keeps transformers' own attention
    except FileNotFoundError as e:
        pytest.skip(str(e))
    spec = model_spec(model)
    words = build_prefix_encoder(model, tokenizer, spec, PrefixConfig(prefix_len=10, init="words:table-to-text:"))
    with torch.no_grad():
        exported = load_prefix_bytes(prefix_to_bytes(words(), spec, "smollm2-135m"), spec)
    other = our_prefix(model, seed=5, length=6, scale=1.0)
    save_pretrained(exported, tmp_path / "peft", fmt="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["num_layers"], config["num_attention_heads"], config["token_dim"]) == (30, 3, 192)
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    pm = peft.PeftModel.from_pretrained(reference_base, str(tmp_path / "peft")).eval()
    pm.save_pretrained(tmp_path / "again")
    assert torch.equal(load_any(tmp_path / "again", spec).p["decoder"], exported.p["decoder"])

    sources = ["name : The Eagle | Type : coffee shop | food : French | area : riverside\n", "name : Zizzi\n"]
    rows = [tokenizer(s)["input_ids"] for s in sources]
    alone = max((prefixtune_logits(model, [r], [exported])[0] - peft_logits(pm, r)).abs().max().item() for r in rows)
    mixed = prefixtune_logits(model, [rows[0], rows[1], rows[1]], [exported, other, exported])
    mixed = max((mixed[i][-1] - peft_logits(pm, rows[j])[-1]).abs().max().item() for i, j in ((0, 0), (2, 1)))
    print(f"\nSmolLM2-135M, max |PEFT - prefixtune| logits: a row alone {alone:.3g} (every position); "
          f"a row of a mixed left-padded batch {mixed:.3g} (next token)")
    assert alone < 1e-5 and mixed < 1e-4  # a batch's shapes change fp32 rounding, here as without PEFT

    bank = PrefixBank(model, tokenizer)
    bank.add("p", tmp_path / "peft")
    ours = greedy([rows[0]], ["p"], bank, steps=8)[0]
    ids = torch.tensor([rows[0]])
    with torch.no_grad():
        theirs = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        bare = reference_base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    for t in range(len(ours)):  # our tokens are PEFT's forward-pass argmax, teacher-forced
        assert int(peft_logits(pm, rows[0] + ours[:t])[-1].argmax()) == ours[t]
    assert theirs[0, len(rows[0]):].tolist() == bare[0, len(rows[0]):].tolist() != ours


# -- issue 21: archives are parsed within a bound, and refusals name their reason ------------------
def _tar_declaring_long_name(size: int, compress) -> bytes:
    """A tar whose first header is a GNU long name (type L) of `size` bytes, all of them present."""
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = tarfile.GNUTYPE_LONGNAME, size
    pieces = [compress.compress(info.tobuf(format=tarfile.GNU_FORMAT))]
    chunk = b"a" * (1 << 20)
    for _ in range(size >> 20):
        pieces.append(compress.compress(chunk))
    return b"".join(pieces) + compress.flush()


@pytest.mark.parametrize("kind", ["L", "x"])
def test_a_tar_whose_long_name_or_pax_header_is_huge_is_refused_before_it_is_read(monkeypatch, kind):
    import bz2
    import tracemalloc

    from prefixtune.interop import folders

    size = 64 << 20
    if kind == "L":
        data = _tar_declaring_long_name(size, bz2.BZ2Compressor(9))
    else:  # a pax header of the same size: tarfile reads it whole as well
        info = tarfile.TarInfo("./PaxHeaders/x")
        info.type, info.size = tarfile.XHDTYPE, size
        compress = bz2.BZ2Compressor(9)
        data = b"".join([compress.compress(info.tobuf(format=tarfile.USTAR_FORMAT))]
                        + [compress.compress(b"9" * (1 << 20)) for _ in range(size >> 20)]) + compress.flush()
    assert len(data) < 4096  # a few hundred bytes on the wire
    readers = []

    class Counting(folders.BoundedReader):
        def __init__(self, *args):
            super().__init__(*args)
            readers.append(self)

    monkeypatch.setattr(folders, "BoundedReader", Counting)
    spec = model_spec(tiny_model("llama"))
    tracemalloc.start()
    try:
        with pytest.raises(PrefixFileError, match="header declares 67108864 bytes; the limit is 65536"):
            archive_to_prefix_bytes(data, spec, 16 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(readers) == 1 and readers[0].read_bytes == tarfile.BLOCKSIZE  # its header, nothing after it
    assert peak < 4 << 20, f"parsing a {len(data)}-byte archive allocated {peak} bytes"


def test_a_tar_unpacking_beyond_the_cap_is_refused_and_reasons_are_named(tmp_path):
    import gzip

    from prefixtune.interop.folders import MAX_MEMBERS, read_archive

    spec = model_spec(tiny_model("llama"))
    big = io.BytesIO()
    with tarfile.open(fileobj=big, mode="w:gz") as t:  # a member declared far beyond the cap: refused at its header
        info = tarfile.TarInfo("junk.bin")
        info.size = 40 << 20
        t.addfile(info, io.BytesIO(bytes(info.size)))
    with pytest.raises(PrefixFileError, match="unpacks to more than"):
        read_archive(big.getvalue(), 1 << 20, "upload")
    many = {f"f{i}.txt": b"x" for i in range(MAX_MEMBERS + 1)}
    for packed in (_zip(many), _tar_gz(many)):
        with pytest.raises(PrefixFileError, match=f"the limit is {MAX_MEMBERS}|more than {MAX_MEMBERS} members"):
            archive_to_prefix_bytes(packed, spec, 1 << 20)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a/prefix.safetensors", b"1")
        z.writestr("b/prefix.safetensors", b"2")
    for packed in (buf.getvalue(), _tar_gz({"a/prefix.safetensors": b"1", "b/prefix.safetensors": b"2"})):
        with pytest.raises(PrefixFileError, match="holds prefix.safetensors twice"):
            archive_to_prefix_bytes(packed, spec, 1 << 20)
    assert read_archive(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ", 1 << 20, "upload") is None  # a safetensors file


def test_a_zip_of_many_entries_is_refused_from_its_end_record(tmp_path):
    """zipfile parses the whole central directory before anyone can count it: 150,000 empty entries in 12 MB
    (an upload's size) cost 80 MB. The end record's count and size are checked first; so is a lying count."""
    import tracemalloc

    from prefixtune.interop.folders import MAX_MEMBERS, read_archive

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(30000):
            z.writestr(f"{i}", b"")
    data = buf.getvalue()
    at = data.rfind(b"PK\x05\x06")
    lying = data[:at + 8] + struct.pack("<HH", 1, 1) + data[at + 12:]  # says 1 member, holds 30,000
    for packed, message in ((data, "holds 30000 members; the limit is 64"), (lying, "directory is .* bytes")):
        tracemalloc.start()
        try:
            with pytest.raises(PrefixFileError, match=message):
                read_archive(packed, 16 << 20, "upload")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, f"refusing a {len(packed)}-byte zip allocated {peak} bytes"
    small = _zip({f"f{i}.txt": b"x" for i in range(MAX_MEMBERS)})
    assert read_archive(small, 1 << 20, "upload") == {}  # 64 members of no known name: none kept, no refusal


def _peft_files(exported, spec, **config_changes) -> dict[str, bytes]:
    from safetensors.torch import save

    config, tensors = peft_io.to_peft(exported, spec)
    dtype = config_changes.pop("dtype", torch.float32)
    config.update(config_changes)
    return {"adapter_config.json": json.dumps(config).encode(),
            "adapter_model.safetensors": save({k: v.to(dtype) for k, v in tensors.items()})}


def _store(tmp_path, model, **settings):
    from prefixtune.serve import ServeSettings
    from prefixtune.serve.store import PrefixStore

    bank = PrefixBank(model, ByteTokenizer())
    return PrefixStore(bank, ServeSettings(store_dir=tmp_path / "store", **settings), ["alice"],
                       reserved=("tiny-llama",), model_names=("tiny-llama",))


def test_peft_uploads_are_checked_field_by_field_and_stored_no_larger_than_they_came(tmp_path):
    from prefixtune.serve.errors import ServeError

    model = tiny_model("llama")
    spec = model_spec(model)
    exported = our_prefix(model, seed=1)
    store = _store(tmp_path, model, max_prefix_len=8)
    refused = {
        "seq2seq task with one submodule": ({"task_type": "SEQ_2_SEQ_LM"}, "SEQ_2_SEQ_LM has 2"),
        "submodules as a boolean": ({"num_transformer_submodules": True}, "num_transformer_submodules must be"),
        "a string length": ({"num_virtual_tokens": "4"}, "num_virtual_tokens must be an integer"),
        "a projection flag as text": ({"prefix_projection": "no"}, "prefix_projection must be true or false"),
        "a dict for the base model": ({"base_model_name_or_path": {"a": 1}}, "base_model_name_or_path must be a"),
        "a 12 MB base model name": ({"base_model_name_or_path": "m" * (12 << 20)}, "the limit is 65536"),
        "a 300-character base model name": ({"base_model_name_or_path": "m" * 300}, "at most 256 characters"),
        "another base model": ({"base_model_name_or_path": "meta-llama/Llama-3.1-8B"}, "not this server's"),
        "an unknown task": ({"task_type": "TOKEN_CLS"}, "task_type must be one of"),
    }
    for label, (changes, message) in refused.items():
        with pytest.raises(ServeError, match=message) as e:
            store.put("alice", label.replace(" ", "-"), _zip(_peft_files(exported, spec, **changes)))
        assert e.value.status == 400, label
    long_prefix = our_prefix(model, seed=2, length=9)  # over the server's max_prefix_len 8: refused before converting
    with pytest.raises(ServeError, match="num_virtual_tokens must be an integer >= 1 and at most 8"):
        store.put("alice", "p", _zip(_peft_files(long_prefix, spec)))
    assert store.list("alice") == [] and not list((tmp_path / "store").rglob("*.safetensors"))

    upload = _zip(_peft_files(exported, spec, dtype=torch.float16))
    info, _ = store.put("alice", "half", upload)  # named for this server's model, fp16: kept fp16
    stored = next((tmp_path / "store").rglob("half.safetensors")).read_bytes()
    assert load_prefix_bytes(stored, spec).metadata["dtype"] == "float16"
    assert info.bytes == len(stored) < 2 * len(upload) and info.base_model == "tiny-llama"

    # a prefix of zeros zips small, and its conversion adds metadata: the stored size counts against the limit
    zeros = ExportedPrefix({"decoder": torch.zeros(64, exported.p["decoder"].shape[1])}, exported.metadata)
    files = _peft_files(zeros, spec)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for member, data in files.items():
            z.writestr(member, data)
    tight = _store(tmp_path / "tight", model, max_upload_bytes=len(files["adapter_model.safetensors"]) + 64)
    assert len(buf.getvalue()) < tight.settings.max_upload_bytes // 4
    with pytest.raises(ServeError, match="would be stored as") as e:
        tight.put("alice", "zeros", buf.getvalue())
    assert e.value.status == 413 and tight.list("alice") == []


# -- issue 21: the CLI says what is wrong with a hostile adapter folder in one line ----------------------
def _cli_error(*args) -> str:
    from typer.testing import CliRunner

    from prefixtune.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2 and result.exception is None or isinstance(result.exception, SystemExit), \
        (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_import_and_generate_refuse_hostile_adapter_configs_in_one_line(tmp_path):
    model = tiny_model("llama")
    good = tmp_path / "good"
    save_pretrained(our_prefix(model, seed=1), good, fmt="peft")
    config_text = (good / "adapter_config.json").read_text()

    def folder(label: str, text: str) -> Path:
        path = tmp_path / label
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
        (path / "adapter_config.json").write_text(text)
        return path

    config = json.loads(config_text)
    cases = {
        "nested": ("[" * 10_000 + "]" * 10_000, "nested deeper than 8 levels"),
        "infinity": (config_text.replace('"num_virtual_tokens": 4', '"num_virtual_tokens": Infinity'),
                     "Infinity is not a JSON number"),
        "digits": (config_text.replace('"num_virtual_tokens": 4', '"num_virtual_tokens": ' + "9" * 5001),
                   "an integer of 5001 digits"),
        "dict_base": (json.dumps({**config, "base_model_name_or_path": {"path": "/etc"}}),
                      "base_model_name_or_path must be a string"),
    }
    for label, (text, message) in cases.items():
        path = folder(label, text)
        assert message in _cli_error("import", path, "-o", tmp_path / f"{label}.safetensors")
        assert message in _cli_error("generate", "--model", "/no/such/model", "--prefix", path, "x")
        assert not (tmp_path / f"{label}.safetensors").exists()
    etc = folder("etc", json.dumps({**config, "base_model_name_or_path": "/etc"}))
    assert "cannot load base model '/etc' named by the adapter's base_model_name_or_path" in _cli_error(
        "import", etc, "-o", tmp_path / "etc.safetensors")
    assert "num_virtual_tokens must be an integer >= 1 and at most 3" in _cli_error(
        "import", good, "--max-prefix-len", 3, "-o", tmp_path / "long.safetensors")


def test_export_writes_only_into_a_new_empty_or_earlier_export_folder(tmp_path):
    from typer.testing import CliRunner

    from prefixtune.cli import app

    model = tiny_model("llama")
    source = tmp_path / "p.safetensors"
    source.write_bytes(prefix_to_bytes(our_prefix(model, seed=1).p, model_spec(model), "tiny-llama"))
    assert "--out / is a folder" in _cli_error("export", source, "--out", "/")
    assert "is a non-empty folder that holds no earlier export" in _cli_error("export", source, "--format", "hf",
                                                                              "--out", "/")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert "pass --overwrite" in _cli_error("export", source, "--format", "peft", "--out", busy)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    run = CliRunner().invoke
    assert run(app, ["export", str(source), "--format", "peft", "--out", str(busy), "--overwrite"]).exit_code == 0
    assert (busy / "adapter_config.json").is_file() and (busy / "notes.txt").read_text() == "mine"
    again = run(app, ["export", str(source), "--format", "peft", "--out", str(busy)])  # an earlier export: replaced
    assert again.exit_code == 0, again.output
    fresh = run(app, ["export", str(source), "--format", "hf", "--out", str(tmp_path / "new")])
    assert fresh.exit_code == 0 and (tmp_path / "new" / "prefix.safetensors").is_file()


def test_an_export_in_the_other_format_replaces_the_earlier_one(tmp_path):
    """export --format peft over an earlier --format hf export (or the reverse) leaves one prefix in the folder:
    the old prefix.safetensors was read first by load_any (generate, bank), the old adapter by PEFT and push."""
    from typer.testing import CliRunner

    from prefixtune.cli import app

    model = tiny_model("llama")
    spec = model_spec(model)
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    first.write_bytes(prefix_to_bytes(our_prefix(model, seed=1).p, spec, "tiny-llama"))
    second.write_bytes(prefix_to_bytes(our_prefix(model, seed=2).p, spec, "tiny-llama"))
    out = tmp_path / "out"
    run = CliRunner().invoke
    assert run(app, ["export", str(first), "--format", "hf", "--out", str(out)]).exit_code == 0
    assert run(app, ["export", str(second), "--format", "peft", "--out", str(out)]).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert torch.equal(load_any(out, spec).p["decoder"], load_any(second).p["decoder"])
    assert run(app, ["export", str(first), "--format", "hf", "--out", str(out)]).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "prefix.safetensors"]
    assert torch.equal(load_any(out).p["decoder"], load_any(first).p["decoder"])


def test_info_describes_a_peft_adapter_folder(tmp_path):
    """A PEFT folder works wherever a prefix file does (README): `info` read the folder as a safetensors file
    and failed with 'not a valid safetensors file (No such device)'."""
    from typer.testing import CliRunner

    from prefixtune.cli import app

    save_pretrained(our_prefix(tiny_model("llama"), seed=1), tmp_path / "adapter", fmt="peft")
    result = CliRunner().invoke(app, ["info", str(tmp_path / "adapter")])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["prefix_len"] == 4 and info["shapes"] == {"prompt_embeddings": [4, 64]} and info["params"] == 256
    assert info["peft_config"]["task_type"] == "CAUSAL_LM"
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"broken")
    assert "not a valid safetensors file" in _cli_error("info", tmp_path / "adapter")


def test_a_lossy_peft_export_card_states_what_the_folder_holds(tmp_path):
    """--format peft --allow-lossy ships the decoder group only; its card claimed all three groups' parameters."""
    exported = our_prefix(tiny_model("bart"), seed=1)
    save_pretrained(exported, tmp_path / "lossy", fmt="peft", allow_lossy=True)
    card = (tmp_path / "lossy" / "README.md").read_text()
    shipped = exported.p["decoder"]
    assert f"| parameters | {shipped.numel():,} |" in card
    assert f"| attention groups | decoder {tuple(shipped.shape)} |" in card


def test_a_lossy_peft_export_card_gives_no_command_that_refuses_the_folder(tmp_path):
    """Its card told users to `prefixtune generate --prefix` / `bank.add` / upload the folder, which prefixtune
    refuses (it imports CAUSAL_LM adapters only)."""
    model = tiny_model("bart")
    save_pretrained(our_prefix(model, seed=1), tmp_path / "lossy", fmt="peft", allow_lossy=True)
    card = (tmp_path / "lossy" / "README.md").read_text()
    assert "prefixtune generate" not in card and "bank.add" not in card and "/v1/prefixes" not in card
    assert "prefixtune does not read this folder back" in card
    with pytest.raises(PrefixFileError, match="CAUSAL_LM"):
        load_any(tmp_path / "lossy", model_spec(model))
    save_pretrained(our_prefix(tiny_model("llama"), seed=1), tmp_path / "llama", fmt="peft")
    assert "prefixtune generate" in (tmp_path / "llama" / "README.md").read_text()


def test_export_of_a_prefix_file_refuses_which_last(tmp_path):
    """--which last on a prefix file (no checkpoint, no steps) was silently ignored: the file was exported as is."""
    model = tiny_model("llama")
    source = tmp_path / "p.safetensors"
    source.write_bytes(prefix_to_bytes(our_prefix(model, seed=1).p, model_spec(model), "tiny-llama"))
    assert "--which last applies to a training directory" in _cli_error(
        "export", source, "--format", "hf", "--which", "last", "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_of_an_adapter_naming_no_base_model_records_the_model_it_was_checked_against(tiny_dir, tmp_path):
    """The file's base_model was "", so its card said `prefixtune generate --model unknown` (and `info` showed "")."""
    from typer.testing import CliRunner

    from prefixtune.cli import app

    save_pretrained(our_prefix(tiny_model("llama"), seed=1), tmp_path / "adapter", fmt="peft")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    result = CliRunner().invoke(app, ["import", str(tmp_path / "adapter"), "--model", str(tiny_dir),
                                      "-o", str(tmp_path / "p.safetensors")])
    assert result.exit_code == 0, result.output
    assert load_any(tmp_path / "p.safetensors").metadata["base_model"] == str(tiny_dir)
