"""PrefixtuneConnector: a vLLM v1 KV connector that serves prefixtune prefixes from the paged KV cache.

Configure it with

    --kv-transfer-config '{"kv_connector": "PrefixtuneConnector",
                           "kv_connector_module_path": "prefixtune.vllm.connector",
                           "kv_role": "kv_consumer",
                           "kv_connector_extra_config": {"store": "/abs/prefix-store"}}'

(`prefixtune serve --engine vllm` does). A request whose kv_transfer_params name a prefix (see
`protocol.py`) starts with P placeholder tokens. Per step:

scheduler  `get_num_new_matched_tokens(request, n_local)`: P - n_local of the prompt is "external"
           (vLLM's own prefix cache may already hold whole blocks of it: the per-prefix cache salt
           makes those blocks this prefix's). Any P works: vLLM v1 accepts an external hit that ends
           inside a block, the rest of that block is then computed by the forward pass.
           `update_state_after_alloc`: the request's block ids give the slot of every position
           (slot = block_ids[pos // B] * B + pos % B, the same numbering whatever the kernel block
           size), and positions n_local..P-1 are queued for loading.
           `build_connector_meta`: the queued loads go to the workers with this step.
worker     `start_load_kv` (before the forward, since these loads are synchronous): for every
           attention layer, the prefix's keys/values for those positions (this rank's heads) are
           written with the attention backend's own `do_kv_cache_update`, so the cache layout, the
           dtype and an fp8 cache's scale are the backend's business, on CPU and GPU alike.
           vLLM's positions continue from num_computed_tokens = P, so the first real token sits at
           position P, where prefixtune puts it.

A prefix that cannot be loaded (deleted or replaced since the request was admitted, wrong length)
is reported through `get_block_ids_with_load_errors`; with kv_load_failure_policy "fail" (set by
the launcher) vLLM fails that request instead of decoding it without its prefix.
"""
from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from .protocol import PLACEHOLDER_TOKEN_ID, PrefixRef, layer_kv, prefix_path, spec_of_config

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("prefixtune.vllm")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class PrefixLoad:
    req_id: str
    ref: PrefixRef
    start: int                 # first position to write (positions before it are in vLLM's cache already)
    slots: list[int]           # slot of each position start..P-1
    error: str | None = None   # the scheduler already knows this load cannot be done


@dataclass
class PrefixtuneConnectorMetadata(KVConnectorMetadata):
    loads: list[PrefixLoad] = field(default_factory=list)


class PrefixtuneConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig" = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self._store = extra.get("store")
        if not self._store:
            raise ValueError("PrefixtuneConnector needs kv_connector_extra_config.store (the prefix store directory)")
        self._placeholder = int(extra.get("placeholder_token_id", PLACEHOLDER_TOKEN_ID))
        self._cache_size = int(extra.get("cached_prefixes", 256))
        self._block_size = vllm_config.cache_config.block_size
        self._model_config = vllm_config.model_config
        # scheduler side
        self._pending: list[PrefixLoad] = []
        # worker side
        self._kv: OrderedDict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._kv_lock = threading.Lock()
        self._failed_blocks: set[int] = set()
        self._spec = None

    # ==============================================================================================
    # scheduler side
    # ==============================================================================================
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        ref = PrefixRef.from_params(request.kv_transfer_params)
        if ref is None:
            return 0, False
        prompt = request.prompt_token_ids or []
        if len(prompt) <= ref.length:
            # vLLM must compute at least one token; the front end never sends such a request.
            log.error("request %s: prompt of %d tokens has no token after its %d-token prefix",
                      request.request_id, len(prompt), ref.length)
            return 0, False
        return max(ref.length - num_computed_tokens, 0), False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        if num_external_tokens <= 0:
            return
        ref = PrefixRef.from_params(request.kv_transfer_params)
        if ref is None:
            return
        start = ref.length - num_external_tokens
        block_ids = blocks.get_block_ids()[0]
        size = self._block_size
        slots = [block_ids[pos // size] * size + pos % size for pos in range(start, ref.length)]
        prompt = request.prompt_token_ids or []
        error = None
        if any(t != self._placeholder for t in prompt[start:ref.length]):
            error = f"the prompt does not start with {ref.length} placeholder tokens ({self._placeholder})"
        self._pending.append(PrefixLoad(request.request_id, ref, start, slots, error))

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = PrefixtuneConnectorMetadata(self._pending)
        self._pending = []
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return False, None

    # ==============================================================================================
    # worker side
    # ==============================================================================================
    def _prefix_kv(self, ref: PrefixRef, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(layers, P, H, D) keys and values of a prefix, read from the store once and kept (LRU)."""
        key = (ref.bank_id, ref.sha256)
        with self._kv_lock:
            if key in self._kv:
                self._kv.move_to_end(key)
                return self._kv[key]
        from ..prefix_file import load_prefix

        if self._spec is None:
            self._spec = spec_of_config(self._model_config.hf_config)
        prefix = load_prefix(prefix_path(self._store, ref.bank_id), self._spec)
        if prefix.metadata.get("sha256") != ref.sha256:
            raise ValueError(f"prefix {ref.bank_id!r} was replaced after the request was admitted")
        if prefix.prefix_len != ref.length:
            raise ValueError(f"prefix {ref.bank_id!r} has {prefix.prefix_len} tokens, the request {ref.length}")
        if set(prefix.p) != {"decoder"}:
            raise ValueError("only decoder-only prefixes can be served on vLLM")
        # fp32 file -> the model's dtype, as prefixtune's own decoding casts it
        keys, values = layer_kv(prefix.p["decoder"].to(dtype), self._spec)
        kv = (keys.to(device), values.to(device))
        with self._kv_lock:
            self._kv[key] = kv
            while len(self._kv) > self._cache_size:
                self._kv.popitem(last=False)
        return kv

    def _head_slice(self, layer, total_heads: int) -> slice:
        """This tensor-parallel rank's KV heads (vLLM splits them evenly, or replicates when tp > heads)."""
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        local = int(getattr(layer, "num_kv_heads", total_heads))
        if local == total_heads:
            return slice(0, total_heads)
        rank, world = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        if world > total_heads:  # each head replicated on world / total_heads ranks
            first = rank // (world // total_heads)
        else:
            first = rank * local
        return slice(first, first + local)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PrefixtuneConnectorMetadata)
        if not meta.loads:
            return
        layers = []
        for name, layer in forward_context.no_compile_layers.items():
            kv_cache = getattr(layer, "kv_cache", None)
            impl = getattr(layer, "impl", None)
            match = _LAYER_RE.search(name)
            if not isinstance(kv_cache, torch.Tensor) or kv_cache.numel() == 0 or impl is None or match is None:
                continue
            layers.append((int(match.group(1)), layer, kv_cache, impl))
        if not layers:
            return
        dtype = self._model_config.dtype
        device = layers[0][2].device
        parts_k, parts_v, slots = [], [], []  # per load: (layers, n, H, D)
        for load in meta.loads:
            try:
                if load.error:
                    raise ValueError(load.error)
                keys, values = self._prefix_kv(load.ref, dtype, device)
                parts_k.append(keys[:, load.start:])
                parts_v.append(values[:, load.start:])
                slots.extend(load.slots)
            except Exception as e:  # the request fails (kv_load_failure_policy), the engine goes on
                log.error("prefix %s for request %s cannot be loaded: %s", load.ref.bank_id, load.req_id, e)
                size = self._block_size
                self._failed_blocks.update({s // size for s in load.slots})
        if not slots:
            return
        keys, values = torch.cat(parts_k, dim=1), torch.cat(parts_v, dim=1)
        slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)
        for index, layer, kv_cache, impl in layers:
            heads = self._head_slice(layer, keys.shape[2])
            impl.do_kv_cache_update(layer, keys[index][:, heads].contiguous(), values[index][:, heads].contiguous(),
                                    kv_cache, slot_mapping)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv wrote every layer synchronously

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return  # a consumer only: prefixes are never written back

    def wait_for_save(self):
        return

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed
