"""Request bodies (OpenAI's completions API, plus prefixtune's own extensions)."""
from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class CompletionRequest(BaseModel):
    """`POST /v1/completions`, as OpenAI defines it. `model` names one of the caller's prefixes, or the
    base model (no prefix). Decoding is greedy (or beam search with `num_beams`); fields that ask for
    sampling are refused with a 400 rather than silently ignored. Types are strict: `"max_tokens": true`
    or `"stream": "yes"` is a 400, not 1 and True (an int is still taken where a float is expected)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(..., max_length=256, description="a prefix name of the caller, or the base model name")
    prompt: Union[str, list[str]] = Field(..., description="one source text, or a list of them")
    max_tokens: Optional[int] = Field(None, ge=1, description="default 16 (as OpenAI)")
    temperature: Optional[float] = Field(None, description="0 or absent: decoding is greedy")
    top_p: Optional[float] = Field(None, description="1 or absent")
    n: Optional[int] = Field(None, description="1 or absent")
    best_of: Optional[int] = Field(None, description="1 or absent")
    stop: Optional[Union[str, list[str]]] = Field(
        None, description='absent: stop at a newline (prefixtune\'s default); "\\n" in the list: the same; '
                          "other strings cut the text at their first occurrence; [] : only end-of-text stops")
    stream: bool = False
    stream_options: Optional[dict] = None
    echo: bool = False
    logprobs: Optional[int] = None
    suffix: Optional[str] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    seed: Optional[int] = None
    user: Optional[str] = None
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
