"""Per-tenant prefix storage: validated, atomic, quota-bound, and reloaded on restart.

Layout: ``STORE/<tenant-hash>/<name>.safetensors``. The tenant's directory is a hash of the
tenant name and `name` must match a strict pattern, so no request text ever becomes a path
component unchecked. In the bank every prefix is namespaced as ``<tenant-hash>/<name>``: two
tenants may each own an ``e2e`` and neither can reach the other's.

An upload is a prefix file, or a zip/tar archive of a prefix folder: ours (prefix.safetensors)
or a PEFT prefix-tuning adapter (adapter_config.json + adapter_model.safetensors), which is
converted to a prefix file first. An upload is validated completely (format, dtype, checksum,
fingerprint against the base model, finite values, length, template: prefix_file.check_prefix) before
anything is written; the file is then written with a temp file and a rename, so a crash leaves
either the old prefix or the new one, never half a file. The base model's name is reserved: no
prefix may take it.

Any number of prefixes may be stored; the bank keeps the recently used ones resident (an LRU within
`max_resident_prefixes` / `max_resident_bytes`) and loads the others on demand. On restart the store reads
each file's header only (format, base model, length) and registers it with the bank; the full validation
runs when a prefix is first loaded, and a file that fails it then fails that request, not the server.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..bank import PrefixBank, PrefixUnavailable
from ..interop.folders import files_to_prefix_bytes, read_archive
from ..atomic import atomic_write_bytes
from ..exported import read_header
from ..prefix_file import FORMAT, TENSOR_PREFIX, PrefixFileError, PrefixTooLong, load_prefix_bytes
from .settings import ServeSettings
from .errors import ServeError
from .tenants import NAME_PATTERN, tenant_dir_name, valid_name

log = logging.getLogger("prefixtune.serve")
SUFFIX = ".safetensors"
MAX_NAME_CHARS = 256  # a prefix's base_model metadata


@dataclass
class PrefixInfo:
    name: str
    prefix_len: int
    bytes: int
    created: int
    base_model: str

    def as_dict(self) -> dict:
        return {"id": self.name, "object": "prefix", "prefix_len": self.prefix_len, "bytes": self.bytes,
                "created": self.created, "base_model": self.base_model}


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def check_name(name: str):
    if not valid_name(name):
        raise ServeError(400, "invalid_name", f"invalid prefix name {name!r}: it must match {NAME_PATTERN}")


class PrefixStore:
    def __init__(self, bank: PrefixBank, settings: ServeSettings, tenants: list[str], reserved: tuple[str, ...] = (),
                 model_names: tuple[str, ...] | None = None):
        self.bank, self.settings = bank, settings
        self.reserved = set(reserved)  # the base model's name: `model` must mean one thing
        # what an uploaded PEFT adapter's base_model_name_or_path may say (None: not checked)
        self.model_names = model_names
        self.root = Path(settings.store_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()        # the index: held for lookups and updates, never across disk I/O
        self._writing = threading.Lock()     # one upload or delete at a time (its quota check, write, index update)
        self._index: dict[str, dict[str, PrefixInfo]] = {}  # tenant -> name -> info
        self._broken: dict[str, str] = {}  # bank id -> why its stored file failed to load (until a new upload)
        for tenant in tenants:
            self._load_tenant(tenant)

    # -- naming ------------------------------------------------------------------------------
    def bank_id(self, tenant: str, name: str) -> str:
        return f"{tenant_dir_name(tenant)}/{name}"

    def _path(self, tenant: str, name: str) -> Path:
        check_name(name)
        return self.root / tenant_dir_name(tenant) / f"{name}{SUFFIX}"

    # -- restart ---------------------------------------------------------------------------
    def _load_tenant(self, tenant: str):
        """Index the tenant's stored prefixes from their headers alone and register them with the bank,
        which loads each (fully validated) when first needed: a restart over 10,000 prefixes reads
        a few KB of each, not every tensor."""
        directory = self.root / tenant_dir_name(tenant)
        index = self._index.setdefault(tenant, {})
        if not directory.is_dir():
            return
        for path in sorted(directory.iterdir()):
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a write interrupted by a crash: never renamed, never valid
                continue
            name = path.name[: -len(SUFFIX)] if path.name.endswith(SUFFIX) else None
            if name is None or not valid_name(name) or not path.is_file():
                continue
            if name in self.reserved:
                log.warning("skipping stored prefix %s: its name is the base model's", path)
                continue
            try:
                info = self._index_entry(path, name)
            except (PrefixFileError, OSError) as e:
                log.warning("skipping stored prefix %s: %s", path, e)
                continue
            bank_id = self.bank_id(tenant, name)
            self.bank.register(bank_id, partial(self._load_stored, path, name, bank_id))
            index[name] = info
        log.info("tenant %s: %d prefixes stored", tenant, len(index))

    def _index_entry(self, path: Path, name: str) -> PrefixInfo:
        """What the index needs, from the file's safetensors header only (exported.read_header); checks that
        it is a prefix file for this base model. Its tensors are checked when the bank loads it (_load_stored)."""
        metadata, shapes = read_header(path)
        if metadata.get("format") != FORMAT:
            raise PrefixFileError("not a prefixtune prefix file")
        if metadata.get("fingerprint") != self.bank.spec.fingerprint():
            raise PrefixFileError(f"made for another base model ({metadata.get('base_model')!r})")
        shapes = [shape for key, shape in shapes.items() if key.startswith(TENSOR_PREFIX)]
        if not shapes or len(shapes[0]) != 2:
            raise PrefixFileError("holds no prefix tensors")
        prefix_len = shapes[0][0]
        if not 1 <= prefix_len <= self.settings.max_prefix_len:
            raise PrefixFileError(f"{prefix_len} virtual tokens; the limit is {self.settings.max_prefix_len}")
        stat = path.stat()
        return PrefixInfo(name, prefix_len, stat.st_size, int(stat.st_mtime), str(metadata.get("base_model", "")))

    def _load_stored(self, path: Path, name: str, bank_id: str):
        """The bank's loader for a stored prefix: read and fully validated, as an upload is. A file that
        fails is remembered, so that later requests for it are refused at once and clearly (resolve)."""
        inode = None
        try:
            with path.open("rb") as f:
                inode = os.fstat(f.fileno()).st_ino
                data = f.read()
            return self._validate(data, name)
        except (ServeError, OSError) as e:
            # an OSError's text holds the file's path: the server's layout is not the client's business
            message = e.message if isinstance(e, ServeError) else \
                f"the stored file cannot be read: {e.strerror or type(e).__name__}"
            log.warning("stored prefix %s cannot be loaded: %s", path, message)
            with self._lock:
                if inode is None or _inode(path) == inode:  # not replaced by an upload meanwhile
                    self._broken[bank_id] = message
            # the tenant's own name in the message (not the bank id), as resolve() words it for later requests
            raise PrefixUnavailable(f"prefix {name!r} is stored but cannot be loaded ({message}); "
                                    "upload it again") from None

    # -- operations --------------------------------------------------------------------------
    def _validate(self, data: bytes, name: str):
        try:  # the length and widths from the header: an oversized file is refused before its tensors load
            prefix = load_prefix_bytes(data, self.bank.spec, source=f"prefix {name!r}",
                                       max_prefix_len=self.settings.max_prefix_len)
        except PrefixTooLong as e:
            raise ServeError(400, "prefix_too_long", str(e)) from None
        except PrefixFileError as e:  # prefix_file.check_prefix: the same rules as the CLI and the bank
            raise ServeError(400, "invalid_prefix", str(e)) from None
        except Exception as e:  # anything a hostile file could still provoke is the file's fault
            raise ServeError(400, "invalid_prefix",
                             f"prefix {name!r}: not a valid prefix file ({type(e).__name__})") from None
        base = prefix.metadata.get("base_model", "")
        if len(base) > MAX_NAME_CHARS:  # it is stored, listed and echoed: a name, not a payload
            raise ServeError(400, "invalid_prefix", f"prefix {name!r}: its base_model metadata is {len(base)} "
                                                    f"characters; the limit is {MAX_NAME_CHARS}")
        return prefix

    def _unpack(self, data: bytes, name: str) -> bytes:
        """An archived prefix folder (ours or PEFT's) as a prefix file; anything else as it is."""
        source = f"prefix {name!r}"
        try:
            files = read_archive(data, self.settings.max_upload_bytes, source)
            return data if files is None else files_to_prefix_bytes(
                files, self.bank.spec, source, self.settings.max_prefix_len, self.model_names)
        except PrefixFileError as e:
            raise ServeError(400, "invalid_prefix", str(e)) from None
        except Exception as e:  # as in _validate: whatever a hostile archive provokes is the upload's fault
            raise ServeError(400, "invalid_prefix",
                             f"prefix {name!r}: not a valid prefix archive ({type(e).__name__})") from None

    def put(self, tenant: str, name: str, data: bytes, overwrite: bool = True) -> tuple[PrefixInfo, bool]:
        """Validate and store; returns (info, created). Nothing changes unless everything passes."""
        path = self._path(tenant, name)
        if name in self.reserved:
            raise ServeError(400, "reserved_name",
                             f"{name!r} is the base model's name, reserved: choose another prefix name")
        if len(data) > self.settings.max_upload_bytes:
            raise ServeError(413, "upload_too_large", f"upload of {len(data)} bytes exceeds the limit of "
                                  f"{self.settings.max_upload_bytes} bytes")
        data = self._unpack(data, name)
        if len(data) > self.settings.max_upload_bytes:  # what is stored counts, not what came (a converted archive)
            raise ServeError(413, "upload_too_large", f"prefix {name!r} would be stored as {len(data)} bytes, over "
                                  f"the limit of {self.settings.max_upload_bytes} bytes")
        prefix = self._validate(data, name)
        # The index lock is not held while the file is written (an fsync of megabytes): requests look prefixes up
        # on the event loop, and would all wait for the disk. Uploads and deletes take turns instead.
        with self._writing:
            with self._lock:
                index = self._index.setdefault(tenant, {})
                old = index.get(name)
                self._check_put(index, name, old, len(data), overwrite)
            atomic_write_bytes(path, data)
            with self._lock:
                # resident at once (it is likely used next), and evictable: the bank reloads it from `path`
                bank_id = self.bank_id(tenant, name)
                self.bank.add(bank_id, prefix, loader=partial(self._load_stored, path, name, bank_id))
                self._broken.pop(bank_id, None)
                info = PrefixInfo(name, prefix.prefix_len, len(data), int(time.time()),
                                  prefix.metadata.get("base_model", ""))
                index[name] = info
        return info, old is None

    def _check_put(self, index: dict, name: str, old: PrefixInfo | None, size: int, overwrite: bool):
        """Refuse an upload of `size` bytes as `name` into a tenant's `index`: existing, a case twin, quotas."""
        if old is not None and not overwrite:
            raise ServeError(412, "already_exists", f"prefix {name!r} already exists")
        # on a case-insensitive file system (macOS, Windows) 'E2E' and 'e2e' are one file: writing one would
        # replace the other's tensors, and deleting one would delete both
        twin = next((n for n in index if n != name and n.lower() == name.lower()), None) if old is None else None
        if twin is not None:
            raise ServeError(409, "name_conflict", f"prefix {twin!r} exists, and {name!r} differs from it only "
                                                   f"in case: choose another name, or replace {twin!r}")
        count = len(index) + (old is None)
        if count > self.settings.max_prefixes_per_tenant:
            raise ServeError(403, "quota_exceeded", f"quota exceeded: at most {self.settings.max_prefixes_per_tenant} "
                                                 "prefixes per tenant; delete one first")
        used = sum(i.bytes for i in index.values()) - (old.bytes if old else 0) + size
        if used > self.settings.max_bytes_per_tenant:
            raise ServeError(403, "quota_exceeded", f"quota exceeded: {used} bytes would exceed the tenant "
                                                 f"limit of {self.settings.max_bytes_per_tenant} bytes")

    def delete(self, tenant: str, name: str):
        path = self._path(tenant, name)
        with self._writing, self._lock:
            index = self._index.get(tenant, {})
            if name not in index:
                raise ServeError(404, "prefix_not_found", f"prefix {name!r} not found")
            path.unlink(missing_ok=True)
            del index[name]
            self._broken.pop(self.bank_id(tenant, name), None)
            try:
                self.bank.remove(self.bank_id(tenant, name))
            except KeyError:
                pass

    def get(self, tenant: str, name: str) -> PrefixInfo:
        check_name(name)
        with self._lock:
            info = self._index.get(tenant, {}).get(name)
        if info is None:
            raise ServeError(404, "prefix_not_found", f"prefix {name!r} not found")
        return info

    def list(self, tenant: str) -> list[PrefixInfo]:
        with self._lock:
            return sorted(self._index.get(tenant, {}).values(), key=lambda i: i.name)

    def count(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._index.values())

    def resolve(self, tenant: str, name: str) -> str | None:
        """The bank id of the tenant's prefix `name`, or None when the tenant has none by that name.
        A prefix that is not resident starts loading now, so that reading it overlaps the queueing."""
        if not valid_name(name):
            return None
        with self._lock:
            bank_id = self.bank_id(tenant, name) if name in self._index.get(tenant, {}) else None
            broken = self._broken.get(bank_id)
        if broken is not None:
            raise ServeError(500, "prefix_unavailable", f"prefix {name!r} is stored but cannot be loaded "
                                                        f"({broken}); upload it again")
        if bank_id is not None:
            self.bank.prefetch(bank_id)
        return bank_id
