"""Request bodies (OpenAI's completions API, plus prefixtune's own extensions).

A field that is not declared here is refused with a 400 naming it (as OpenAI does), and a declared
field that is not implemented is refused when given: nothing a client asks for is silently ignored.
Two fields ask for nothing, and are accepted as OpenAI and vLLM accept them: `user` (the end user's
id, for the provider's abuse monitoring) and a chat message's `name` (a participant's label). Neither
changes the answer: `name` is not given to the chat template (vLLM gives it; our training rows have
no names, and a prompt must be the tokens training saw), and `user` is neither logged nor stored."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..engine.request import SEED_RANGE

USER = "accepted as OpenAI and vLLM accept it; no effect on the answer (neither logged nor stored)"
NAME = ("accepted as OpenAI and vLLM accept it; no effect: not given to the chat template (training rows "
        "have no names)")


class StreamOptions(BaseModel):
    """`stream_options` (with `stream: true` only, as OpenAI and vLLM): what a stream reports beside its text."""

    model_config = ConfigDict(extra="forbid", strict=True)  # an unknown option is a 400, never ignored

    include_usage: Optional[bool] = Field(None, description="true: a last chunk with the usage (`choices: []`)")
    continuous_usage_stats: Optional[bool] = Field(
        None, description="vLLM's usage in every chunk: refused when true (not implemented), never ignored")


class CompletionRequest(BaseModel):
    """`POST /v1/completions`, as OpenAI defines it. `model` names one of the caller's prefixes, or the
    base model (no prefix). Decoding is greedy unless `temperature` > 0 (sampling), or beam search with
    `num_beams` (greedy, one choice; the text comes whole when the search ends). Types are strict: `"max_tokens": true`
    or `"stream": "yes"` is a 400, not 1 and True (an int is still taken where a float is expected)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # an unknown field is a 400, never ignored

    model: str = Field(..., max_length=256, description="a prefix name of the caller, or the base model name")
    prompt: Union[str, list[str]] = Field(..., description="one source text, or a list of them")
    max_tokens: Optional[int] = Field(None, ge=1, description="default 16 (as OpenAI)")
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 or absent: greedy (unlike OpenAI, whose "
                                                                      "default is 1); > 0: sampling")
    top_p: Optional[float] = Field(None, gt=0, le=1, description="nucleus sampling (1 or absent: off)")
    top_k: Optional[int] = Field(None, ge=-1, description="extension: sample among the k most likely (0, -1: off)")
    n: Optional[int] = Field(None, ge=1, description="choices per prompt; choice j of a seeded request uses seed + j")
    best_of: Optional[int] = Field(None, description="absent or equal to n")
    stop: Optional[Union[str, list[str]]] = Field(
        None, description='absent: stop at a newline (prefixtune\'s default); "\\n" in the list: the same; '
                          "other strings cut the text at their first occurrence; [] : only end-of-text stops")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20, description="each token's logprob and the k most likely")
    suffix: Optional[str] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    seed: Optional[int] = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1],
                                description="int64; the same seed gives the same text, whatever else is decoded")
    user: Optional[str] = Field(None, description=USER)
    truncate_prompt_tokens: Optional[int] = Field(
        None, ge=1, description="cut a prompt longer than this many tokens instead of refusing it (vLLM's name; "
                                "a source loses the end of its text, never its template)")
    # prefixtune extensions (with the openai client: extra_body={...})
    num_beams: int = Field(1, ge=1, le=8, description="beam search width (1 = greedy)")
    raw: bool = Field(False, description="feed the prompt as it is, not through the prefix's source template")
    ignore_eos: bool = Field(False, description="keep decoding past end-of-text (vLLM's extension; benchmarks)")
    no_repeat_ngram_size: int = Field(0, ge=0, le=16, description="an n-gram of this size never repeats within "
                                                                  "the completion (0: off)")
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="HF's (and vLLM's) penalty on tokens already "
                                                                    "generated (1: off)")
    logit_bias: Optional[Any] = Field(None, description="refused when given (not implemented), never ignored")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # an unknown field is a 400, never ignored

    role: Literal["system", "developer", "user", "assistant"]
    content: str = Field(..., description="text only (no content parts)")
    name: Optional[str] = Field(None, description=NAME)


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions`, as OpenAI defines it. The messages go through the tokenizer's chat
    template and are fed as they are (no prefix source template); `model` names a prefix or the base
    model. Absent `stop`: only end-of-text stops (not a newline). Types are strict, as for completions."""

    model_config = ConfigDict(extra="forbid", strict=True)  # an unknown field is a 400, never ignored

    model: str = Field(..., max_length=256)
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)
    max_tokens: Optional[int] = Field(None, ge=1, description="default: the server's max_tokens limit")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 or absent: greedy")
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1, description="extension (0, -1: off)")
    n: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1], description="int64")
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    user: Optional[str] = Field(None, description=USER)
    ignore_eos: bool = Field(False, description="extension: keep decoding past end-of-text")
    # refused when given (never silently ignored)
    tools: Optional[Any] = None
    tool_choice: Optional[Any] = None
    functions: Optional[Any] = None
    function_call: Optional[Any] = None
    logit_bias: Optional[Any] = None
    response_format: Optional[Any] = None
