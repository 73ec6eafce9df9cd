"""Every reason a row stops, in one place: stop tokens, stop strings, max_tokens; and its text.

A row's text is the detokenised output. While a row runs, text that could still become a stop
string, or that ends inside a multi-byte character, is held back; so the pieces streamed add up to
the final text, and a stop string never reaches a client.
"""
from __future__ import annotations

from .request import Request


def eos_ids(tokenizer) -> set[int]:
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    return set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])


class StopState:
    """The output of one row so far, and whether it must stop."""

    def __init__(self, request: Request, tokenizer, eos: set[int]):
        self.tokenizer = tokenizer
        self.max_tokens = request.max_tokens
        self.stop_ids = set(request.stop_token_ids) | (set() if request.ignore_eos else eos)
        self.stops = list(request.stop)
        if self.stops and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.tokens: list[int] = []
        self.sent = ""

    def _text(self) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _delta(self, text: str, final: bool) -> str:
        if not final:
            text = text.rstrip("\ufffd")
            text = text[: max(0, len(text) - self.hold)]  # not text[:-hold]: a short text sends nothing
        if not text.startswith(self.sent):  # a tokenizer that rewrites earlier text: send nothing more
            return ""
        out, self.sent = text[len(self.sent):], text
        return out

    def add(self, token: int) -> tuple[bool, str, str | None]:
        """Take a sampled token: (is it output, the text it adds, finish reason or None)."""
        if token in self.stop_ids:
            return False, self.finish(), "stop"
        self.tokens.append(token)
        text = self._text()
        cuts = [text.find(s) for s in self.stops if s in text]
        if cuts:
            return True, self._delta(text[: min(cuts)], True), "stop"
        if len(self.tokens) >= self.max_tokens:
            return True, self._delta(text, True), "length"
        return True, self._delta(text, False), None

    def finish(self) -> str:
        """The text held back, when the row ends for any other reason."""
        text = self._text()
        cuts = [text.find(s) for s in self.stops if s in text]
        return self._delta(text[: min(cuts)] if cuts else text, True)
