"""API keys -> tenants. Keys come from $PREFIXTUNE_API_KEYS and/or a keys file; lookups take constant time.

Formats:
  * environment: ``PREFIXTUNE_API_KEYS="key1:alice,key2:bob"`` (a tenant may hold several keys);
  * file: JSON ``{"key1": "alice", ...}`` or ``[{"key": "key1", "tenant": "alice"}, ...]``, or text with
    one ``key:tenant`` (or ``key tenant``) per line; ``#`` starts a comment.
Only SHA-256 digests of the keys are kept. A lookup compares the digest of the given key with every
configured digest using ``hmac.compare_digest`` and never stops early, so its time does not depend on
which key (if any) matched, nor on how much of a key was right.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from pathlib import Path

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN[1:-1])
ENV_VAR = "PREFIXTUNE_API_KEYS"


def valid_name(name) -> bool:
    """Tenant and prefix names: 1-64 of [A-Za-z0-9._-], starting with a letter or digit (no '/', no '..')."""
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def tenant_dir_name(tenant: str) -> str:
    """A tenant's directory in the store: a hash, so tenant names never become paths."""
    return hashlib.sha256(b"prefixtune-tenant\0" + tenant.encode()).hexdigest()[:32]



class KeyRing:
    def __init__(self, pairs: list[tuple[str, str]]):
        self._entries: list[tuple[bytes, str]] = []
        seen: dict[bytes, str] = {}
        for key, tenant in pairs:
            key, tenant = key.strip(), tenant.strip()
            if not key:
                raise ValueError("an API key is empty")
            if not valid_name(tenant):
                raise ValueError(f"tenant name {tenant!r} is invalid (allowed: {NAME_PATTERN})")
            digest = hashlib.sha256(key.encode()).digest()
            if digest in seen and seen[digest] != tenant:
                raise ValueError(f"one API key is given to two tenants ({seen[digest]!r} and {tenant!r})")
            if digest not in seen:
                seen[digest] = tenant
                self._entries.append((digest, tenant))

    def __len__(self):
        return len(self._entries)

    def tenants(self) -> list[str]:
        return sorted({t for _, t in self._entries})

    def authenticate(self, key: str | None) -> str | None:
        """The tenant owning `key`, or None. Constant time in the key's content."""
        if not key:
            return None
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found = None
        for known, tenant in self._entries:
            if hmac.compare_digest(digest, known):  # no early exit: every entry is compared
                found = tenant
        return found

    # -- sources -----------------------------------------------------------------------------
    @staticmethod
    def parse_pairs(text: str, source: str) -> list[tuple[str, str]]:
        pairs = []
        for n, item in enumerate(re.split(r"[,\n]", text), 1):
            item = item.split("#", 1)[0].strip()
            if not item:
                continue
            if ":" in item:
                key, _, tenant = item.rpartition(":")
            elif len(item.split()) == 2:
                key, tenant = item.split()
            else:
                raise ValueError(f"{source}: entry {n} is not 'key:tenant'")
            pairs.append((key, tenant))
        return pairs

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> list[tuple[str, str]]:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"keys file not found: {path}")
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith(("{", "[")):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON ({e})") from None
            if isinstance(data, dict):
                return [(str(k), str(v)) for k, v in data.items()]
            if isinstance(data, list) and all(isinstance(d, dict) and "key" in d and "tenant" in d for d in data):
                return [(str(d["key"]), str(d["tenant"])) for d in data]
            raise ValueError(f'{path}: expected {{"key": "tenant"}} or [{{"key": ..., "tenant": ...}}]')
        return cls.parse_pairs(text, str(path))

    @classmethod
    def load(cls, keys_file: str | os.PathLike | None = None, env: dict | None = None) -> "KeyRing":
        env = os.environ if env is None else env
        pairs = []
        if env.get(ENV_VAR):
            pairs += cls.parse_pairs(env[ENV_VAR], f"${ENV_VAR}")
        if keys_file:
            pairs += cls.from_file(keys_file)
        return cls(pairs)
