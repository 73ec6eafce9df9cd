"""What a caller asks the engine for, and what it gets back, one token at a time."""
from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass, field

import torch

_ids = itertools.count()
MIN_TEMPERATURE = 1e-5       # below it a row decodes greedily: logits / 1e-300 overflow fp32 (vLLM's floor too)
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64, as OpenAI and vLLM take it; choice i seeds with (seed + i) mod 2**64


@dataclass
class Request:
    """One prompt to continue, with its own prefix and its own decoding controls.

    `prompt`: token ids, already templated (the engine applies no template).
    `prefix`: the row's prefix as P per group (`{"decoder": (len, width)}`, what `ExportedPrefix.p`
    holds), an `ExportedPrefix`, or None for the base model alone.
    `temperature` below MIN_TEMPERATURE (0 included) is greedy (argmax, no softmax); otherwise sampling with `top_k` (0: off) and
    `top_p` (1: off) from a generator seeded with `seed`, so a seed gives the same tokens whatever
    the batch. `n` choices decode as `n` rows; choice i samples with seed `(seed + i) mod 2**64`; `seed` must
    lie in SEED_RANGE (int64), so two seeds never share a generator state.
    A row stops at `max_tokens` tokens, at a stop token (`stop_token_ids`, and the tokenizer's
    end-of-text unless `ignore_eos`; the stop token is not part of the output) or when its text
    contains a stop string (the text is cut before it). `timeout_s` counts from `add_request`. `request_id`
    (default: a fresh one) names one request until its last choice ends: an engine refuses it while in use.
    `beams` > 1: beam search with `length_penalty` (engine/beam.py), greedy and one choice only; the
    output comes whole when the search ends. `no_repeat_ngram_size` and `repetition_penalty`: HF's
    controls against loops, over the generated tokens only (sampling.repetition_controls).
    The ablations' virtual tokens (methods/embedding.py, infix.py; the lean Llama step declines them):
    `prefix_embeds` (k, hidden) are input embeddings read before the prompt, at positions 0..k-1 (for
    an encoder-decoder, before the encoder's input); `infix=True` makes `prefix` an infix ([x; INFIX; y]):
    a decoder-only model's prompt tokens but the last do not see it (an encoder-decoder's infix is a
    decoder self-attention prefix: its one group, "decoder").
    """

    prompt: list[int]
    prefix: object = None
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    n: int = 1
    stop: list[str] | tuple[str, ...] = ()
    stop_token_ids: list[int] | tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    timeout_s: float | None = None
    request_id: str | None = None
    tenant: str | None = None      # whose request: the scheduler shares slots and prefill fairly among tenants
    beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0  # n > 0: an n-gram never occurs twice in one output
    repetition_penalty: float = 1.0  # > 1: a generated token's logit is divided (if > 0) or multiplied by it
    prefix_embeds: torch.Tensor | None = None  # (k, hidden): virtual tokens as input embeddings
    infix: bool = False

    def __post_init__(self):
        if isinstance(self.prompt, torch.Tensor):
            self.prompt = self.prompt.tolist()
        self.prompt = [int(t) for t in self.prompt]
        if not self.prompt:
            raise ValueError("a request needs at least one prompt token")
        # types first: a float count or a NaN reaches the step, whose error would end every row of the batch
        # (topk, slicing) or which would decode garbage without a word (NaN temperature, NaN timeout: never)
        for name in ("max_tokens", "n", "top_k", "top_logprobs", "beams", "no_repeat_ngram_size", "seed"):
            value = getattr(self, name)
            if value is None and name == "seed":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            setattr(self, name, int(value))
        for name in ("temperature", "top_p", "repetition_penalty", "length_penalty", "timeout_s"):
            value = getattr(self, name)
            if value is None and name == "timeout_s":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or (
                    math.isinf(value) and name != "timeout_s"):
                raise ValueError(f"{name} must be a {'number' if name == 'timeout_s' else 'finite number'}, "
                                 f"got {value!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be an int64 ({SEED_RANGE[0]} to {SEED_RANGE[1]}), got {self.seed}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.top_logprobs < 0:
            raise ValueError("top_k and top_logprobs must be >= 0")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")
        if self.beams < 1:
            raise ValueError(f"beams must be >= 1, got {self.beams}")
        if self.beams > 1 and (not self.greedy or self.n > 1 or self.logprobs or self.top_logprobs):
            raise ValueError("beam search decodes greedily, one choice: it combines with neither temperature, "
                             "n > 1 nor logprobs")
        if self.no_repeat_ngram_size < 0:
            raise ValueError("no_repeat_ngram_size must be >= 0 (0: off)")
        if not self.repetition_penalty > 0:
            raise ValueError("repetition_penalty must be > 0 (1: off)")
        if self.prefix_embeds is not None and (self.prefix_embeds.dim() != 2 or not len(self.prefix_embeds)):
            raise ValueError(f"prefix_embeds must be (tokens, hidden), got shape {tuple(self.prefix_embeds.shape)}")
        if self.infix and self.prefix is None:
            raise ValueError("infix=True needs a prefix (the infix's P)")
        if self.request_id is None:
            self.request_id = f"req-{next(_ids)}"

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalises(self) -> bool:
        return self.no_repeat_ngram_size > 0 or self.repetition_penalty != 1.0


@dataclass
class TokenEvent:
    """One step of one choice: a new token (and its text), the end of the choice, or both.

    `token` is None on an event that only ends the choice (a stop token, which is not output;
    a cancellation, a timeout). `text` is the text that this event adds; text that could still
    become a stop string is held back until it cannot, so the pieces add up to the final text.
    """

    request_id: str
    index: int
    token: int | None
    text: str = ""
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None   # "stop", "length", "cancelled", "timeout"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Choice:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_tokens: int
    choices: list[Choice]

    def add(self, event: TokenEvent):
        choice = self.choices[event.index]
        if event.token is not None:
            choice.token_ids.append(event.token)
            if event.logprob is not None:
                choice.logprobs.append(event.logprob)
            if event.top_logprobs is not None:
                choice.top_logprobs.append(event.top_logprobs)
        choice.text += event.text
        if event.finish_reason is not None:
            choice.finish_reason = event.finish_reason
