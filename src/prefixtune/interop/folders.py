"""Prefix folders and archives: a folder is accepted wherever a prefix file is; an archive is a server upload.

A folder is either ours, HF-style (`prefix.safetensors` + `README.md`), or a PEFT
PREFIX_TUNING adapter (`adapter_config.json` + `adapter_model.safetensors`). An
archive (zip or tar, uploaded to the server) holds the files of one of those folders.
Everything ends up as a prefixtune prefix file and goes through the same checks.
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from ..prefix_file import ExportedPrefix, PrefixFileError, load_prefix
from ..models import ModelSpec
from . import peft

PREFIX_FILE = "prefix.safetensors"
CARD_FILE = "README.md"
KNOWN = (PREFIX_FILE, peft.CONFIG_FILE, peft.WEIGHTS_FILE)
MAX_MEMBERS = 64               # members of one archive (directories included)
MAX_META_BYTES = 64 << 10      # a tar long-name or pax header's data: a name, never megabytes
MAX_ZIP_DIRECTORY = 1 << 20    # a zip's central directory: 64 members' names and fields, never megabytes
META_NAMES = {b"L": "GNU long name", b"K": "GNU long link", b"x": "pax", b"g": "pax global"}
META_TYPES = tuple(META_NAMES)
BLOCK = tarfile.BLOCKSIZE


def load_any(path, spec: ModelSpec | None = None) -> ExportedPrefix:
    """A prefix from a file, our HF-style folder (prefix.safetensors + README.md) or a PEFT prefix-tuning
    adapter folder, checked against `spec` when given: what a user may name as a prefix."""
    return load_folder(path, spec) if Path(path).is_dir() else load_prefix(path, spec)


def load_folder(folder, spec: ModelSpec | None = None) -> ExportedPrefix:
    """A prefix from our HF-style folder or a PEFT adapter folder, checked against `spec` when given."""
    folder = Path(folder)
    if (folder / PREFIX_FILE).is_file():
        return load_prefix(folder / PREFIX_FILE, spec)
    if peft.is_peft_dir(folder):
        return peft.load_peft(folder, spec)
    raise PrefixFileError(f"{folder}: a folder holds no prefix: expected {PREFIX_FILE} (prefixtune) "
                          f"or {peft.CONFIG_FILE} + {peft.WEIGHTS_FILE} (PEFT)")


class BoundedReader:
    """A decompressed stream that refuses to yield more than `cap` bytes in all; `read_bytes` counts them.
    Every byte archive parsing sees comes through here, so a compressed bomb costs at most `cap`."""

    def __init__(self, stream, cap: int, source: str):
        self.stream, self.cap, self.source, self.read_bytes = stream, cap, source, 0

    def read(self, n: int) -> bytes:
        if self.read_bytes + n > self.cap:
            raise PrefixFileError(f"{self.source}: the archive unpacks to more than {self.cap} bytes")
        out = bytearray()
        while len(out) < n:
            chunk = self.stream.read(n - len(out))
            if not chunk:
                break
            out += chunk
        self.read_bytes += len(out)
        return bytes(out)


def _is_tar_header(block: bytes) -> bool:
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")  # checks the header's checksum
        return True
    except tarfile.HeaderError:
        return False


def _tar_stream(data: bytes):
    """The decompressed stream of a (possibly gzip, bz2 or xz) tar, or None when `data` is no tar."""
    for magic, module in ((b"\x1f\x8b", gzip.GzipFile), (b"BZh", bz2.BZ2File), (b"\xfd7zXZ\x00", lzma.LZMAFile)):
        if data.startswith(magic):
            return module(fileobj=io.BytesIO(data)) if module is gzip.GzipFile else module(io.BytesIO(data))
    return io.BytesIO(data) if len(data) >= BLOCK and _is_tar_header(data[:BLOCK]) else None


def _check_zip_directory(data: bytes, source: str):
    """The zip's end record, checked before zipfile reads the central directory it points to: zipfile builds
    an object per entry there (12 MB of empty entries cost 80 MB), and counts them only afterwards."""
    at = data.rfind(b"PK\x05\x06", max(0, len(data) - 22 - 0xFFFF))
    if at < 0 or at + 22 > len(data):
        return  # no end record: zipfile refuses the archive
    if at >= 20 and data[at - 20: at - 16] == b"PK\x06\x07":  # zip64 (its own counts): never needed for a prefix
        raise PrefixFileError(f"{source}: a zip64 archive; a prefix folder fits a plain zip")
    entries, size = struct.unpack("<HI", data[at + 10: at + 16])
    if entries > MAX_MEMBERS:
        raise PrefixFileError(f"{source}: the archive holds {entries} members; the limit is {MAX_MEMBERS}")
    if size > MAX_ZIP_DIRECTORY:
        raise PrefixFileError(f"{source}: the archive's directory is {size} bytes; the limit is {MAX_ZIP_DIRECTORY}")


def _checked_tar(reader: BoundedReader, source: str) -> bytes:
    """The tar's bytes, read header by header: each header's declared size is checked before its data is
    read (a GNU long name or a pax header is data that tarfile would read whole), members are counted.
    Only then does tarfile see them."""
    out, members = bytearray(), 0
    while True:
        block = reader.read(BLOCK)
        if len(block) < BLOCK or block == bytes(BLOCK):  # the end marker (or a truncated tar: tarfile says so)
            out += block
            return bytes(out)
        if not _is_tar_header(block):
            raise PrefixFileError(f"{source}: not a readable tar archive (a damaged header at byte {len(out)})")
        kind = block[156:157]
        size = tarfile.nti(block[124:136])
        if size < 0:
            raise PrefixFileError(f"{source}: a tar header declares a negative size")
        if kind in META_TYPES and size > MAX_META_BYTES:
            raise PrefixFileError(f"{source}: a tar {META_NAMES[kind]} header declares {size} bytes; "
                                  f"the limit is {MAX_META_BYTES}")
        if kind not in META_TYPES:
            members += 1
            if members > MAX_MEMBERS:
                raise PrefixFileError(f"{source}: the archive holds more than {MAX_MEMBERS} members")
        padded = -(-size // BLOCK) * BLOCK
        if reader.read_bytes + padded > reader.cap:
            raise PrefixFileError(f"{source}: the archive unpacks to more than {reader.cap} bytes")
        out += block
        while padded:  # in pieces: a member's data is never one allocation of its declared size
            piece = reader.read(min(padded, 1 << 20))
            if not piece:
                break
            out += piece
            padded -= len(piece)


def read_archive(data: bytes, limit: int, source: str) -> dict[str, bytes] | None:
    """The known files of a zip or tar (plain, gzip, bz2 or xz) by base name; None when `data` is no archive.
    Other members are skipped, never extracted to disk. Parsing reads at most `unpack_cap(limit)` bytes,
    decompressed, and checks every tar header's size before trusting it; a refusal names its reason."""
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
            _check_zip_directory(data, source)
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                infos = z.infolist()
                if len(infos) > MAX_MEMBERS:
                    raise PrefixFileError(f"{source}: the archive holds {len(infos)} members; the limit is "
                                          f"{MAX_MEMBERS}")
                for info in infos:
                    if not info.is_dir():
                        keep(info.filename, info.file_size, lambda i=info: z.open(i).read(limit + 1))
            return found
        stream = _tar_stream(data)
        if stream is None:
            return None
        plain = _checked_tar(BoundedReader(stream, unpack_cap(limit), source), source)
        with tarfile.open(fileobj=io.BytesIO(plain), mode="r:") as t:
            for member in t:
                if member.isfile():
                    keep(member.name, member.size, lambda m=member: t.extractfile(m).read(limit + 1))
    except PrefixFileError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, ValueError, NotImplementedError,
            lzma.LZMAError, zlib.error) as e:
        raise PrefixFileError(f"{source}: not a readable zip or tar archive ({type(e).__name__}: {e})") from None
    return found


