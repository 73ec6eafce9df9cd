"""PEFT's PREFIX_TUNING adapter folders, both ways: `adapter_config.json` + `adapter_model.safetensors`.

Facts read in peft 0.21.2 (`peft_model.py: get_prompt`, `PeftModelForCausalLM.forward`,
`utils/other.py: _prepare_prompt_learning_config`) and checked by tests/test_interop.py:
  * the one tensor `prompt_embeddings` is (P, num_layers * 2 * token_dim) and is read as
    `view(P, 2L, heads, token_dim // heads)`: slots K0, V0, K1, V1, ... per layer. That is
    exactly our decoder P (`len x (layers x 2 x kv_heads x head_dim)`), so no element moves;
  * for grouped-query attention `token_dim = head_dim * kv_heads`, `num_attention_heads = kv_heads`;
  * the keys go into the cache as they are (no RoPE at load), a mask of ones is prepended and
    the real tokens take positions P, P+1, ...: our decoder-only prefix does the same;
  * the saved tensor is the prefix itself even with `prefix_projection: true` (PEFT saves the
    MLP's output), so both import; we write `false`: with `true`, a PEFT model set up for
    training holds the MLP's input instead, and loading the file into it (Trainer's resume,
    `load_best_model_at_end`) fails on shapes (peft #2256).
PEFT's seq2seq prefix enters decoder self-attention only (its cross-attention half is discarded);
ours also enters the encoder and cross-attention, so that export drops two of three groups and
is refused unless asked for. PEFT also reads a seq2seq tensor its own way: decoder layer i gets
the slots of layer 2i mod L (measured: with 2 layers both read layer 0's), so a lossy export
puts our layer i there; with an even layer count half of the decoder layers cannot be carried.
PEFT itself is not imported here: it is not a dependency of prefixtune.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..atomic import atomic_write_bytes

from ..prefix_file import ExportedPrefix, PrefixFileError, load_prefix_bytes, prefix_to_bytes
from ..models import EMBEDDED, ModelSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TENSOR = "prompt_embeddings"
TASK_TYPES = {"decoder": "CAUSAL_LM", "encoder-decoder": "SEQ_2_SEQ_LM"}


class LossyExportError(PrefixFileError):
    """The prefix has parts PEFT's layout cannot carry."""


def is_peft_dir(path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def hub_id(base_model: str) -> str:
    """The hub id of an embedded model name (what PEFT and model cards call the base model)."""
    return EMBEDDED.get(base_model, {}).get("hub_id", base_model)


def embedded_name(base_model: str | None) -> str | None:
    """The embedded name of a hub id, if prefixtune embeds that model."""
    return next((name for name, info in EMBEDDED.items() if info["hub_id"] == base_model), None)


def to_peft(exported: ExportedPrefix, spec: ModelSpec, allow_lossy: bool = False) -> tuple[dict, dict]:
    """(adapter_config, tensors) for PEFT. Refuses a seq2seq prefix unless `allow_lossy`."""
    dropped = sorted(g for g in exported.p if g != "decoder")
    if dropped and not allow_lossy:
        raise LossyExportError(
            f"PEFT's prefix tuning for encoder-decoder models only carries the decoder self-attention prefix; "
            f"this prefix also has {' and '.join(dropped)} prefixes, which the export would drop (and PEFT maps "
            f"decoder layers to prompt slots its own way, so outputs will differ). Pass --allow-lossy "
            f"(allow_lossy=True) to export the decoder part anyway")
    p = exported.p["decoder"]
    if spec.family == "encoder-decoder":
        p = _peft_seq2seq_order(p, spec.num_layers)
    token_dim = spec.num_kv_heads * spec.head_dim
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": TASK_TYPES[spec.family],
        "num_virtual_tokens": int(p.shape[0]),
        "token_dim": token_dim,
        "num_layers": spec.num_layers,
        "num_attention_heads": spec.num_kv_heads,
        "num_transformer_submodules": 2 if spec.family == "encoder-decoder" else 1,
        "encoder_hidden_size": token_dim,
        "prefix_projection": False,
        "init_weights": None,
        "inference_mode": True,
        "base_model_name_or_path": hub_id(exported.metadata.get("base_model", "")) or None,
        "revision": None,
        "modules_to_save": None,
        "auto_mapping": None,
    }
    return config, {TENSOR: p.detach().to("cpu", torch.float32).contiguous()}


def _peft_seq2seq_order(p: torch.Tensor, layers: int) -> torch.Tensor:
    """Our decoder layer i into the slots PEFT's seq2seq decoder layer i reads (2i mod L; first one wins)."""
    src = p.reshape(p.shape[0], layers, -1)
    out = torch.zeros_like(src)
    written = set()
    for i in range(layers):
        j = 2 * i % layers
        if j not in written:
            out[:, j] = src[:, i]
            written.add(j)
    return out.reshape(p.shape)


