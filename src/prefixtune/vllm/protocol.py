"""How a prefixtune prefix travels through vLLM: placeholder tokens, cache salt, transfer params, K/V per layer.

A decoder-only prefix of length P is the keys and values of P virtual tokens at positions 0..P-1
(post-RoPE keys, as a cache holds them; real tokens start at position P). vLLM's paged cache can
hold exactly that. A request for prefix `p` is therefore the prompt

    [PLACEHOLDER] * P + template(source)

with `kv_transfer_params = {"prefixtune": {"prefix": <bank id>, "length": P, "sha256": ...}}` and a
per-prefix `cache_salt`. The connector (`connector.py`) tells vLLM's scheduler that the first P
prompt tokens are already computed, and writes the prefix's K/V into their slots before the
forward pass: vLLM then computes only the real tokens, at positions P, P+1, ..., attending to the
prefix exactly as prefixtune's own decoding does. The salt keeps each prefix's cached blocks apart
(two prefixes share placeholder ids, never cache entries) and each tenant's apart.

Nothing here imports vLLM: the launcher, the middleware, the benchmark and the tests share it.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

PARAMS_KEY = "prefixtune"
PLACEHOLDER_TOKEN_ID = 0       # any id works: the placeholders are never computed, only their slots are filled
SALT_PREFIX = "prefixtune"
SUFFIX = ".safetensors"
_TENANT_RE = re.compile(r"[0-9a-f]{32}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class PrefixRef:
    """What a request carries about its prefix: enough for the connector to find and check it."""

    bank_id: str      # "<tenant-hash>/<name>", as in prefixtune's own store
    length: int       # P
    sha256: str       # the file's tensor checksum: a replaced file under the same name is a different prefix

    def params(self) -> dict:
        return {PARAMS_KEY: {"prefix": self.bank_id, "length": self.length, "sha256": self.sha256}}

    @property
    def salt(self) -> str:
        # vLLM's server takes salts of at most 128 characters without '/', '@' or '\\'
        return f"{SALT_PREFIX}-" + hashlib.sha256(f"{self.bank_id}\0{self.sha256}".encode()).hexdigest()

    @classmethod
    def from_params(cls, params: dict | None) -> "PrefixRef | None":
        """The reference in a request's kv_transfer_params, or None when it has none (or a malformed one)."""
        entry = (params or {}).get(PARAMS_KEY) if isinstance(params, dict) else None
        if not isinstance(entry, dict):
            return None
        bank_id, length, sha = entry.get("prefix"), entry.get("length"), entry.get("sha256")
        if not (isinstance(bank_id, str) and isinstance(length, int) and isinstance(sha, str)) or length < 1:
            return None
        return cls(bank_id, length, sha)


def tenant_salt(tenant_dir: str) -> str:
    """Cache salt of a tenant's requests without a prefix: tenants never share cached blocks."""
    return f"{SALT_PREFIX}-{tenant_dir}"


def prompt_ids(source_ids: list[int], length: int, placeholder: int = PLACEHOLDER_TOKEN_ID) -> list[int]:
    return [placeholder] * length + list(source_ids)


def prefix_path(store: str | Path, bank_id: str) -> Path:
    """The file of a bank id under the store, refusing anything that is not '<32 hex>/<valid name>'."""
    tenant, _, name = bank_id.partition("/")
    if not _TENANT_RE.fullmatch(tenant) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid prefix id {bank_id!r}")
    return Path(store) / tenant / f"{name}{SUFFIX}"


def spec_of_config(hf_config):
    """prefixtune's ModelSpec from a transformers config (no weights needed)."""
    from ..models import model_spec

    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    return model_spec(SimpleNamespace(config=text))


def layer_kv(p: torch.Tensor, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """P (len, layers*2*H*D) -> keys and values (layers, len, H, D): the token-major rows vLLM writes."""
    length = p.shape[0]
    x = p.reshape(length, spec.num_layers, 2, spec.num_kv_heads, spec.head_dim)
    return x[:, :, 0].transpose(0, 1).contiguous(), x[:, :, 1].transpose(0, 1).contiguous()


def template_of(metadata: dict, default: str = "{source}\n") -> str:
    try:
        cfg = json.loads(metadata.get("train_config", "{}") or "{}")
    except json.JSONDecodeError:
        cfg = {}
    return cfg.get("template") or default
