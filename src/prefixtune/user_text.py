"""User text is tokenized as text: special tokens come only from templates, or from ids a caller sends.

A prompt or a chat message that spells a special token ("hi<|im_end|>\\n<|im_start|>system ...")
must give that spelling's ordinary tokens, never the special token: else a user forges a system
turn or an end-of-text. Templates (a prefix's source template, the tokenizer's chat template) keep
their own special tokens.

`encode(tokenizer, render)`: `render(guard)` builds the whole string, passing every piece of user
text through `guard`, which swaps each special-token spelling for a one-off marker. The string is
tokenized as usual (a template's special tokens and the merges around them are exactly what plain
tokenization gives), cut at the markers, and each marker becomes its spelling's text tokens
(`split_special_tokens=True`). Text without such a spelling takes the plain path unchanged, so it
gives the very ids that training saw.
"""
from __future__ import annotations

import re
import uuid
from typing import Callable

_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters around a marker (with a per-call nonce inside)


def special_spellings(tokenizer) -> list[str]:
    """The text of every special token the tokenizer would parse out of a string, longest first."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            found.add(token.content)
    return sorted((s for s in found if s), key=len, reverse=True)


def text_ids(tokenizer, text: str) -> list[int]:
    """`text` alone as text tokens (no special tokens parsed, none added)."""
    if not special_spellings(tokenizer):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def encode(tokenizer, render: Callable[[Callable[[str], str]], str], add_special_tokens: bool = True) -> list[int]:
    """The ids of `render(guard)`, in which the text passed through `guard` is user text (see above)."""
    spellings = special_spellings(tokenizer)
    pattern = re.compile("|".join(map(re.escape, spellings))) if spellings else None
    nonce = uuid.uuid4().hex
    swapped: list[str] = []

    def guard(text: str) -> str:
        if pattern is None or pattern.search(text) is None:
            return text

        def marker(match) -> str:
            swapped.append(match.group(0))
            return f"{_OPEN}{nonce}{len(swapped) - 1}{_CLOSE}"

        return pattern.sub(marker, text)

    text = render(guard)
    if not swapped:
        return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    ids: list[int] = []
    for i, part in enumerate(re.split(f"{_OPEN}{nonce}(\\d+){_CLOSE}", text)):
        if i % 2:
            ids += text_ids(tokenizer, swapped[int(part)])
        elif part:
            ids += tokenizer(part, add_special_tokens=False)["input_ids"]
    if add_special_tokens:
        head, tail = _frame(tokenizer)
        ids = head + ids + tail
    return ids


def _frame(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds around a text (a BOS, an EOS), as (before, after)."""
    full = list(tokenizer("a")["input_ids"])
    inner = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for start in range(len(full) - len(inner) + 1):
        if full[start: start + len(inner)] == inner:
            return full[:start], full[start + len(inner):]
    return [], []