def save_peft(exported: ExportedPrefix, spec: ModelSpec, out_dir, allow_lossy: bool = False) -> Path:
    """Write a PEFT adapter folder (each file atomically). Returns the folder."""
    from safetensors.torch import save

    config, tensors = to_peft(exported, spec, allow_lossy)
    out = Path(out_dir)
    atomic_write_bytes(out / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
    atomic_write_bytes(out / CONFIG_FILE, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return out


def check_adapter(config: dict, weights: bytes, source: str = "PEFT adapter") -> torch.Tensor:
    """The prompt tensor of a PEFT PREFIX_TUNING adapter, after checking it against its own config."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not isinstance(config, dict) or config.get("peft_type") != "PREFIX_TUNING":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise PrefixFileError(f"{source}: a PEFT {kind!r} adapter, not PREFIX_TUNING")
    try:
        tensors = load(weights)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise PrefixFileError(f"{source}: {WEIGHTS_FILE} is not a valid safetensors file ({e})") from None
    if TENSOR not in tensors:
        raise PrefixFileError(f"{source}: {WEIGHTS_FILE} holds no {TENSOR!r} tensor (found {sorted(tensors)})")
    p = tensors[TENSOR]
    try:
        length, width = int(config["num_virtual_tokens"]), int(config["num_layers"]) * 2 * int(config["token_dim"])
    except (KeyError, TypeError, ValueError):
        raise PrefixFileError(f"{source}: {CONFIG_FILE} lacks num_virtual_tokens, num_layers or token_dim") from None
    if p.dim() != 2 or tuple(p.shape) != (length, width) or not p.is_floating_point():
        raise PrefixFileError(f"{source}: {TENSOR} has shape {tuple(p.shape)} ({p.dtype}); "
                              f"its config says ({length}, {width})")
    return p


def peft_to_bytes(config: dict, weights: bytes, spec: ModelSpec, source: str = "PEFT adapter") -> bytes:
    """A PEFT PREFIX_TUNING adapter (its config and weight bytes) as a prefixtune prefix file for `spec`."""
    p = check_adapter(config, weights, source)
    if spec.family != "decoder" or config.get("num_transformer_submodules", 1) != 1:
        raise PrefixFileError(
            f"{source}: a PEFT encoder-decoder (SEQ_2_SEQ_LM) prefix covers decoder self-attention only, and PEFT "
            "maps it to decoder layers its own way; prefixtune imports decoder-only (CAUSAL_LM) prefixes")
    expected = {"num_layers": spec.num_layers, "num_attention_heads": spec.num_kv_heads,
                "token_dim": spec.num_kv_heads * spec.head_dim}
    diffs = [f"{k}: adapter {config.get(k)!r} vs model {v!r}" for k, v in expected.items() if config.get(k) != v]
    if diffs:
        raise PrefixFileError(f"{source}: made for another model shape ({'; '.join(diffs)}); "
                              f"it cannot be used with this {spec.model_type} model")
    base = embedded_name(config.get("base_model_name_or_path")) or config.get("base_model_name_or_path") or ""
    facts = {"imported_from": "peft", "peft_config": {k: config.get(k) for k in (
        "task_type", "num_virtual_tokens", "prefix_projection", "base_model_name_or_path", "peft_version")}}
    return prefix_to_bytes({"decoder": p.float()}, spec, base, facts)


def from_peft(config: dict, weights: bytes, spec: ModelSpec, source: str = "PEFT adapter") -> ExportedPrefix:
    """A PEFT PREFIX_TUNING adapter as a prefixtune prefix for `spec`, validated as any prefix file is."""
    return load_prefix_bytes(peft_to_bytes(config, weights, spec, source), spec, source)


def parse_config(data: bytes, source: str) -> dict:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrefixFileError(f"{source}: unreadable {CONFIG_FILE} ({e})") from None


def load_peft(folder, spec: ModelSpec | None) -> ExportedPrefix:
    """Read a PEFT adapter folder as a prefixtune prefix for the model `spec` describes."""
    folder = Path(folder)
    source = str(folder)
    if spec is None:
        raise PrefixFileError(f"{source}: a PEFT adapter holds no model shapes of its own; read it against a base "
                              "model (prefixtune import PEFT_DIR --model MODEL -o prefix.safetensors)")
    return from_peft(*read_folder(folder), spec, source)


def read_folder(folder) -> tuple[dict, bytes]:
    """(config, weight bytes) of a PEFT adapter folder, checked against each other."""
    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise PrefixFileError(f"{folder}: PEFT adapter folder without {WEIGHTS_FILE}")
    config = parse_config((folder / CONFIG_FILE).read_bytes(), str(folder))
    weights = (folder / WEIGHTS_FILE).read_bytes()
    check_adapter(config, weights, str(folder))
    return config, weights