def unpack_cap(limit: int) -> int:
    """The most bytes an archive may unpack to: its prefix files (two at most, each within `limit`) and
    room for headers and small extras (a README, a card)."""
    return 2 * limit + (1 << 20)


def archive_to_prefix_bytes(data: bytes, spec: ModelSpec, limit: int, source: str = "upload") -> bytes:
    """The prefixtune prefix file an archive stands for (its prefix.safetensors, or its PEFT adapter converted)."""
    files = read_archive(data, limit, source)
    if files is None:
        raise PrefixFileError(f"{source}: not a zip or tar archive")
    return files_to_prefix_bytes(files, spec, source)


def files_to_prefix_bytes(files: dict[str, bytes], spec: ModelSpec, source: str = "upload",
                          max_prefix_len: int | None = None, base_names: tuple[str, ...] | None = None) -> bytes:
    """The prefix file that an archive's known files (`read_archive`) stand for. A PEFT adapter is checked
    against `max_prefix_len` and, given `base_names`, must name one of them (or no base model)."""
    if PREFIX_FILE in files:
        return files[PREFIX_FILE]
    if peft.CONFIG_FILE in files and peft.WEIGHTS_FILE in files:
        config = peft.check_config(peft.parse_config(files[peft.CONFIG_FILE], source), source, max_prefix_len)
        if base_names is not None:
            peft.check_base_model(config, base_names, source)
        return peft.peft_to_bytes(config, files[peft.WEIGHTS_FILE], spec, source, max_prefix_len)
    raise PrefixFileError(f"{source}: the archive holds {sorted(files) or 'none of the expected files'}; expected "
                          f"{PREFIX_FILE}, or {peft.CONFIG_FILE} and {peft.WEIGHTS_FILE} (a PEFT adapter)")
