"""What `train` exports, found and opened for decoding.

`generate` and `eval` take a prefix file, another method's weights file (`finetune`, `adapter`, ...)
or a training directory (the exported file inside it). Everything here is checked before the
base model is loaded, so a wrong path fails in a second.
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from .bank import PrefixBank
from .interop.folders import load_any
from .prefix_file import PrefixFileError
from .methods import EXPORT_FILES, METHODS, Method, build_method
from .models import model_spec

WEIGHTS_FORMAT = "prefixtune.weights/1"


def find_export(path) -> Path:
    """`path` itself if it is a file; for a training directory, the file its method exported."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise PrefixFileError(f"prefix file not found: {path}")
    from .interop.peft import is_peft_dir

    if is_peft_dir(path):  # a PEFT adapter folder loads as it is (load_any converts it)
        return path
    names = list(dict.fromkeys(EXPORT_FILES.values()))
    config = path / "train_config.json"
    if config.is_file():
        try:
            saved = json.loads(config.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PrefixFileError(f"{config}: unreadable ({e})") from None
        if not isinstance(saved, dict):
            raise PrefixFileError(f"{config}: holds a JSON {type(saved).__name__}, not a training config")
        if isinstance(saved.get("users"), dict):  # `train --user-field`: a prefix per user, in its store
            store = path / "store"
            raise PrefixFileError(f"{path} holds a many-users run: each user's prefix is in {store}/<tenant hash>/ "
                                  f"(users.csv names them); serve them all: prefixtune serve --store {store}")
        names = [EXPORT_FILES.get(saved.get("method", "prefix"), EXPORT_FILES["prefix"])]
    for name in names:
        if (path / name).is_file():
            return path / name
    raise PrefixFileError(f"{path} is a directory without an exported {' or '.join(names)}; "
                          f"write one with: prefixtune export {path}")


def read_header(path: Path) -> tuple[dict, dict[str, list[int]]]:
    """A safetensors file's (metadata, tensor shapes), from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}, {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # safetensors raises several types for a damaged header
        raise PrefixFileError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0]})") from None


def read_metadata(path: Path) -> dict:
    """A safetensors file's metadata, from its header only."""
    return read_header(path)[0]


def describe(path: Path) -> tuple[dict, dict[str, list[int]]]:
    """(metadata, tensor shapes) of an exported file, checked; a prefix's shapes are per attention group."""
    if path.is_dir():  # a PEFT adapter folder (find_export): described from its own files, no base model needed
        from .interop.peft import TENSOR, read_folder

        config, _ = read_folder(path)  # the tensor checked against the config
        metadata = {"format": "peft PREFIX_TUNING adapter", "base_model": config.get("base_model_name_or_path") or "",
                    "prefix_len": str(config["num_virtual_tokens"]), "peft_config": json.dumps(config)}
        return metadata, {TENSOR: [config["num_virtual_tokens"], config["num_layers"] * 2 * config["token_dim"]]}
    metadata, shapes = read_header(path)
    if metadata.get("format") == WEIGHTS_FORMAT:
        return metadata, shapes
    exported = load_any(path)
    return exported.metadata, {group: list(t.shape) for group, t in exported.p.items()}


def training_summary(metadata: dict) -> dict | None:
    """How an export was trained, from its metadata: the data, method, steps, best dev loss and template."""
    from .run_dir import describe_data

    try:
        config = json.loads(metadata.get("train_config") or "{}")
    except json.JSONDecodeError:
        return None
    if not isinstance(config, dict) or "method" not in config:
        return {"imported_from": config["imported_from"]} if isinstance(config, dict) and "imported_from" in config \
            else None
    planned = f"{config['max_steps']} steps" if config.get("max_steps") else f"{config.get('epochs')} epochs"
    summary = {"data": describe_data(config), "method": config["method"], "model": config.get("model"),
               "steps": config.get("steps"), "planned": planned, "best_step": config.get("best_step"),
               "best_dev_loss": config.get("best_dev_loss"), "exported_from_step": config.get("exported_from_step"),
               "template": config.get("template") or "default (the model family's)",
               "init": config.get("init"), "lr": config.get("lr")}
    return {k: v for k, v in summary.items() if v is not None}


def check_export(path) -> tuple[Path, str]:
    """(the exported file, "prefix" or "weights"), validated as far as possible without the model."""
    path = find_export(path)
    meta = {} if path.is_dir() else read_metadata(path)  # a directory here is a PEFT adapter folder
    if meta.get("format") == WEIGHTS_FORMAT:
        if meta.get("method") not in METHODS:
            raise PrefixFileError(f"{path}: weights of an unknown method {meta.get('method')!r}")
        return path, "weights"
    if path.is_dir():  # a PEFT adapter: its files are checked here, its shapes against the model later
        from .interop.peft import read_folder

        read_folder(path)
        return path, "prefix"
    load_any(path)  # format, checksum and shapes
    return path, "prefix"


def load_weights(path, model, tokenizer) -> Method:
    """Rebuild the method that wrote the weights file `path` on the base model and put its weights back."""
    from safetensors.torch import load_file

    from .train import TrainConfig

    meta = read_metadata(Path(path))
    spec = model_spec(model)
    if meta.get("fingerprint") != spec.fingerprint():
        raise PrefixFileError(f"{path}: {meta.get('method')} weights made for base model {meta.get('base_model')!r} "
                              f"with a different shape; they cannot be used with this model")
    known = {f.name for f in fields(TrainConfig)}
    saved = json.loads(meta.get("train_config") or "{}")
    config = TrainConfig(**{k: v for k, v in saved.items() if k in known})
    method = build_method(meta["method"], model, tokenizer, spec, config)
    try:
        method.load_export(load_file(str(path)))
    except (KeyError, RuntimeError) as e:  # a tensor missing, or of another shape than its method's
        raise PrefixFileError(f"{path}: its {meta['method']} weights do not fit the method its metadata describes "
                              f"({type(e).__name__}: {str(e).strip().splitlines()[-1].strip()[:200]})") from None
    return method


class ExportDecoder:
    """Decodes texts with an exported file, or with the bare model when there is none."""

    def __init__(self, model, tokenizer, path=None, kind: str | None = None):
        self.bank, self.method, self.prefix_id = PrefixBank(model, tokenizer), None, None
        if path is not None:
            if kind is None:
                path, kind = check_export(path)
            if kind == "prefix":
                self.bank.add("prefix", path)
                self.prefix_id = "prefix"
            else:
                self.method = load_weights(path, model, tokenizer)

    def generate(self, texts: list[str], config, batch_size: int = 32, raw: bool = False, progress=None) -> list[str]:
        if self.method is None:
            return self.bank.generate(texts, self.prefix_id, config, batch_size=batch_size, raw=raw, progress=progress)
        if raw:
            raise ValueError(f"raw inputs work with prefix files and the bare model, "
                             f"not with {self.method.name} weights")
        return self.method.generate(texts, config, batch_size, progress)

    def generate_chats(self, conversations: list, config, batch_size: int = 32, progress=None) -> list[str]:
        """The next assistant turn of each chat `Conversation` (data/chat.py: the chat template's prompt, content
        tokenized as text), with the prefix; the turn ends at the template's end of turn, not at a newline."""
        from dataclasses import replace

        from .data.chat import encode_chat_prompt

        if self.method is not None:
            raise ValueError(f"chat rows decode with prefix files and the bare model, not with {self.method.name} "
                             f"weights")
        tokenizer, config = self.bank.tokenizer, replace(config, stop_at_newline=False)
        encoded = [encode_chat_prompt(tokenizer, c, self.bank.max_source_len) for c in conversations]
        ids = self.bank.decode_encoded(encoded, [self.prefix_id] * len(encoded), config, batch_size, progress)
        return [tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in ids]
