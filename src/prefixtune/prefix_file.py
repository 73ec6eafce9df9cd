"""The prefix file: P alone as safetensors, with metadata, written atomically and checked on load.

A file holds one tensor per attention group (`prefix.decoder`, and for
encoder-decoder models `prefix.encoder`, `prefix.cross`), each
`prefix_len x (layers x 2 x kv_heads x head_dim)`, plus string metadata:
format, base model, a fingerprint of the base model's shapes, the prefix
length, the layout, the dtype, the training config and a SHA-256 of the tensor
bytes (so a flipped bit is caught, not only a truncated file).

Every way in (a file, an upload, an ExportedPrefix in memory) goes through `check_prefix`, so
the CLI, the bank and the server accept and refuse the same prefixes.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from . import finite_json
from .atomic import atomic_write_bytes
from .models import ModelSpec
from .prefix import LAYOUT, group_width, groups_of
from .templates import TemplateError, check_template

FORMAT = "prefixtune.prefix/1"
TENSOR_PREFIX = "prefix."
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what prefix_to_bytes may write
# A prefix file holds one tensor per attention group and a few KB of metadata. Checked before parsing: a
# 16 MB upload of 200,000 empty tensors cost 230 MB and seconds of CPU to parse, 15x its size.
MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 64


class PrefixFileError(ValueError):
    """A prefix file is missing, corrupt, or does not fit the base model."""


class PrefixTooLong(PrefixFileError):
    """A prefix file holds more virtual tokens than the reader allows."""


@dataclass
class ExportedPrefix:
    p: dict[str, torch.Tensor]  # group -> (len, width)
    metadata: dict

    @property
    def prefix_len(self) -> int:
        return next(iter(self.p.values())).shape[0]

    def num_params(self) -> int:
        return sum(t.numel() for t in self.p.values())


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d too
    return h.hexdigest()


def prefix_to_bytes(p: dict[str, torch.Tensor], spec: ModelSpec, base_model: str, train_config: dict | None = None,
                    dtype: torch.dtype = torch.float32) -> bytes:
    from safetensors.torch import save

    tensors = {TENSOR_PREFIX + g: t.detach().to("cpu", dtype).contiguous() for g, t in p.items()}
    length = next(iter(p.values())).shape[0]
    metadata = {
        "format": FORMAT,
        "base_model": base_model,
        "fingerprint": spec.fingerprint(),
        "model_spec": json.dumps(spec.__dict__, sort_keys=True),
        "prefix_len": str(length),
        "layout": LAYOUT,
        "groups": json.dumps(groups_of(spec)),
        "dtype": str(dtype).replace("torch.", ""),
        "train_config": finite_json.dumps(train_config or {}, sort_keys=True, default=str),  # NaN: null
        "sha256": _digest(tensors),
    }
    return save(tensors, metadata=metadata)


def save_prefix(path, p, spec, base_model, train_config=None, dtype=torch.float32) -> Path:
    """Write P atomically (temp file, then rename). Returns the path."""
    atomic_write_bytes(path, prefix_to_bytes(p, spec, base_model, train_config, dtype))
    return Path(path)


def _check_format(metadata: dict | None, source: str):
    if metadata and metadata.get("format") == "prefixtune.weights/1":
        raise PrefixFileError(f"{source}: holds {metadata.get('method')} weights, not a prefix (prefixtune generate "
                              f"and eval decode with it; a PrefixBank and the server take prefixes only)")
    if not metadata or metadata.get("format") != FORMAT:
        raise PrefixFileError(f"{source}: not a prefixtune prefix file (missing or unknown 'format' metadata)")


def _parse(tensors: dict[str, torch.Tensor], metadata: dict | None, source: str, spec: ModelSpec | None) -> ExportedPrefix:
    p = {name[len(TENSOR_PREFIX):]: t for name, t in tensors.items() if name.startswith(TENSOR_PREFIX)}
    if not p:
        raise PrefixFileError(f"{source}: holds no prefix tensors")
    _check_shapes({g: list(t.shape) for g, t in p.items()}, source)
    declared = metadata.get("dtype", "float32")
    for group, t in p.items():
        dtype = str(t.dtype).replace("torch.", "")
        if t.dtype not in DTYPES:
            raise PrefixFileError(f"{source}: tensor {group!r} is {dtype}; a prefix is float32, float16 or bfloat16")
        if dtype != declared:
            raise PrefixFileError(f"{source}: tensor {group!r} is {dtype} but the file declares {declared!r}")
    if metadata.get("sha256") != _digest(tensors):
        raise PrefixFileError(f"{source}: corrupt prefix file (tensor checksum does not match its metadata)")
    exported = ExportedPrefix(p={g: t.float() for g, t in p.items()}, metadata=dict(metadata))
    check_prefix(exported, spec, source)
    return exported


def _check_shapes(shapes: dict[str, list[int]], source: str):
    if any(len(shape) != 2 for shape in shapes.values()) or len({shape[0] for shape in shapes.values()}) != 1:
        raise PrefixFileError(f"{source}: prefix tensors have inconsistent shapes {shapes}; "
                              "each must be (length, width), all of one length")


def _check_declared_shapes(header: dict, spec: ModelSpec | None, max_prefix_len: int | None, source: str):
    """The checks of a prefix's shapes, read from the safetensors header before any tensor is loaded: an upload
    of 130,000 virtual tokens is refused for its length, not after costing several times its size in copies.
    A malformed entry is left to safetensors' own checks (it refuses it without loading anything)."""
    shapes = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
            return
        if name.startswith(TENSOR_PREFIX):
            shapes[name[len(TENSOR_PREFIX):]] = shape
    if not shapes:
        return  # _parse refuses it: no prefix tensors
    _check_shapes(shapes, source)
    length = next(iter(shapes.values()))[0]
    if max_prefix_len is not None and length > max_prefix_len:
        raise PrefixTooLong(f"{source} has {length} virtual tokens; the limit is {max_prefix_len}")
    if spec is not None:
        _check_fits(header["__metadata__"], {g: shape[1] for g, shape in shapes.items()}, spec, source)


