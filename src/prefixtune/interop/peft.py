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

from ..prefix_file import (DTYPES, ExportedPrefix, PrefixFileError, load_prefix_bytes, prefix_to_bytes,
                           safetensors_header)
from ..models import EMBEDDED, ModelSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TENSOR = "prompt_embeddings"
TASK_TYPES = {"decoder": "CAUSAL_LM", "encoder-decoder": "SEQ_2_SEQ_LM"}
SUBMODULES = {"CAUSAL_LM": 1, "SEQ_2_SEQ_LM": 2}  # PEFT's num_transformer_submodules for each task type


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


MAX_CONFIG_BYTES = 64 << 10  # an adapter_config.json is a few hundred bytes
MAX_NAME_CHARS = 256         # base_model_name_or_path (a hub id or a path), peft_version, task_type
MAX_JSON_DEPTH = 8           # a real config is two levels deep


def _positive_int(config: dict, key: str, source: str, default=None, most: int | None = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (most is not None and value > most):
        bound = f" and at most {most}" if most is not None else ""
        raise PrefixFileError(f"{source}: {CONFIG_FILE}: {key} must be an integer >= 1{bound}, got {_shown(value)}")
    return value


def _short_text(config: dict, key: str, source: str) -> str | None:
    value = config.get(key)
    if value is not None and (not isinstance(value, str) or len(value) > MAX_NAME_CHARS):
        raise PrefixFileError(f"{source}: {CONFIG_FILE}: {key} must be a string of at most {MAX_NAME_CHARS} "
                              f"characters, or null; got {_shown(value)}")
    return value


def _shown(value) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else f"a JSON {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def check_config(config, source: str = "PEFT adapter", max_prefix_len: int | None = None) -> dict:
    """Every field the conversion reads, by type and value: a PREFIX_TUNING adapter, a known task_type
    that agrees with num_transformer_submodules, positive integer shapes (num_virtual_tokens at most `max_prefix_len`),
    a boolean prefix_projection and short strings for names. Returns the config."""
    if not isinstance(config, dict) or config.get("peft_type") != "PREFIX_TUNING":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise PrefixFileError(f"{source}: a PEFT {_shown(kind)} adapter, not PREFIX_TUNING")
    task = _short_text(config, "task_type", source)
    if task not in (None, *TASK_TYPES.values()):
        raise PrefixFileError(f"{source}: {CONFIG_FILE}: task_type must be one of {sorted(TASK_TYPES.values())}, "
                              f"got {_shown(task)}")
    submodules = _positive_int(config, "num_transformer_submodules", source, default=1, most=2)
    if task is not None and submodules != SUBMODULES[task]:
        raise PrefixFileError(f"{source}: {CONFIG_FILE}: task_type {task} has {SUBMODULES[task]} transformer "
                              f"submodule(s), but num_transformer_submodules is {submodules}")
    _positive_int(config, "num_virtual_tokens", source, most=max_prefix_len)
    for key in ("num_layers", "token_dim", "num_attention_heads"):
        _positive_int(config, key, source)
    if not isinstance(config.get("prefix_projection", False), bool):
        raise PrefixFileError(f"{source}: {CONFIG_FILE}: prefix_projection must be true or false, "
                              f"got {_shown(config['prefix_projection'])}")
    for key in ("base_model_name_or_path", "peft_version"):
        _short_text(config, key, source)
    return config


def check_adapter(config: dict, weights: bytes, source: str = "PEFT adapter",
                  max_prefix_len: int | None = None) -> torch.Tensor:
    """The prompt tensor of a PEFT PREFIX_TUNING adapter, after checking it against its own config."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    check_config(config, source, max_prefix_len)
    try:
        safetensors_header(weights)  # bounded before safetensors builds its tensors
        tensors = load(weights)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise PrefixFileError(f"{source}: {WEIGHTS_FILE} is not a valid safetensors file ({e})") from None
    if TENSOR not in tensors:
        raise PrefixFileError(f"{source}: {WEIGHTS_FILE} holds no {TENSOR!r} tensor (found {sorted(tensors)[:8]})")
    p = tensors[TENSOR]
    length, width = config["num_virtual_tokens"], config["num_layers"] * 2 * config["token_dim"]
    if p.dim() != 2 or tuple(p.shape) != (length, width) or not p.is_floating_point():
        raise PrefixFileError(f"{source}: {TENSOR} has shape {tuple(p.shape)} ({p.dtype}); "
                              f"its config says ({length}, {width})")
    return p


def check_base_model(config: dict, names: tuple[str, ...], source: str = "PEFT adapter"):
    """Refuse an adapter whose base_model_name_or_path names another model than `names` (absent: accepted,
    the shapes are checked in any case). A hub id of an embedded model counts as that model's name."""
    named = config.get("base_model_name_or_path")
    if named is None or named == "":
        return
    known = ({n for n in names if n} | {hub_id(n) for n in names if n} | {embedded_name(n) for n in names if n}) - {None}
    if named not in known and embedded_name(named) not in known:
        raise PrefixFileError(f"{source}: made for base model {_shown(named)}, not this server's "
                              f"{' / '.join(sorted({n for n in names if n}))}")


def peft_to_bytes(config: dict, weights: bytes, spec: ModelSpec, source: str = "PEFT adapter",
                  max_prefix_len: int | None = None, base_model: str = "") -> bytes:
    """A PEFT PREFIX_TUNING adapter (its config and weight bytes) as a prefixtune prefix file for `spec`,
    kept in the adapter's dtype (an fp16 upload is not stored twice as large). `base_model`: the name
    recorded when the adapter names none (the model it was checked against)."""
    p = check_adapter(config, weights, source, max_prefix_len)
    if spec.family != "decoder" or config.get("task_type") == "SEQ_2_SEQ_LM" or \
            config.get("num_transformer_submodules", 1) != 1:
        raise PrefixFileError(
            f"{source}: a PEFT encoder-decoder (SEQ_2_SEQ_LM) prefix covers decoder self-attention only, and PEFT "
            "maps it to decoder layers its own way; prefixtune imports decoder-only (CAUSAL_LM) prefixes")
    expected = {"num_layers": spec.num_layers, "num_attention_heads": spec.num_kv_heads,
                "token_dim": spec.num_kv_heads * spec.head_dim}
    diffs = [f"{k}: adapter {config.get(k)!r} vs model {v!r}" for k, v in expected.items() if config.get(k) != v]
    if diffs:
        raise PrefixFileError(f"{source}: made for another model shape ({'; '.join(diffs)}); "
                              f"it cannot be used with this {spec.model_type} model")
    named = config.get("base_model_name_or_path")
    base = embedded_name(named) or named or base_model
    facts = {"imported_from": "peft", "peft_config": {k: config.get(k) for k in (
        "task_type", "num_virtual_tokens", "prefix_projection", "peft_version")}}
    dtype = p.dtype if p.dtype in DTYPES else torch.float32
    return prefix_to_bytes({"decoder": p}, spec, base, facts, dtype=dtype)


def from_peft(config: dict, weights: bytes, spec: ModelSpec, source: str = "PEFT adapter",
              base_model: str = "") -> ExportedPrefix:
    """A PEFT PREFIX_TUNING adapter as a prefixtune prefix for `spec`, validated as any prefix file is."""
    return load_prefix_bytes(peft_to_bytes(config, weights, spec, source, base_model=base_model), spec, source)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_config(data: bytes, source: str) -> dict:
    """adapter_config.json as a dict: strict JSON (no NaN or Infinity), at most MAX_CONFIG_BYTES and
    MAX_JSON_DEPTH levels, numbers of sane size; anything else is a PrefixFileError naming the problem."""
    if len(data) > MAX_CONFIG_BYTES:
        raise PrefixFileError(f"{source}: {CONFIG_FILE} is {len(data)} bytes; the limit is {MAX_CONFIG_BYTES}")
    try:
        text = data.decode("utf-8")
        if _depth(text) > MAX_JSON_DEPTH:
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
        config = json.loads(text, parse_constant=_no_constant, parse_int=_int)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise PrefixFileError(f"{source}: unreadable {CONFIG_FILE} ({_shown(str(e)) if len(str(e)) > 200 else e})") \
            from None
    if not isinstance(config, dict):
        raise PrefixFileError(f"{source}: {CONFIG_FILE} holds a JSON {type(config).__name__}, not an object")
    return config


def _int(text: str) -> int:
    if len(text.lstrip("-")) > 18:  # beyond any shape; Python would also refuse 4,300+ digits with a ValueError
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits")
    return int(text)


def _depth(text: str) -> int:
    """How deeply brackets nest outside strings (checked before json recurses into them)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def load_peft(folder, spec: ModelSpec | None, base_model: str = "") -> ExportedPrefix:
    """Read a PEFT adapter folder as a prefixtune prefix for the model `spec` describes."""
    folder = Path(folder)
    source = str(folder)
    if spec is None:
        raise PrefixFileError(f"{source}: a PEFT adapter holds no model shapes of its own; read it against a base "
                              "model (prefixtune import PEFT_DIR --model MODEL -o prefix.safetensors)")
    return from_peft(*read_folder(folder), spec, source, base_model)


def read_folder(folder) -> tuple[dict, bytes]:
    """(config, weight bytes) of a PEFT adapter folder, checked against each other."""
    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise PrefixFileError(f"{folder}: PEFT adapter folder without {WEIGHTS_FILE}")
    if (folder / CONFIG_FILE).stat().st_size > MAX_CONFIG_BYTES:
        raise PrefixFileError(f"{folder}: {CONFIG_FILE} is {(folder / CONFIG_FILE).stat().st_size} bytes; "
                              f"the limit is {MAX_CONFIG_BYTES}")
    config = parse_config((folder / CONFIG_FILE).read_bytes(), str(folder))
    check_config(config, str(folder))
    weights = (folder / WEIGHTS_FILE).read_bytes()
    check_adapter(config, weights, str(folder))
    return config, weights
