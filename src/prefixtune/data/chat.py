"""Chat rows: a conversation trained through the tokenizer's chat template, the loss on assistant turns only.

The template is rendered once with every message's content replaced by a marker, to find where
each assistant turn lies in the rendered text. The text is then tokenized in segments, cut at the
turns' edges, each segment as `user_text.encode` tokenizes it: the template's text keeps its
special tokens, a message's content is text (a user who writes "<|im_end|>" gets those
characters, never the control token). So the tokens before a turn are exactly the prompt that
`chat_prompt_ids` gives for the conversation up to that turn, which is what the server decodes
from (serve/chat.py): one tokenization for training and serving. An assistant turn is the text
that rendering the conversation up to that turn adds after the generation prompt, tokenized on
its own as the model writes it: its content and the template's end-of-turn tokens, so the prefix
learns where to stop.

A conversation longer than the budget (max_source_len + max_target_len tokens) loses its oldest tokens, never
its last assistant turn: the row keeps the budget's last tokens up to the end of that turn, as decoding keeps a
chat prompt's last tokens (`encode_chat_prompt`). A last assistant turn longer than max_target_len in such a
row is refused (`ChatRowTooLong`), so no row trains on no target.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .. import user_text

ROLES = ("system", "user", "assistant")
# Private-use code points: no chat template writes them, so they mark where content goes.
_OPEN, _CLOSE = "\ue000", "\ue001"


@dataclass(frozen=True)
class Conversation:
    """One chat row as a training example (what `training_pairs` yields for it instead of a pair)."""

    messages: tuple  # ((role, content), ...)
    where: str = field(default="", compare=False, repr=False)  # "FILE: line N", for errors; not part of the row

    @classmethod
    def of(cls, messages: list[dict], where: str = "") -> "Conversation":
        return cls(tuple((m["role"], m["content"]) for m in messages), where)


class ChatRowTooLong(ValueError):
    """A conversation over the length budget whose last assistant turn alone is over max_target_len."""


def encode_chat(tokenizer, conversation: Conversation, max_len: int = 1024, max_target_len: int | None = None) -> dict:
    """{"input_ids", "labels"} of a conversation; labels are -100 outside assistant turns.

    A conversation longer than `max_len` tokens keeps its last `max_len` tokens up to the end of its last
    assistant turn (the oldest history is cut); that turn must then fit in `max_target_len` (default `max_len`),
    else `ChatRowTooLong`.
    """
    _check_template(tokenizer)
    marked = _marked(conversation.messages)
    render = lambda messages, prompt=False: tokenizer.apply_chat_template(  # noqa: E731
        messages, tokenize=False, add_generation_prompt=prompt)
    full = render(marked)
    cuts, trained = [0], []  # segment edges in `full`, and whether each segment is an assistant turn
    for k, (role, _) in enumerate(conversation.messages):
        if role != "assistant":
            continue
        before, through = render(marked[:k], prompt=True), render(marked[: k + 1])
        if not (full.startswith(through) and through.startswith(before) and len(before) >= cuts[-1]):
            raise ValueError("this chat template does not render a conversation turn by turn (an earlier turn "
                             "changes when a later one is added), so assistant turns cannot be located")
        cuts += [len(before), len(through)]
        trained += [False, True]
    cuts.append(len(full))
    trained.append(False)
    contents = [content for _, content in conversation.messages]
    input_ids, labels, last_turn = [], [], (0, 0)
    for start, end, is_turn in zip(cuts, cuts[1:], trained):
        ids = _encode(tokenizer, full[start:end], contents) if end > start else []
        if is_turn:
            last_turn = (len(input_ids), len(input_ids) + len(ids))
        input_ids += ids
        labels += ids if is_turn else [-100] * len(ids)
    if len(input_ids) <= max_len:
        return {"input_ids": input_ids, "labels": labels}
    turn_len, end = last_turn[1] - last_turn[0], last_turn[1]
    limit = min(max_target_len or max_len, max_len)
    if turn_len > limit:
        raise ChatRowTooLong(f"the conversation is {len(input_ids)} tokens, over the budget of {max_len} "
                             f"(max_source_len + max_target_len), and its last assistant turn alone is {turn_len} "
                             f"tokens, over max_target_len {limit}: raise --max-target-len to at least {turn_len}, "
                             f"or shorten the turn")
    start = max(end - max_len, 0)  # the history's oldest tokens go; what follows the last turn trains nothing
    return {"input_ids": input_ids[start:end], "labels": labels[start:end]}


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    """The ids that decode the next assistant turn after `messages` ((role, content) pairs or
    {"role", "content"} dicts): the template with its generation prompt, contents as text."""
    _check_template(tokenizer)
    pairs = [(m["role"], m["content"]) if isinstance(m, dict) else tuple(m) for m in messages]
    rendered = tokenizer.apply_chat_template(_marked(pairs), tokenize=False, add_generation_prompt=True)
    return _encode(tokenizer, rendered, [content for _, content in pairs])


def encode_chat_prompt(tokenizer, conversation: Conversation, max_len: int = 1024) -> list[int]:
    """The prompt that decodes the conversation's next assistant turn: every message before its last assistant
    turn (all of them when it ends on another role), then the template's generation prompt; the last `max_len`
    tokens. The same tokens as training puts before that turn."""
    messages = list(conversation.messages)
    if messages and messages[-1][0] == "assistant":
        messages = messages[:-1]
    return chat_prompt_ids(tokenizer, messages)[-max_len:]


def _check_template(tokenizer):
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat rows need a tokenizer with a chat template; this model's tokenizer has none")


def _marked(messages) -> list[dict]:
    """The messages with content k replaced by a marker (private-use characters no template writes)."""
    return [{"role": role, "content": f"{_OPEN}{k}{_CLOSE}"} for k, (role, _) in enumerate(messages)]


def _encode(tokenizer, marked_text: str, contents: list[str]) -> list[int]:
    """`marked_text` with each marker replaced by its content, tokenized with the contents as user text.
    (re.sub's replacement function is not re-scanned, so a content cannot forge a marker.)"""
    def render(guard):
        return re.sub(f"{_OPEN}(\\d+){_CLOSE}", lambda m: guard(contents[int(m.group(1))]), marked_text)

    return [int(i) for i in user_text.encode(tokenizer, render, add_special_tokens=False)]