def source_template(metadata: dict, source: str = "prefix") -> str | None:
    """The source template a prefix was trained with (None: the model family's default), checked."""
    try:
        config = json.loads(metadata.get("train_config") or "{}")
    except json.JSONDecodeError:
        config = None
    if not isinstance(config, dict):
        raise PrefixFileError(f"{source}: its train_config metadata is not a JSON object")
    template = config.get("template")
    if template is None or template == "":
        return None
    try:
        return check_template(template)
    except TemplateError as e:
        raise PrefixFileError(f"{source}: {e}") from None


def check_prefix(exported: ExportedPrefix, spec: ModelSpec | None = None, source: str = "prefix"):
    """The one check of a prefix's contents, whether it comes from a file, an upload or memory:
    (length, width) tensors of one length, at least one virtual token, a dtype a file may hold, finite
    values, a template that is data (templates.py), and with `spec`, a fit to that base model."""
    if not exported.p:
        raise PrefixFileError(f"{source}: holds 0 virtual tokens")
    _check_shapes({g: list(t.shape) for g, t in exported.p.items()}, source)  # an in-memory prefix too
    if exported.prefix_len < 1:
        raise PrefixFileError(f"{source}: holds 0 virtual tokens")
    for group, t in exported.p.items():
        if t.dtype not in DTYPES:
            raise PrefixFileError(f"{source}: tensor {group!r} is {str(t.dtype).replace('torch.', '')}; "
                                  "a prefix is float32, float16 or bfloat16")
    if not all(torch.isfinite(t).all() for t in exported.p.values()):
        raise PrefixFileError(f"{source}: holds NaN or infinite values")
    source_template(exported.metadata, source)
    if spec is not None:
        check_compatible(exported, spec, source)


def readable_metadata(metadata: dict) -> dict:
    """Metadata with its values as real JSON (safetensors stores only strings): numbers, lists, objects."""
    readable = {}
    for key, value in metadata.items():
        if key in ("sha256", "fingerprint", "format", "base_model", "layout", "dtype"):
            readable[key] = value  # strings by nature (a hex digest may look like a number)
            continue
        try:
            readable[key] = json.loads(value)
        except (TypeError, json.JSONDecodeError):
            readable[key] = value
    return readable


