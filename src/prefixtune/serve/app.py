"""The FastAPI app: OpenAI-compatible completions over many tenants' prefixes, one frozen model.

Endpoints (all under an API key, `Authorization: Bearer KEY`, except health and metrics):
  PUT    /v1/prefixes/{name}   upload a `.safetensors` export, or a zip/tar of a prefix folder (ours or a PEFT
                               adapter's two files), as the raw body; validated, stored atomically
  GET    /v1/prefixes          the caller's prefixes
  GET    /v1/prefixes/{name}   one of them
  DELETE /v1/prefixes/{name}   delete it
  GET    /v1/models            the base model and the caller's prefixes, as OpenAI models (vLLM's LoRA convention)
  GET    /v1/models/{model}    one of them
  POST   /v1/completions       OpenAI completions; `model` names a prefix (or the base model); streaming
  GET    /health               liveness of the server and its decoding worker
  GET    /metrics              Prometheus text format
The OpenAPI page is at /docs.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..bank import PrefixBank
from ..models import model_name
from .batcher import Batcher, Job, JobError, Result
from .connection import BodyError, ClientDisconnect, guarded_receive, unless_disconnected
from .metrics import Metrics
from .schemas import CompletionRequest
from .settings import ServeSettings
from .store import PrefixStore, StoreError, check_name
from .tenants import KeyRing

log = logging.getLogger("prefixtune.serve")
UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_response(status: int, message: str, code: str | None, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
            429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    headers = dict(headers or {})
    if status in (429, 503):
        headers["Retry-After"] = "1"
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


class _Guard:
    """Pure ASGI middleware: caps JSON bodies (uploads have their own cap), limits the time to
    receive any body, and counts requests."""

    def __init__(self, app, metrics: Metrics, max_json_bytes: int, body_timeout_s: float):
        self.app, self.metrics, self.max_json, self.body_timeout = app, metrics, max_json_bytes, body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        sent = False

        async def send_counted(message):
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status, sent = message["status"], True
            await send(message)

        is_upload = scope["path"].startswith("/v1/prefixes/")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if not is_upload and length is not None and (not length.isdigit() or int(length) > self.max_json):
            response = error_response(413, f"request body over {self.max_json} bytes", "body_too_large")
            await response(scope, receive, send_counted)
            self.metrics.inc("prefixtune_requests_total", route="body_too_large", status=413)
            return
        # a chunked body has no length to check first: it is cut off (413) as it grows
        receive_guarded = guarded_receive(receive, self.body_timeout, None if is_upload else self.max_json)
        try:
            await self.app(scope, receive_guarded, send_counted)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.inc("prefixtune_requests_total", route=route, status=status if sent else 500)


def _tenant_dependency(keys: KeyRing):
    def tenant(request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            key = request.headers.get("x-api-key", "")
        if not key.strip():
            raise APIError(401, "missing API key: send 'Authorization: Bearer KEY'", "missing_api_key")
        found = keys.authenticate(key.strip())
        if found is None:
            raise APIError(401, "invalid API key", "invalid_api_key")
        return found

    return tenant


class _Finisher:
    """Token ids -> text for one prompt, as it grows (streaming) and at the end; applies stop strings.

    While streaming, text that could still turn into a stop string, or that ends inside a multi-byte
    character, is held back; so the streamed pieces always add up to the non-streamed text.
    """

    def __init__(self, tokenizer, max_tokens: int, stop_strings: list[str]):
        self.tokenizer, self.max_tokens, self.stops = tokenizer, max_tokens, stop_strings
        self.hold = max((len(s) for s in stop_strings), default=1) - 1
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False

    def text(self, final: bool) -> tuple[str, bool]:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.stops if s in text]
        if cuts:
            return text[: min(cuts)], True
        if not final:
            text = text.rstrip("\ufffd")
            text = text[: len(text) - self.hold] if self.hold else text
        return text, False

    def delta(self, final: bool = False) -> str:
        text, self.stopped = self.text(final)
        if not text.startswith(self.sent):  # a tokenizer that rewrites earlier text: send nothing more
            return ""
        out, self.sent = text[len(self.sent):], text
        return out

    def finish_reason(self) -> str:
        return "stop" if self.stopped or len(self.tokens) < self.max_tokens else "length"


def create_app(model, tokenizer, settings: ServeSettings, keys: KeyRing, bank: PrefixBank | None = None) -> FastAPI:
    """The server for one frozen model. `keys` maps API keys to tenants; `settings` holds every limit."""
    bank = bank or PrefixBank(model, tokenizer)
    base_name = settings.model_name or model_name(model)
    metrics = Metrics()
    store = PrefixStore(bank, settings, keys.tenants(), reserved=(base_name,))
    batcher = Batcher(bank, settings, metrics)
    metrics.gauges = {"prefixtune_queue_depth": batcher.depth, "prefixtune_prefixes": store.count,
                      "prefixtune_worker_alive": lambda: int(batcher.alive()),
                      "prefixtune_worker_heartbeat_age_seconds": batcher.heartbeat_age,
                      "prefixtune_worker_longest_stall_seconds": lambda: batcher.longest_stall_s}
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        log.info("serving %s for %d tenants, %d prefixes", base_name, len(keys.tenants()), store.count())
        try:
            yield
        finally:
            await run_in_threadpool(batcher.stop)

    app = FastAPI(title="prefixtune", lifespan=lifespan, version="1", redirect_slashes=False,
                  description="Many tenants' prefixes over one frozen model, decoded in mixed batches. "
                              "OpenAI-compatible: `model` names a prefix.")
    app.state.bank, app.state.store, app.state.batcher = bank, store, batcher
    app.state.metrics, app.state.settings, app.state.base_model = metrics, settings, base_name
    app.add_middleware(_Guard, metrics=metrics, max_json_bytes=settings.max_json_bytes,
                       body_timeout_s=settings.body_timeout_s)
    tenant_of = _tenant_dependency(keys)

    # -- errors: always OpenAI's shape, always a status code, never a dead server ----------------
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e.status, e.message, e.code, e.param)

    @app.exception_handler(StoreError)
    async def _store_error(request, e: StoreError):
        return error_response(e.status, e.message, e.code)

    @app.exception_handler(JobError)
    async def _job_error(request, e: JobError):
        return error_response(e.status, e.message, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        parts = []
        for err in e.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ())[1:]) or "body"
            parts.append(f"{where}: {err.get('msg')}")
        return error_response(400, "invalid request: " + "; ".join(parts), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        code = e.code if isinstance(e, BodyError) else "not_found" if e.status_code == 404 else None
        return error_response(e.status_code, str(e.detail), code, headers=e.headers)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request, e: ClientDisconnect):  # nobody reads the answer; 499 (nginx's) counts it
        log.info("client disconnected: %s %s", request.method, request.url.path)
        return error_response(499, "client closed the request", "client_disconnected")

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal error ({type(e).__name__})", "internal_error")

    # -- prefixes ---------------------------------------------------------------------------
    @app.put("/v1/prefixes/{name}", status_code=201, openapi_extra=UPLOAD_BODY, tags=["prefixes"],
             summary="Upload a prefix (.safetensors export) under NAME; If-None-Match: * refuses to overwrite")
    async def upload_prefix(name: str, request: Request, tenant: str = Depends(tenant_of)):
        check_name(name)
        limit = settings.max_upload_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise StoreError(413, f"upload exceeds the limit of {limit} bytes", "upload_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise StoreError(413, f"upload exceeds the limit of {limit} bytes", "upload_too_large")
        if not body:
            raise StoreError(400, "empty upload: send the .safetensors file as the request body", "empty_upload")
        overwrite = request.headers.get("if-none-match", "").strip() != "*"
        info, created = await run_in_threadpool(store.put, tenant, name, bytes(body), overwrite)
        return JSONResponse(info.as_dict(), status_code=201 if created else 200)

    @app.get("/v1/prefixes", tags=["prefixes"], summary="The caller's prefixes")
    async def list_prefixes(tenant: str = Depends(tenant_of)):
        return {"object": "list", "data": [i.as_dict() for i in store.list(tenant)]}

    @app.get("/v1/prefixes/{name}", tags=["prefixes"], summary="One of the caller's prefixes")
    async def get_prefix(name: str, tenant: str = Depends(tenant_of)):
        return store.get(tenant, name).as_dict()

    @app.delete("/v1/prefixes/{name}", tags=["prefixes"], summary="Delete one of the caller's prefixes")
    async def delete_prefix(name: str, tenant: str = Depends(tenant_of)):
        await run_in_threadpool(store.delete, tenant, name)
        return {"id": name, "object": "prefix", "deleted": True}

    # -- models (OpenAI) --------------------------------------------------------------------
    def base_card() -> dict:
        return {"id": base_name, "object": "model", "created": started, "owned_by": "prefixtune",
                "root": base_name, "parent": None}

    def prefix_card(info, tenant) -> dict:
        return {"id": info.name, "object": "model", "created": info.created, "owned_by": tenant,
                "root": base_name, "parent": base_name, "prefix_len": info.prefix_len}

    @app.get("/v1/models", tags=["openai"], summary="The base model and the caller's prefixes")
    async def list_models(tenant: str = Depends(tenant_of)):
        return {"object": "list", "data": [base_card()] + [prefix_card(i, tenant) for i in store.list(tenant)]}

    @app.get("/v1/models/{model}", tags=["openai"], summary="The base model or one of the caller's prefixes")
    async def get_model(model: str, tenant: str = Depends(tenant_of)):
        if model == base_name:
            return base_card()
        try:
            return prefix_card(store.get(tenant, model), tenant)
        except StoreError:
            raise APIError(404, f"the model {model!r} does not exist", "model_not_found") from None

    # -- completions (OpenAI) ---------------------------------------------------------------
    def plan(req: CompletionRequest, tenant: str):
        if req.n not in (None, 1) or req.best_of not in (None, 1):
            raise APIError(400, "n and best_of must be 1: decoding is greedy, one completion per prompt "
                                "(use num_beams for beam search)", "unsupported", "n")
        if req.temperature not in (None, 0):
            raise APIError(400, "only greedy decoding is supported: use temperature 0 or leave it out",
                           "unsupported", "temperature")
        if req.top_p not in (None, 1):
            raise APIError(400, "top_p must be 1 (decoding is greedy)", "unsupported", "top_p")
        if req.logprobs is not None or req.suffix is not None:
            raise APIError(400, "logprobs and suffix are not supported", "unsupported")
        if req.presence_penalty not in (None, 0) or req.frequency_penalty not in (None, 0):
            raise APIError(400, "presence and frequency penalties are not supported", "unsupported")
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts or len(prompts) > settings.max_prompts_per_request:
            raise APIError(400, f"prompt must hold 1 to {settings.max_prompts_per_request} texts", "invalid_prompt",
                           "prompt")
        if any(len(p) > settings.max_prompt_chars for p in prompts):
            raise APIError(400, f"a prompt is longer than {settings.max_prompt_chars} characters", "invalid_prompt",
                           "prompt")
        max_tokens = req.max_tokens or settings.default_max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise APIError(400, f"max_tokens must be <= {settings.max_tokens_limit}", "invalid_max_tokens",
                           "max_tokens")
        stops = None if req.stop is None else [req.stop] if isinstance(req.stop, str) else list(req.stop)
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise APIError(400, "stop must be up to 4 non-empty strings", "invalid_stop", "stop")
        if (req.truncate_prompt_tokens or 0) > settings.max_prompt_tokens:
            raise APIError(400, f"truncate_prompt_tokens must be <= {settings.max_prompt_tokens} (the prompt limit)",
                           "invalid_truncate_prompt_tokens", "truncate_prompt_tokens")
        stop_at_newline = stops is None or "\n" in stops
        stop_strings = [s for s in stops or [] if s != "\n"]
        if req.model == base_name:
            bank_id = None
        else:
            bank_id = store.resolve(tenant, req.model)
            if bank_id is None:
                raise APIError(404, f"the model {req.model!r} does not exist", "model_not_found", "model")
        return bank_id, prompts, max_tokens, stop_at_newline, stop_strings

    def chunk(cid, created, model, index, text, reason):
        return {"id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]}

    @app.post("/v1/completions", tags=["openai"], summary="OpenAI completions; `model` names a prefix")
    async def completions(req: CompletionRequest, request: Request, tenant: str = Depends(tenant_of)):
        bank_id, prompts, max_tokens, stop_at_newline, stop_strings = plan(req, tenant)
        jobs = [Job(bank_id, text, max_tokens, req.num_beams, stop_at_newline, req.raw, req.ignore_eos,
                    req.no_repeat_ngram_size, req.repetition_penalty, timeout_s=settings.request_timeout_s,
                    truncate_to=req.truncate_prompt_tokens)
                for text in prompts]
        finishers = [_Finisher(tokenizer, max_tokens, stop_strings) for _ in prompts]
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        t0 = time.monotonic()
        events: asyncio.Queue | None = None
        if req.stream:
            loop, events = asyncio.get_running_loop(), asyncio.Queue()

            def post(item):
                try:
                    loop.call_soon_threadsafe(events.put_nowait, item)
                except RuntimeError:  # the loop is gone (shutdown): nobody listens
                    pass

            for i, job in enumerate(jobs):
                job.on_token = lambda token, i=i: post((i, token))
                job.future.add_done_callback(lambda _, i=i: post((i, None)))
        try:
            batcher.submit(jobs)
        except JobError as e:
            metrics.inc("prefixtune_rejected_total", reason=e.code)
            raise
        # Wait for the answer (a stream: its first event), unless the client leaves or time runs out; then its
        # rows are cancelled and leave the decoding batch at the next step.
        try:
            if req.stream:
                first = await unless_disconnected(events.get(), request.receive, settings.request_timeout_s)
                failed = jobs[first[0]].future
                if first[1] is None and not failed.cancelled() and failed.exception() is not None:
                    raise failed.exception()  # refused before decoding (a prompt too long, ...): a status code
            else:
                results: list[Result] = await unless_disconnected(
                    asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs)), request.receive,
                    settings.request_timeout_s)
        except asyncio.TimeoutError:
            for job in jobs:
                job.cancel()
            metrics.inc("prefixtune_rejected_total", reason="timeout")
            raise JobError(503, f"request timed out after {settings.request_timeout_s:g} s", "timeout") from None
        except BaseException:  # failed, client gone (499), or cancelled
            for job in jobs:
                job.cancel()  # no-op when done; frees the rows of the others
            raise
        if not req.stream:
            metrics.observe("prefixtune_request_seconds", time.monotonic() - t0)
            choices = []
            for i, (result, fin) in enumerate(zip(results, finishers)):
                fin.tokens = result.tokens
                text = fin.delta(final=True)
                choices.append({"index": i, "text": (prompts[i] if req.echo else "") + text, "logprobs": None,
                                "finish_reason": fin.finish_reason()})
            usage = {"prompt_tokens": sum(r.prompt_tokens for r in results),
                     "completion_tokens": sum(len(r.tokens) for r in results)}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            return {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                    "choices": choices, "usage": usage}

        include_usage = bool((req.stream_options or {}).get("include_usage"))

        async def stream():
            def sse(obj) -> str:
                return f"data: {json.dumps(obj)}\n\n"

            open_rows = set(range(len(jobs)))
            deadline = t0 + settings.request_timeout_s
            prompt_tokens = 0
            peeked = [first]
            try:
                if req.echo:
                    for i, text in enumerate(prompts):
                        yield sse(chunk(cid, created, req.model, i, text, None))
                while open_rows:
                    try:
                        i, token = peeked.pop() if peeked else await asyncio.wait_for(
                            events.get(), max(0.0, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        yield sse({"error": {"message": "request timed out", "type": "server_error",
                                             "code": "timeout"}})
                        return
                    if i not in open_rows:
                        continue
                    fin = finishers[i]
                    if token is not None:
                        fin.tokens.append(token)
                        text = fin.delta()
                        if text:
                            yield sse(chunk(cid, created, req.model, i, text, None))
                        if fin.stopped:
                            open_rows.discard(i)
                            jobs[i].cancel()
                            yield sse(chunk(cid, created, req.model, i, "", "stop"))
                        continue
                    future = jobs[i].future
                    open_rows.discard(i)
                    error = None if not future.done() or future.cancelled() else future.exception()
                    if future.cancelled() or error is not None:
                        e = error if isinstance(error, JobError) else JobError(500, "decoding failed")
                        yield sse({"error": {"message": e.message, "type": "server_error", "code": e.code}})
                        continue
                    result = future.result()
                    prompt_tokens += result.prompt_tokens
                    fin.tokens = result.tokens
                    yield sse(chunk(cid, created, req.model, i, fin.delta(final=True), fin.finish_reason()))
                metrics.observe("prefixtune_request_seconds", time.monotonic() - t0)
                if include_usage:
                    completion = sum(len(f.tokens) for f in finishers)
                    yield sse({"id": cid, "object": "text_completion", "created": created, "model": req.model,
                               "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                        "completion_tokens": completion,
                                                        "total_tokens": prompt_tokens + completion}})
                yield "data: [DONE]\n\n"
            finally:
                for job in jobs:
                    job.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- operations -------------------------------------------------------------------------
    @app.get("/health", tags=["operations"], summary="200 while the decoding worker runs and keeps stepping")
    async def health():
        alive, age = batcher.alive(), batcher.heartbeat_age()
        stalled = alive and batcher.pending() and age > settings.worker_stall_s
        body = {"status": "ok" if alive and not stalled else "unavailable", "model": base_name,
                "worker_alive": alive, "worker_heartbeat_age_s": round(age, 3), "queue_depth": batcher.depth(),
                "prefixes": store.count()}
        if not alive:
            body["reason"] = "the decoding worker is not running"
        elif stalled:
            body["reason"] = (f"the decoding worker has not finished a step for {age:.1f} s (limit "
                              f"{settings.worker_stall_s:g} s) while work is pending")
        return JSONResponse(body, status_code=200 if alive and not stalled else 503)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
