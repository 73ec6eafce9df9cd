"""PrefixBank: many exported prefixes over one frozen model, decoded in mixed batches.

Every decoding of an exported prefix (CLI `generate`, evaluation, the server,
`PrefixMethod.generate`) goes through here, so a prefix behaves the same wherever
it is used. Decoding runs on the engine (`engine.offline`, continuous batching: greedy,
beam search, the repetition controls; encoder-decoders row by row).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from . import user_text
from .data.collate import DEFAULT_TEMPLATES, source_ids
from .engine.offline import EngineCache, decode_ids
from .generation import DecodingConfig
from .interop.folders import load_any
from .prefix_file import ExportedPrefix, PrefixFileError, check_prefix, source_template
from .models import model_spec


class PrefixUnavailable(RuntimeError):
    """A registered prefix could not be loaded (its file went missing or fails validation)."""


def prefix_bytes(prefix: ExportedPrefix) -> int:
    return sum(t.numel() * t.element_size() for t in prefix.p.values())


class PrefixBank:
    """Prefixes by id. Without limits every prefix stays resident (on the model's device), as always.

    With `max_resident` (prefixes) and/or `max_resident_bytes`, the bank is an LRU cache: a prefix
    registered with a loader (`register`, or `add(..., loader=)`) may be evicted, and `get` loads it
    again on demand. A prefix added without a loader is pinned: it stays resident, but counts.
    `get` returns an object that is never changed afterwards: a caller holding it (a request in
    flight) keeps that version whatever is evicted or replaced meanwhile.
    """

    def __init__(self, model, tokenizer, max_source_len: int = 512, max_resident: int | None = None,
                 max_resident_bytes: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.spec = model_spec(model)
        self.max_source_len = max_source_len
        if any(limit is not None and limit < 1 for limit in (max_resident, max_resident_bytes)):
            raise ValueError("max_resident and max_resident_bytes must be >= 1 (or None: no limit)")
        self.max_resident, self.max_resident_bytes = max_resident, max_resident_bytes
        self._resident: OrderedDict[str, ExportedPrefix] = OrderedDict()  # least recently used first
        self._bytes: dict[str, int] = {}                                 # of each resident prefix
        self._total_bytes = 0
        self._loaders: dict[str, Callable[[], ExportedPrefix]] = {}       # evictable: how to load it again
        self._versions: dict[str, int] = {}   # bumped by every add/register/remove: a load in flight
        self._next_version = 0                # for a replaced prefix must not become resident
        self._loading: dict[str, Future] = {}  # one load per prefix at a time; other lookups wait for it
        self._lock = threading.Lock()
        self._engines = EngineCache(model, tokenizer)  # the decoding engine, kept between calls
        self._prefetcher: ThreadPoolExecutor | None = None
        self.hits = self.misses = self.evictions = 0

    # -- the store ---------------------------------------------------------------------------
    def _prepare(self, prefix_id: str, prefix: ExportedPrefix | str | Path) -> ExportedPrefix:
        """Checked (prefix_file.check_prefix) and on the model's device."""
        if not isinstance(prefix, ExportedPrefix):
            prefix = load_any(prefix, self.spec)
        else:
            check_prefix(prefix, self.spec, f"prefix {prefix_id!r}")
        device = self.model.device
        return ExportedPrefix({g: t.to(device) for g, t in prefix.p.items()}, prefix.metadata)

    def _new_version(self, prefix_id: str):
        self._next_version += 1
        self._versions[prefix_id] = self._next_version
        self._loading.pop(prefix_id, None)  # a load in flight is of the old version: nobody waits for it now

    def add(self, prefix_id: str, prefix: ExportedPrefix | str | Path,
            loader: Callable[[], ExportedPrefix] | None = None) -> ExportedPrefix:
        """Add (or replace) a prefix, from an ExportedPrefix or a file; it is checked (prefix_file.check_prefix)
        and resident. With `loader` (returns the same prefix again) it may be evicted; without, it is pinned."""
        prefix = self._prepare(prefix_id, prefix)
        with self._lock:
            self._new_version(prefix_id)
            if loader is None:
                self._loaders.pop(prefix_id, None)
            else:
                self._loaders[prefix_id] = loader
            self._make_resident(prefix_id, prefix)
        return prefix

    def register(self, prefix_id: str, loader: Callable[[], ExportedPrefix]):
        """Make a prefix known without loading it: `get` calls `loader()` when it is first needed.
        Replaces whatever version was there (a resident copy of it is dropped)."""
        with self._lock:
            self._new_version(prefix_id)
            self._loaders[prefix_id] = loader
            self._drop(prefix_id)

    def remove(self, prefix_id: str):
        with self._lock:
            known = prefix_id in self._resident or prefix_id in self._loaders
            self._drop(prefix_id)
            self._loaders.pop(prefix_id, None)
            self._versions.pop(prefix_id, None)
            self._loading.pop(prefix_id, None)
        if not known:
            raise KeyError(f"no prefix {prefix_id!r} in the bank")

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(set(self._resident) | set(self._loaders))

    def __contains__(self, prefix_id) -> bool:
        with self._lock:
            return prefix_id in self._resident or prefix_id in self._loaders

    def get(self, prefix_id: str) -> ExportedPrefix:
        """The prefix: resident (a hit), or loaded now (a miss), evicting the least recently used beyond
        the limits. Raises KeyError for an unknown id, PrefixUnavailable when loading fails."""
        with self._lock:
            prefix = self._resident.get(prefix_id)
            if prefix is not None:
                self._resident.move_to_end(prefix_id)
                self.hits += 1
                return prefix
            loader = self._loaders.get(prefix_id)
            if loader is None:
                raise KeyError(f"no prefix {prefix_id!r} in the bank")
            pending = self._loading.get(prefix_id)
            if pending is None:  # this lookup loads it (a miss); others wait for the same load
                pending = self._loading[prefix_id] = Future()
                version = self._versions[prefix_id]
                self.misses += 1
            else:
                self.hits += 1
                version = None
        if version is None:
            return pending.result()
        try:  # disk and validation outside the lock: other prefixes are served meanwhile
            prefix = self._prepare(prefix_id, loader())
        except Exception as e:
            with self._lock:
                if self._loading.get(prefix_id) is pending:
                    del self._loading[prefix_id]
            error = e if isinstance(e, PrefixUnavailable) else \
                PrefixUnavailable(f"prefix {prefix_id!r} could not be loaded: {getattr(e, 'message', e)}")
            pending.set_exception(error)
            raise error from e
        with self._lock:
            if self._loading.get(prefix_id) is pending:
                del self._loading[prefix_id]
            if self._versions.get(prefix_id) == version:  # not replaced or removed while it loaded
                self._make_resident(prefix_id, prefix)
        pending.set_result(prefix)
        return prefix

    def prefetch(self, prefix_id: str):
        """Start loading a prefix that is not resident, in the background (a request's prefix, while the
        request waits in the queue); errors are left for the `get` that needs it."""
        with self._lock:
            if prefix_id in self._resident or prefix_id in self._loading or prefix_id not in self._loaders:
                return
            if self._prefetcher is None:
                self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="prefixtune-prefetch")
        self._prefetcher.submit(self._quiet_get, prefix_id)

    def _quiet_get(self, prefix_id: str):
        try:
            self.get(prefix_id)
        except Exception:
            pass

    # -- residency (under the lock) ----------------------------------------------------------------
    def _make_resident(self, prefix_id: str, prefix: ExportedPrefix):
        self._drop(prefix_id)
        self._resident[prefix_id] = prefix
        self._bytes[prefix_id] = prefix_bytes(prefix)
        self._total_bytes += self._bytes[prefix_id]
        self._evict(keep=prefix_id)

    def _drop(self, prefix_id: str):
        self._resident.pop(prefix_id, None)
        self._total_bytes -= self._bytes.pop(prefix_id, 0)

    def _over(self) -> bool:
        return ((self.max_resident is not None and len(self._resident) > self.max_resident)
                or (self.max_resident_bytes is not None and self._total_bytes > self.max_resident_bytes))

    def _evict(self, keep: str):
        """Least recently used first; never a pinned prefix, nor the one just made resident."""
        if not self._over():
            return
        for victim in [i for i in self._resident if i != keep and i in self._loaders]:
            self._drop(victim)
            self.evictions += 1
            if not self._over():
                return

    def resident_count(self) -> int:
        return len(self._resident)

    def resident_bytes(self) -> int:
        return self._total_bytes

    def template_of(self, prefix_id: str | None) -> str:
        """How a prefix's training wrote the source (stored in its metadata, checked when added)."""
        template = None if prefix_id is None else source_template(self.get(prefix_id).metadata, prefix_id)
        return template or DEFAULT_TEMPLATES[self.spec.family]

    # -- decoding ----------------------------------------------------------------------------
    def encode(self, text: str, prefix_id: str | None, raw: bool = False, max_len: int | None = None) -> list[int]:
        """The prompt's token ids, at most `max_len` (default `max_source_len`): a source loses the end of
        its text, never its template; a raw prompt keeps its last tokens."""
        max_len = max_len or self.max_source_len
        if raw:  # user text as text: a spelled-out special token stays text (user_text.py)
            return user_text.encode(self.tokenizer, lambda guard: guard(text))[-max_len:]
        return source_ids(self.tokenizer, self.spec.family, text, self.template_of(prefix_id), max_len)

    def generate_ids(self, sequences: list[list[int]], prefix_ids: list[str | None],
                     config: DecodingConfig | None = None) -> list[list[int]]:
        """Token ids for each sequence, row i with prefix `prefix_ids[i]` (None: none), in one engine call."""
        if len(sequences) != len(prefix_ids):
            raise ValueError(f"{len(sequences)} inputs but {len(prefix_ids)} prefix ids")
        return self.decode_encoded(sequences, prefix_ids, config or DecodingConfig())

    def generate(self, inputs: list[str], prefix_ids: list[str | None] | str | None = None,
                 config: DecodingConfig | None = None, batch_size: int = 32, raw: bool = False,
                 progress=None, **decoding) -> list[str]:
        """Decode `inputs`; row i uses prefix `prefix_ids[i]` (one id for all rows, or None for none).

        `raw=True` feeds the inputs as they are (e.g. a chat prompt) instead of the prefix's template.
        `batch_size` inputs decode at once (continuous batching); output order is the input order.
        """
        if config is not None and decoding:  # one would be silently dropped
            raise ValueError(f"give decoding settings as config or as keywords ({', '.join(decoding)}), not both")
        config = config or DecodingConfig(**decoding)
        if prefix_ids is None or isinstance(prefix_ids, str):
            prefix_ids = [prefix_ids] * len(inputs)
        if len(prefix_ids) != len(inputs):  # zip would drop the rows beyond the shorter list
            raise ValueError(f"{len(inputs)} inputs but {len(prefix_ids)} prefix ids")
        encoded = [self.encode(t, pid, raw) for t, pid in zip(inputs, prefix_ids)]
        return [self._text(seq, config) for seq in self.decode_encoded(encoded, prefix_ids, config, batch_size,
                                                                       progress)]

    def decode_encoded(self, encoded: list[list[int]], prefix_ids: list[str | None], config: DecodingConfig,
                       batch_size: int = 32, progress=None) -> list[list[int]]:
        """Token ids for prompts already encoded, on the engine (continuous batching: no batch waits for
        its longest row; `batch_size` inputs decode at once, at most engine.offline.MAX_ENGINE_BATCH rows)."""
        prefixes = [None if pid is None else self.get(pid) for pid in prefix_ids]
        return decode_ids(self.model, self.tokenizer, encoded, prefixes, config, batch_size=batch_size,
                          engines=self._engines, progress=progress)

    def _text(self, ids: list[int], config: DecodingConfig) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return text.split("\n")[0].strip() if config.stop_at_newline else text.strip()


def single(model, tokenizer, prefix: str | Path | ExportedPrefix, prefix_id: str = "prefix") -> PrefixBank:
    """A bank holding one prefix: the common case of `generate --prefix FILE`."""
    bank = PrefixBank(model, tokenizer)
    bank.add(prefix_id, prefix)
    return bank


__all__ = ["PrefixBank", "PrefixFileError", "PrefixUnavailable", "single"]