def check_compatible(exported: ExportedPrefix, spec: ModelSpec, source: str = "prefix"):
    """Refuse a prefix made for another model, naming what differs."""
    _check_fits(exported.metadata, {g: t.shape[1] for g, t in exported.p.items()}, spec, source)


def _check_fits(metadata: dict, widths: dict[str, int], spec: ModelSpec, source: str):
    """check_compatible on a prefix's metadata and its tensors' widths (group -> width), loaded or declared."""
    theirs = metadata.get("fingerprint")
    if theirs != spec.fingerprint():
        try:
            made_for = json.loads(metadata.get("model_spec", "{}"))
        except json.JSONDecodeError:
            made_for = {}
        made_for = made_for if isinstance(made_for, dict) else {}
        diffs = [f"{k}: prefix {made_for.get(k)!r} vs model {v!r}" for k, v in spec.__dict__.items()
                 if made_for.get(k) != v]
        raise PrefixFileError(
            f"{source}: made for base model {metadata.get('base_model')!r} with a different shape "
            f"({'; '.join(diffs) or 'fingerprint differs'}); it cannot be used with this model"
        )
    expected = {g: group_width(spec, n) for g, n in groups_of(spec).items()}
    if widths != expected:
        raise PrefixFileError(f"{source}: tensor widths {widths} do not match the model's {expected}")


def load_prefix(path, spec: ModelSpec | None = None) -> ExportedPrefix:
    """Read and validate an exported prefix file; with `spec`, also check it fits that base model.

    Folders (ours, PEFT adapters) are interop's: `prefixtune.interop.folders.load_any` reads either.
    """
    path = Path(path)
    if path.is_dir():
        raise PrefixFileError(f"{path} is a folder, not a prefix file (prefixtune.interop.folders.load_any "
                              "reads prefix folders and PEFT adapters)")
    if not path.is_file():
        raise PrefixFileError(f"prefix file not found: {path}")
    return load_prefix_bytes(path.read_bytes(), spec, source=str(path))


def safetensors_header(data: bytes) -> dict:
    """The JSON header of safetensors bytes, its size checked before it is parsed and its number of tensors
    before safetensors builds them (MAX_HEADER_BYTES, MAX_TENSORS); a ValueError says what is wrong."""
    import struct

    if len(data) < 8:
        raise ValueError("too short")
    header_len = struct.unpack("<Q", data[:8])[0]
    if header_len > len(data) - 8:
        raise ValueError("header length beyond end of data")
    if header_len > MAX_HEADER_BYTES:
        raise ValueError(f"its header is {header_len} bytes; a prefix file's is at most {MAX_HEADER_BYTES}")
    header = json.loads(data[8: 8 + header_len])
    if not isinstance(header, dict):
        raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    count = len(header) - ("__metadata__" in header)
    if count > MAX_TENSORS:
        raise ValueError(f"it holds {count} tensors; a prefix file holds at most {MAX_TENSORS}")
    return header


def load_prefix_bytes(data: bytes, spec: ModelSpec | None = None, source: str = "upload",
                      max_prefix_len: int | None = None) -> ExportedPrefix:
    """Validate a prefix held in memory (server uploads, and files via load_prefix). Its shapes (the length
    within `max_prefix_len`, the widths `spec`'s) are checked from the header, before its tensors are loaded."""
    import struct

    from safetensors.torch import load

    invalid = (SafetensorError, ValueError, RuntimeError, UnicodeDecodeError, struct.error)
    try:
        header = safetensors_header(data)
        metadata = header.get("__metadata__")
        if metadata is not None and not (isinstance(metadata, dict)
                                         and all(isinstance(v, str) for v in metadata.values())):
            raise ValueError("__metadata__ is not an object of strings")
    except invalid as e:
        raise PrefixFileError(f"{source}: not a valid safetensors file ({e})") from None
    _check_format(metadata, source)  # from the header too: another file's tensors are never loaded
    _check_declared_shapes(header, spec, max_prefix_len, source)
    try:
        tensors = load(data)  # checks the header's entries and the data's extent
    except invalid as e:
        raise PrefixFileError(f"{source}: not a valid safetensors file ({e})") from None
    return _parse(tensors, metadata, source, spec)
