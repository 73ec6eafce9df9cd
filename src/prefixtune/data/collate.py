"""Records -> token batches: the source/target masks (loss on y only) and length-grouped batches."""
from __future__ import annotations

import random

import torch

from .. import user_text
from ..templates import fill_template
from .chat import Conversation, encode_chat
from .files import DataFileError

DEFAULT_TEMPLATES = {"decoder": "{source}\n", "encoder-decoder": "{source}"}


def source_ids(tokenizer, family: str, text: str, template: str | None = None, max_len: int = 512) -> list[int]:
    """Token ids of a formatted source, at most `max_len` (the template is checked: see templates.py).

    An over-long source loses the end of its text (an article keeps its start), never the
    template around it (the separator before the target must stay).
    """
    template = template or DEFAULT_TEMPLATES[family]
    ids = user_text.encode(tokenizer, lambda guard: fill_template(template, guard(text)))  # text as text
    if len(ids) <= max_len:
        return ids
    frame = len(tokenizer(fill_template(template, ""))["input_ids"])
    kept = user_text.text_ids(tokenizer, text)[: max(max_len - frame - 1, 0)]
    shorter = tokenizer.decode(kept)
    ids = user_text.encode(tokenizer, lambda guard: fill_template(template, guard(shorter)))
    return ids[-max_len:] if family == "decoder" else ids[:max_len]


def encode_pair(tokenizer, family: str, source: str, target: str, template: str | None = None,
                max_source_len: int = 512, max_target_len: int = 256) -> dict:
    """The source and the target are user text (user_text.py): a target that spells `<|im_end|>` trains those
    characters, never the control token (which serving never feeds for such text). Text without such a
    spelling gives the ids plain tokenization gives; the end-of-text token is the one added here."""
    src = source_ids(tokenizer, family, source, template, max_source_len)
    if family == "decoder":
        tgt = user_text.encode(tokenizer, lambda guard: guard(target), add_special_tokens=False)
        tgt = tgt[: max_target_len - 1] + [tokenizer.eos_token_id]
        return {"input_ids": src + tgt, "labels": [-100] * len(src) + tgt}
    tgt = user_text.encode(tokenizer, lambda guard: guard(target))  # with the tokenizer's </s> (BART, T5)
    if len(tgt) > max_target_len and tgt[-1] == tokenizer.eos_token_id:  # cut the text, keep the end (as decoders)
        tgt = tgt[: max_target_len - 1] + tgt[-1:]
    return {"input_ids": src, "labels": tgt[:max_target_len]}


def encode_example(tokenizer, family: str, example, template: str | None = None, max_source_len: int = 512,
                   max_target_len: int = 256) -> dict:
    """A (source, target) pair, or a chat `Conversation` (through the chat template), as token ids and labels."""
    if isinstance(example, Conversation):
        if family != "decoder":
            raise ValueError("chat rows train decoder-only models (the chat template writes one token stream)")
        return encode_chat(tokenizer, example, max_source_len + max_target_len, max_target_len)
    source, target = example
    return encode_pair(tokenizer, family, source, target, template, max_source_len, max_target_len)


def check_chat_examples(model: str, examples, max_source_len: int, max_target_len: int, tokenizer=None):
    """Encode every chat row of `examples` with `tokenizer` (the caller's, else `model`'s, loaded alone, no
    weights), before the model loads: a conversation its chat template refuses (jinja2's TemplateError: a system message or roles that do
    not alternate, say) or one too long to keep its last assistant turn is a DataFileError naming its row.
    A (source, target) pair always keeps its end-of-text target token: nothing to check."""
    from jinja2 import TemplateError

    from ..models import load_tokenizer

    chats = [e for e in examples if isinstance(e, Conversation)]
    if not chats:
        return
    tokenizer = tokenizer or load_tokenizer(model)
    for chat in chats:
        at = chat.where or "a chat row"
        try:
            encode_chat(tokenizer, chat, max_source_len + max_target_len, max_target_len)
        except TemplateError as e:
            raise DataFileError(f"{at}: the chat template of {model} refuses this conversation: {e}") from None
        except ValueError as e:  # too long, no chat template, a template that cannot be split into turns
            raise DataFileError(f"{at}: {e}") from None


class Collator:
    """Pads a list of encoded pairs on the right (training) into tensors."""

    def __init__(self, pad_id: int, family: str, decoder_start_id: int | None = None):
        self.pad_id, self.family, self.decoder_start_id = pad_id, family, decoder_start_id

    @staticmethod
    def _pad(seqs, value):
        longest = max(len(s) for s in seqs)
        return torch.tensor([s + [value] * (longest - len(s)) for s in seqs], dtype=torch.long)

    def __call__(self, examples: list[dict]) -> dict:
        ids = [e["input_ids"] for e in examples]
        batch = {"input_ids": self._pad(ids, self.pad_id),
                 "attention_mask": self._pad([[1] * len(s) for s in ids], 0),
                 "labels": self._pad([e["labels"] for e in examples], -100)}
        if self.family == "encoder-decoder":
            dec = [[self.decoder_start_id] + e["labels"][:-1] for e in examples]
            batch["decoder_input_ids"] = self._pad(dec, self.pad_id)
            batch["decoder_attention_mask"] = self._pad([[1] * len(s) for s in dec], 0)
        return batch


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, mega_batches: int = 50) -> list[list[int]]:
    """Shuffled batches of similar lengths, to cut padding (HF's LengthGroupedSampler idea).

    Indices are shuffled, cut into mega-batches of `mega_batches * batch_size`, each
    sorted by length and split into batches; the batch order is shuffled again.
    Deterministic in `seed`.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    size = mega_batches * batch_size
    batches = []
    for start in range(0, len(order), size):
        mega = sorted(order[start: start + size], key=lambda i: -lengths[i])
        batches += [mega[i: i + batch_size] for i in range(0, len(mega), batch_size)]
    rng.shuffle(batches)
    return batches
