"""Logprobs in OpenAI's two shapes: completions (parallel lists) and chat (one entry per token).

`items` are (token, logprob, top) for the generated tokens, `top` a list of (token, logprob), the
most likely first. A token's text is its own decoding (a byte-level piece of a multi-byte character
decodes to U+FFFD, as in vLLM).
"""
from __future__ import annotations


def _text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def completion_logprobs(tokenizer, items, offset: int) -> tuple[dict, int]:
    """`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` and the offset after the last token."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, logprob, top in items:
        text = _text(tokenizer, token)
        out["tokens"].append(text)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append({_text(tokenizer, t): lp for t, lp in top or []})
        out["text_offset"].append(offset)
        offset += len(text)
    return out, offset


def chat_logprobs(tokenizer, items) -> list[dict]:
    """The `content` list of a chat choice's `logprobs`."""
    def entry(token, logprob):
        text = _text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [{**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in top or []]}
            for token, logprob, top in items]
