"""`POST /v1/chat/completions`: OpenAI's chat API over the same rows, scheduler and limits as completions.

The messages go through the tokenizer's chat template (`add_generation_prompt=True`), their contents
tokenized as text (user_text.py: a spelled-out `<|im_end|>` is not the special token), exactly as
training on chat rows tokenizes the context of an assistant turn (data/chat.py), and the ids
are fed as they are: no prefix source template, though a prefix named by `model` still comes
first in the cache. Without `stop`, only end-of-text ends a reply (a chat reply spans lines).
"""
from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..data.chat import chat_prompt_ids

from .completions import Completions, Finisher, Stops, choice_jobs, decoding_controls, sse, sse_stream, wants_usage
from .errors import ServeError
from .logprobs import chat_logprobs
from .rows import Flight
from .schemas import ChatCompletionRequest

REFUSED = ("tools", "tool_choice", "functions", "function_call", "logit_bias")


class ChatCompletions:
    def __init__(self, completions: Completions):
        self.c = completions
        self.tokenizer, self.settings = completions.tokenizer, completions.settings

    def _prompt_ids(self, req: ChatCompletionRequest) -> list[int]:
        tokenizer = self.tokenizer
        if not getattr(tokenizer, "chat_template", None) or not hasattr(tokenizer, "apply_chat_template"):
            raise ServeError(400, "no_chat_template", "this server's tokenizer has no chat template: use "
                                                      "/v1/completions with a plain prompt")
        messages = [("system" if m.role == "developer" else m.role, m.content) for m in req.messages]
        try:  # the tokens training put before an assistant turn (data/chat.py); contents are user text
            return chat_prompt_ids(tokenizer, messages)
        except Exception as e:  # the template's own checks (roles must alternate, ...) raise here
            raise ServeError(400, "invalid_messages", f"the chat template refused the messages: {e}",
                             "messages") from None

    def _check(self, req: ChatCompletionRequest):
        for name in REFUSED:
            if getattr(req, name) is not None:
                raise ServeError(400, "unsupported", f"{name} is not supported", name)
        if req.response_format not in (None, {"type": "text"}):
            raise ServeError(400, "unsupported", "response_format other than text is not supported", "response_format")
        if sum(len(m.content) for m in req.messages) > self.settings.max_prompt_chars:
            raise ServeError(400, "invalid_messages", f"the messages hold more than {self.settings.max_prompt_chars} "
                                                      "characters", "messages")
        if req.top_logprobs is not None and not req.logprobs:
            raise ServeError(400, "invalid_request", "top_logprobs needs logprobs: true", "top_logprobs")
        wants_usage(req)

    async def __call__(self, req: ChatCompletionRequest, request: Request, tenant: str):
        settings = self.settings
        self._check(req)
        n, controls = decoding_controls(req, (req.top_logprobs or 0) if req.logprobs else None)
        if n > settings.max_prompts_per_request:
            raise ServeError(400, "invalid_n", f"n must be <= {settings.max_prompts_per_request}", "n")
        max_tokens = req.max_completion_tokens or req.max_tokens or settings.max_tokens_limit
        if max_tokens > settings.max_tokens_limit:
            raise ServeError(400, "invalid_max_tokens", f"max_tokens must be <= {settings.max_tokens_limit}",
                             "max_tokens")
        stops = Stops.of([] if req.stop is None else req.stop, max_tokens)
        bank_id = self.c.resolver(tenant)(req.model)
        ids = await run_in_threadpool(self._prompt_ids, req)  # 32K characters of template and tokens: off the loop
        jobs = choice_jobs(bank_id, [ids], n, controls, max_new_tokens=max_tokens, stop_at_newline=stops.at_newline,
                           raw=True, ignore_eos=req.ignore_eos, timeout_s=settings.request_timeout_s,
                           stop_strings=tuple(stops.strings), tenant=tenant)
        finishers = [Finisher(self.tokenizer, stops) for _ in jobs]
        flight = Flight(jobs, finishers, self.c.batcher, self.c.metrics, settings.request_timeout_s, req.stream, n)
        results = await flight.start(request)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            flight.done()
            return self._answer(req, results, flight, cid, created)
        return StreamingResponse(self._stream(req, flight, cid, created), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _answer(self, req, results, flight: Flight, cid, created) -> dict:
        choices = []
        for k, (result, fin) in enumerate(zip(results, flight.finishers)):
            fin.tokens = result.tokens
            text = fin.delta(final=True)
            logprobs = None
            if req.logprobs:
                items = zip(result.tokens, result.logprobs or [], result.top_logprobs or [])
                logprobs = {"content": chat_logprobs(self.tokenizer, items)}
            choices.append({"index": k, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                            "finish_reason": fin.finish_reason()})
        return {"id": cid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": choices, "usage": flight.usage()}

    def _stream(self, req, flight: Flight, cid, created):
        def chunk(index, delta, reason=None, logprobs=None):
            return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]})

        def chunk_of(piece):
            logprobs = {"content": chat_logprobs(self.tokenizer, piece.tokens)} if req.logprobs else None
            return chunk(piece.index, {"content": piece.text} if piece.text else {}, piece.finish_reason, logprobs)

        def usage_chunk(usage):
            return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                        "choices": [], "usage": usage})

        # OpenAI's first chunk of a choice: the role
        head = [chunk(k, {"role": "assistant", "content": ""}) for k in range(len(flight.jobs))]
        return sse_stream(flight, head, chunk_of,
                          usage_chunk if wants_usage(req) else None)
