"""PrefixBank: many exported prefixes over one frozen model, decoded in mixed batches.

Every decoding of an exported prefix (CLI `generate`, evaluation, the server,
`PrefixMethod.generate`) goes through here, so a prefix behaves the same wherever
it is used. Greedy decoding runs on the engine (`engine.offline`, continuous
batching); beam search and repetition controls on `generation.decode`.
"""
from __future__ import annotations

import threading
from pathlib import Path


from .data.collate import DEFAULT_TEMPLATES, source_ids
from .engine.offline import EngineCache, decode_ids, engine_decodes
from .generation import DecodingConfig, decode
from .prefix_file import ExportedPrefix, PrefixFileError, check_prefix, load_prefix, source_template
from .models import model_spec
from .forward import prefix_kv_from_groups


class PrefixBank:
    def __init__(self, model, tokenizer, max_source_len: int = 512):
        self.model, self.tokenizer = model, tokenizer
        self.spec = model_spec(model)
        self.max_source_len = max_source_len
        self._prefixes: dict[str, ExportedPrefix] = {}
        self._lock = threading.Lock()
        self._engines = EngineCache(model, tokenizer)  # greedy decoding's engine, kept between calls

    # -- the store ---------------------------------------------------------------------------
    def add(self, prefix_id: str, prefix: ExportedPrefix | str | Path) -> ExportedPrefix:
        """Add (or replace) a prefix, from an ExportedPrefix or a file; it is checked (prefix_file.check_prefix)."""
        if not isinstance(prefix, ExportedPrefix):
            prefix = load_prefix(prefix, self.spec)
        else:
            check_prefix(prefix, self.spec, f"prefix {prefix_id!r}")
        device = self.model.device
        prefix = ExportedPrefix({g: t.to(device) for g, t in prefix.p.items()}, prefix.metadata)
        with self._lock:
            self._prefixes[prefix_id] = prefix
        return prefix

    def remove(self, prefix_id: str):
        with self._lock:
            if self._prefixes.pop(prefix_id, None) is None:
                raise KeyError(f"no prefix {prefix_id!r} in the bank")

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._prefixes)

    def __contains__(self, prefix_id) -> bool:
        return prefix_id in self._prefixes

    def get(self, prefix_id: str) -> ExportedPrefix:
        with self._lock:
            if prefix_id not in self._prefixes:
                raise KeyError(f"no prefix {prefix_id!r} in the bank")
            return self._prefixes[prefix_id]

    def template_of(self, prefix_id: str | None) -> str:
        """How a prefix's training wrote the source (stored in its metadata, checked when added)."""
        template = None if prefix_id is None else source_template(self.get(prefix_id).metadata, prefix_id)
        return template or DEFAULT_TEMPLATES[self.spec.family]

    # -- decoding ----------------------------------------------------------------------------
    def encode(self, text: str, prefix_id: str | None, raw: bool = False, max_len: int | None = None) -> list[int]:
        """The prompt's token ids, at most `max_len` (default `max_source_len`): a source loses the end of
        its text, never its template; a raw prompt keeps its last tokens."""
        max_len = max_len or self.max_source_len
        if raw:
            return self.tokenizer(text)["input_ids"][-max_len:]
        return source_ids(self.tokenizer, self.spec.family, text, self.template_of(prefix_id), max_len)

    def generate_ids(self, sequences: list[list[int]], prefix_ids: list[str | None],
                     config: DecodingConfig | None = None, on_token=None, cancelled=None) -> list[list[int]]:
        """Token ids for each sequence; `on_token(row, token)` sees greedy tokens as they come (streaming),
        `cancelled(row)` drops a row whose request gave up (generation.decode)."""
        if len(sequences) != len(prefix_ids):
            raise ValueError(f"{len(sequences)} inputs but {len(prefix_ids)} prefix ids")
        groups = [None if pid is None else self.get(pid).p for pid in prefix_ids]
        prefix_kv = prefix_kv_from_groups(groups, self.spec, device=self.model.device, dtype=self.model.dtype)
        return decode(self.model, self.tokenizer, sequences, prefix_kv, config, self.spec, on_token=on_token,
                      cancelled=cancelled)

    def generate(self, inputs: list[str], prefix_ids: list[str | None] | str | None = None,
                 config: DecodingConfig | None = None, batch_size: int = 32, raw: bool = False,
                 progress=None, **decoding) -> list[str]:
        """Decode `inputs`; row i uses prefix `prefix_ids[i]` (one id for all rows, or None for none).

        `raw=True` feeds the inputs as they are (e.g. a chat prompt) instead of the prefix's template.
        Inputs are sorted by length into batches of `batch_size` (less padding); output order is the input order.
        """
        config = config or DecodingConfig(**decoding)
        if prefix_ids is None or isinstance(prefix_ids, str):
            prefix_ids = [prefix_ids] * len(inputs)
        encoded = [self.encode(t, pid, raw) for t, pid in zip(inputs, prefix_ids)]
        if engine_decodes(config, self.spec):  # continuous batching: no batch waits for its longest row
            prefixes = [None if pid is None else self.get(pid) for pid in prefix_ids]
            ids = decode_ids(self.model, self.tokenizer, encoded, prefixes, config, batch_size=batch_size,
                             engines=self._engines, progress=progress)
            return [self._text(seq, config) for seq in ids]
        order = sorted(range(len(inputs)), key=lambda i: len(encoded[i]))
        outputs: list[str] = [""] * len(inputs)
        for start in range(0, len(order), batch_size):
            rows = order[start: start + batch_size]
            ids = self.generate_ids([encoded[i] for i in rows], [prefix_ids[i] for i in rows], config)
            for i, seq in zip(rows, ids):
                outputs[i] = self._text(seq, config)
            if progress is not None:
                progress(len(rows))
        return outputs

    def _text(self, ids: list[int], config: DecodingConfig) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return text.split("\n")[0].strip() if config.stop_at_newline else text.strip()


def single(model, tokenizer, prefix: str | Path | ExportedPrefix, prefix_id: str = "prefix") -> PrefixBank:
    """A bank holding one prefix: the common case of `generate --prefix FILE`."""
    bank = PrefixBank(model, tokenizer)
    bank.add(prefix_id, prefix)
    return bank


__all__ = ["PrefixBank", "PrefixFileError", "single"]
