"""Atomic writes: a file is either its old content or its new one, never half written.

Each write goes to a temporary file in the same folder, then `os.replace` renames it over the
target (atomic on POSIX and Windows), so a crash or a full disk never leaves a truncated file.
The temporary file is created private (0600); before the rename it gets the mode an ordinary
`open(path, "w")` would give: the existing file's mode, else 0666 less the umask. Exports and
model folders are meant to be shared. Its bytes are fsynced before the rename, so that after a power
loss the name holds the old content or the new, not an empty file. A process killed mid-write leaves
its temporary file (`.NAME.XXXXXXXX.tmp`): `remove_stale_temps` clears those of a folder's files.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch


def current_umask() -> int:
    """The process's umask, read without changing it where /proc allows (os.umask alone must set it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_mode(path: Path, directory: bool = False) -> int:
    """The mode `path` would have if written plainly: its present mode, else the umask's default."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return (0o777 if directory else 0o666) & ~current_umask()


def _temp_file(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return tmp


def remove_stale_temps(folder: str | os.PathLike, names) -> list[Path]:
    """Remove the temporary files that killed writes of `folder/NAME` left, for each NAME of `names`: only
    `_temp_file`'s pattern (`.NAME.` + mkstemp's 8 characters + `.tmp`), nothing else. For a folder that
    no other process is writing those files into. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    ours = re.compile("|".join(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp" for name in names))
    removed = []
    for path in folder.iterdir():
        if ours.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _replace(tmp: str, path: Path):
    os.chmod(tmp, ordinary_mode(path))
    os.replace(tmp, path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes):
    path = Path(path)
    tmp = _temp_file(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj, path: str | os.PathLike):
    path = Path(path)
    tmp = _temp_file(path)
    try:
        torch.save(obj, tmp)
        with open(tmp, "r+b") as f:  # torch.save closes the file unsynced: its bytes may still be in the page cache
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_pretrained(model, tokenizer, out: str | os.PathLike) -> Path:
    """`save_pretrained` of a model and its tokenizer into a folder that appears whole or not at all."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # mkdtemp makes the folder 0700, and safetensors writes the weights 0600: give all the ordinary modes
        mask = current_umask()
        for path in [tmp, *tmp.rglob("*")]:
            if not path.is_symlink():
                os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
