"""Chat rows: a conversation trained through the tokenizer's chat template, the loss on assistant turns only.

The template is rendered once with every message's content replaced by a marker, so that
the template's own text (its special tokens included) is tokenized as the template, and each
message's content is tokenized as plain text (`split_special_tokens=True`: a user who writes
"<|im_end|>" gets those characters, never the control token). An assistant turn is the text
that rendering the conversation up to that turn adds after the generation prompt: its content
and the template's end-of-turn tokens, so the prefix learns where to stop.
"""
from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
# Private-use code points: no chat template writes them, so they mark where content goes.
_OPEN, _CLOSE = "\ue000", "\ue001"


@dataclass(frozen=True)
class Conversation:
    """One chat row as a training example (what `training_pairs` yields for it instead of a pair)."""

    messages: tuple  # ((role, content), ...)

    @classmethod
    def of(cls, messages: list[dict]) -> "Conversation":
        return cls(tuple((m["role"], m["content"]) for m in messages))


def encode_chat(tokenizer, conversation: Conversation, max_len: int = 1024) -> dict:
    """{"input_ids", "labels"} of a conversation; labels are -100 outside assistant turns.

    A conversation longer than `max_len` tokens keeps its start (the end is cut, as a target is).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat rows need a tokenizer with a chat template; this model's tokenizer has none")
    marked = [{"role": role, "content": f"{_OPEN}{k}{_CLOSE}"} for k, (role, _) in enumerate(conversation.messages)]
    render = lambda messages, prompt=False: tokenizer.apply_chat_template(  # noqa: E731
        messages, tokenize=False, add_generation_prompt=prompt)
    full = render(marked)
    spans = []  # (start, end) of each assistant turn in `full`
    for k, (role, _) in enumerate(conversation.messages):
        if role != "assistant":
            continue
        before, through = render(marked[:k], prompt=True), render(marked[: k + 1])
        if not (full.startswith(through) and through.startswith(before)):
            raise ValueError("this chat template does not render a conversation turn by turn (an earlier turn "
                             "changes when a later one is added), so assistant turns cannot be located")
        spans.append((len(before), len(through)))
    input_ids, labels = [], []
    for text, is_content, trained in _pieces(full, spans):
        if is_content:
            text = conversation.messages[int(text)][1]
        ids = tokenizer(text, add_special_tokens=False, split_special_tokens=is_content)["input_ids"]
        input_ids += ids
        labels += ids if trained else [-100] * len(ids)
    return {"input_ids": input_ids[:max_len], "labels": labels[:max_len]}


def encode_chat_prompt(tokenizer, conversation: Conversation, max_len: int = 1024) -> list[int]:
    """The prompt that decodes the conversation's next assistant turn: every message before its last assistant
    turn (all of them when it ends on another role), then the template's generation prompt; the last `max_len`
    tokens. Content is tokenized as text, as in training."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat rows need a tokenizer with a chat template; this model's tokenizer has none")
    messages = list(conversation.messages)
    if messages and messages[-1][0] == "assistant":
        messages = messages[:-1]
    marked = [{"role": role, "content": f"{_OPEN}{k}{_CLOSE}"} for k, (role, _) in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=True)
    ids = []
    for text, is_content, _ in _pieces(rendered, []):
        if is_content:
            text = messages[int(text)][1]
        ids += tokenizer(text, add_special_tokens=False, split_special_tokens=is_content)["input_ids"]
    return ids[-max_len:]


def _pieces(full: str, spans: list[tuple[int, int]]):
    """(text or message index, is content, inside an assistant turn) for consecutive pieces of `full`."""
    cuts = sorted({0, len(full), *(p for span in spans for p in span)})
    for start, end in zip(cuts, cuts[1:]):
        trained = any(s <= start and end <= e for s, e in spans)
        rest = full[start:end]
        while rest:
            at = rest.find(_OPEN)
            if at < 0:
                yield rest, False, trained
                break
            if at:
                yield rest[:at], False, trained
            close = rest.index(_CLOSE, at)
            yield rest[at + 1: close], True, trained
            rest = rest[close + 1:]
