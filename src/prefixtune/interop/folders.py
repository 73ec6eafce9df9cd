"""Prefix folders and archives: wherever a prefix file is accepted, these are too.

A folder is either ours, HF-style (`prefix.safetensors` + `README.md`), or a PEFT
PREFIX_TUNING adapter (`adapter_config.json` + `adapter_model.safetensors`). An
archive (zip or tar, as a server upload) holds the files of one of those folders.
Everything ends up as a prefixtune prefix file and goes through the same checks.
"""
from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from ..prefix_file import ExportedPrefix, PrefixFileError, load_prefix
from ..models import ModelSpec
from . import peft

PREFIX_FILE = "prefix.safetensors"
CARD_FILE = "README.md"
KNOWN = (PREFIX_FILE, peft.CONFIG_FILE, peft.WEIGHTS_FILE)
MAX_MEMBERS = 64


def load_folder(folder, spec: ModelSpec | None = None) -> ExportedPrefix:
    """A prefix from our HF-style folder or a PEFT adapter folder, checked against `spec` when given."""
    folder = Path(folder)
    if (folder / PREFIX_FILE).is_file():
        return load_prefix(folder / PREFIX_FILE, spec)
    if peft.is_peft_dir(folder):
        return peft.load_peft(folder, spec)
    raise PrefixFileError(f"{folder}: a folder holds no prefix: expected {PREFIX_FILE} (prefixtune) "
                          f"or {peft.CONFIG_FILE} + {peft.WEIGHTS_FILE} (PEFT)")


def is_archive(data: bytes) -> bool:
    if data[:4] == b"PK\x03\x04":
        return True
    try:
        with tarfile.open(fileobj=io.BytesIO(data)):
            return True
    except Exception:  # whatever tarfile makes of a non-archive
        return False


def _members(data: bytes, limit: int, source: str) -> dict[str, bytes]:
    """The known files of an archive by base name; other members are skipped, never extracted to disk."""
    found: dict[str, bytes] = {}

    def keep(name: str, size: int, read):
        base = PurePosixPath(name).name
        if base not in KNOWN:
            return
        if base in found:
            raise PrefixFileError(f"{source}: the archive holds {base} twice")
        if size > limit:
            raise PrefixFileError(f"{source}: {base} in the archive is {size} bytes; the limit is {limit}")
        content = read()
        if len(content) > limit:
            raise PrefixFileError(f"{source}: {base} in the archive exceeds {limit} bytes")
        found[base] = content

    try:
        if data[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                if len(z.infolist()) > MAX_MEMBERS:
                    raise PrefixFileError(f"{source}: the archive holds too many files")
                for info in z.infolist():
                    if not info.is_dir():
                        keep(info.filename, info.file_size, lambda i=info: z.open(i).read(limit + 1))
        else:
            with tarfile.open(fileobj=io.BytesIO(data)) as t:
                seen = 0  # declared bytes walked over: a compressed bomb is not decompressed to the end
                for count, member in enumerate(t, 1):
                    seen += member.size
                    if count > MAX_MEMBERS or seen > 4 * limit:
                        raise PrefixFileError(f"{source}: the archive is too large or holds too many files")
                    if member.isfile():
                        keep(member.name, member.size, lambda m=member: t.extractfile(m).read(limit + 1))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, ValueError, NotImplementedError) as e:
        raise PrefixFileError(f"{source}: not a readable zip or tar archive ({type(e).__name__}: {e})") from None
    return found


def archive_to_prefix_bytes(data: bytes, spec: ModelSpec, limit: int, source: str = "upload") -> bytes:
    """The prefixtune prefix file an archive stands for (its prefix.safetensors, or its PEFT adapter converted)."""
    files = _members(data, limit, source)
    if PREFIX_FILE in files:
        return files[PREFIX_FILE]
    if peft.CONFIG_FILE in files and peft.WEIGHTS_FILE in files:
        config = peft.parse_config(files[peft.CONFIG_FILE], source)
        return peft.peft_to_bytes(config, files[peft.WEIGHTS_FILE], spec, source)
    raise PrefixFileError(f"{source}: the archive holds {sorted(files) or 'none of the expected files'}; expected "
                          f"{PREFIX_FILE}, or {peft.CONFIG_FILE} and {peft.WEIGHTS_FILE} (a PEFT adapter)")
