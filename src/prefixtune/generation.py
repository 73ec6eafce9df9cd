"""What a decoding asks for, shared by the engine (engine/), the CLI, evaluation and the server:
`DecodingConfig`, the stop tokens (`stop_ids`), HF's repetition controls (`apply_repetition_controls`,
the engine's per-row logits processor) and padding helpers for batched forwards.

Every decoding runs on the engine (engine/; engine/offline.py decodes a list of prompts).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

DTYPES = ("model", "auto", "bf16", "fp32")


@dataclass
class DecodingConfig:
    max_new_tokens: int = 64
    num_beams: int = 1
    length_penalty: float = 1.0
    stop_at_newline: bool = True
    ignore_eos: bool = False  # decode exactly max_new_tokens unless a newline stops it (benchmarks)
    # HF's controls against loops ("fictional fictional ..."), off by default. Both look at the generated
    # tokens only, not the source: a data-to-text output must be free to copy its input's names.
    no_repeat_ngram_size: int = 0     # n > 0: an n-gram never occurs twice in one output
    repetition_penalty: float = 1.0   # > 1: a generated token's logit is divided (if > 0) or multiplied by it
    # the engine's dtype (engine.offline): "model" (the model's own), "auto" (bf16 where the CPU computes it
    # natively), "bf16" or "fp32"
    dtype: str = "model"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.num_beams < 1:
            raise ValueError("num_beams must be >= 1")
        if self.no_repeat_ngram_size < 0:
            raise ValueError("no_repeat_ngram_size must be >= 0 (0: off)")
        if not self.repetition_penalty > 0:
            raise ValueError("repetition_penalty must be > 0 (1: off)")

    @property
    def penalises(self) -> bool:
        return self.no_repeat_ngram_size > 0 or self.repetition_penalty != 1.0


def apply_repetition_controls(logits: torch.Tensor, histories: list[list[int]], config: DecodingConfig) -> torch.Tensor:
    """Row i's next-token logits after `config`'s repetition penalty and n-gram ban, given the tokens row i
    has generated (`histories[i]`). Returns `logits` itself when both controls are off."""
    if not config.penalises:
        return logits
    logits = logits.clone()
    n, penalty = config.no_repeat_ngram_size, config.repetition_penalty
    for row, history in enumerate(histories):
        if penalty != 1.0 and history:
            seen = torch.tensor(sorted(set(history)), device=logits.device)
            scores = logits[row, seen]
            logits[row, seen] = torch.where(scores > 0, scores / penalty, scores * penalty)
        if n and len(history) >= n - 1:
            tail = tuple(history[len(history) - n + 1:]) if n > 1 else ()
            banned = [history[i + n - 1] for i in range(len(history) - n + 1) if tuple(history[i:i + n - 1]) == tail]
            if banned:
                logits[row, banned] = float("-inf")
    return logits


@lru_cache(maxsize=8)
def _newline_ids(tokenizer) -> frozenset[int]:
    vocab = tokenizer.get_vocab()
    return frozenset(i for i in vocab.values() if "\n" in tokenizer.decode([i]))


def stop_ids(tokenizer, stop_at_newline: bool, ignore_eos: bool = False) -> set[int]:
    ids = set()
    eos = None if ignore_eos else tokenizer.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if stop_at_newline:
        ids |= _newline_ids(tokenizer)
    return ids


def pad_batch(sequences: list[list[int]], pad_id: int, device, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask, padded on `side`: left for a decoder (new tokens follow the input),
    right for an encoder (BART's absolute positions then match training's right padding)."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            where = slice(longest - len(s), longest) if side == "left" else slice(0, len(s))
            ids[i, where] = torch.tensor(s)
            mask[i, where] = 1
    return ids.to(device), mask.to(device)


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_batch(sequences, pad_id, device, "left")
