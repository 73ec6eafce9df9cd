"""HF-style prefix folders and the Hugging Face hub, through huggingface_hub (no HTTP of our own).

A prefixtune folder is `prefix.safetensors` + `README.md` (the model card); a PEFT folder is
`adapter_config.json` + `adapter_model.safetensors` + `README.md`. Both push and pull as they are.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..atomic import atomic_write_bytes

from ..prefix_file import ExportedPrefix, PrefixFileError, prefix_to_bytes
from ..models import ModelSpec
from . import peft
from .card import model_card
from .folders import CARD_FILE, PREFIX_FILE, load_any, load_folder

HUB_FILES = [PREFIX_FILE, peft.CONFIG_FILE, peft.WEIGHTS_FILE, CARD_FILE]


def spec_of(exported: ExportedPrefix) -> ModelSpec:
    """The base model's shapes recorded in a prefix file."""
    try:
        return ModelSpec(**json.loads(exported.metadata["model_spec"]))
    except (KeyError, TypeError, json.JSONDecodeError):
        raise PrefixFileError("this prefix records no base model shapes (model_spec); "
                              "export it from a training run or a prefix file") from None


def to_bytes(exported: ExportedPrefix) -> bytes:
    """The prefix file again, from its tensors and metadata (same metadata, same checksum)."""
    meta = exported.metadata
    dtype = getattr(torch, meta.get("dtype", "float32"))
    config = json.loads(meta.get("train_config") or "{}")
    return prefix_to_bytes(exported.p, spec_of(exported), meta.get("base_model", ""), config, dtype)


def save_card(exported: ExportedPrefix, directory, fmt: str = "prefixtune", **card) -> Path:
    directory = Path(directory)
    text = model_card(exported, card.pop("name", None) or directory.resolve().name, fmt, **card)
    atomic_write_bytes(directory / CARD_FILE, text.encode("utf-8"))
    return directory / CARD_FILE


def save_pretrained(exported: ExportedPrefix, directory, fmt: str = "prefixtune", allow_lossy: bool = False,
                    **card) -> Path:
    """Write a prefix folder with its model card: `fmt` "prefixtune" (prefix.safetensors) or "peft".

    `card` goes to the model card: name, base_params (the base model's parameter count, for the
    share), scores (what `prefixtune eval` measured, see card.find_scores).
    """
    directory = Path(directory)
    if fmt == "peft":
        peft.save_peft(exported, spec_of(exported), directory, allow_lossy)
        stale = [PREFIX_FILE]
        # the card states what the folder holds: a lossy (seq2seq) export ships the decoder group alone
        exported = ExportedPrefix({"decoder": exported.p["decoder"]}, exported.metadata)
    elif fmt == "prefixtune":
        atomic_write_bytes(directory / PREFIX_FILE, to_bytes(exported))
        stale = [peft.CONFIG_FILE, peft.WEIGHTS_FILE]
    else:
        raise ValueError(f"format must be prefixtune or peft, got {fmt!r}")
    save_card(exported, directory, fmt, **card)
    for name in stale:  # an earlier export in the other format: left, it would be read (or pushed) instead
        (directory / name).unlink(missing_ok=True)
    return directory


def from_pretrained(name_or_path, spec: ModelSpec | None = None, revision: str | None = None) -> ExportedPrefix:
    """A prefix from a local folder or file, or from a hub repo id (downloaded into the HF cache).

    With `spec`, it is checked against that base model (and a PEFT adapter needs one to be read).
    """
    if Path(name_or_path).exists():
        return load_any(name_or_path, spec)
    return load_folder(pull(str(name_or_path), revision), spec)


def pull(repo_id: str, revision: str | None = None, local_dir=None) -> Path:
    """Download a prefix repo's files (the HF cache serves them again, also with HF_HUB_OFFLINE=1)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES, local_dir=local_dir,
                                   library_name="prefixtune")
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, ValueError) as e:
        raise PrefixFileError(f"cannot fetch {repo_id!r} from the hub: {str(e).splitlines()[0]}") from None
    return Path(folder)


def push(directory, repo_id: str, private: bool | None = None, token: str | None = None,
         commit_message: str = "Upload prefix with prefixtune") -> str:
    """Upload a prefix folder's files (after reading them back as a prefix); returns the commit URL."""
    from huggingface_hub import HfApi

    directory = Path(directory)
    if (directory / PREFIX_FILE).is_file() or not peft.is_peft_dir(directory):
        load_folder(directory)  # checksum, format
    else:
        peft.read_folder(directory)  # the config against the tensor (no base model here)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=directory, allow_patterns=HUB_FILES,
                             commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
