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
  POST   /v1/chat/completions  OpenAI chat completions (the tokenizer's chat template); `model` as above
  GET    /health               liveness of the server and its decoding worker
  GET    /metrics              Prometheus text format
The OpenAPI page is at /docs.
"""
from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from ..bank import PrefixBank
from ..models import model_name
from .chat import ChatCompletions
from .completions import Completions
from .connection import guarded_receive
from .engine_worker import EngineWorker
from .errors import ServeError, error_response, install_handlers
from .prometheus import Metrics
from .schemas import ChatCompletionRequest, CompletionRequest
from .settings import ServeSettings
from .store import PrefixStore, check_name
from .tenants import KeyRing

log = logging.getLogger("prefixtune.serve")
UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


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
            raise ServeError(401, "missing_api_key", "missing API key: send 'Authorization: Bearer KEY'")
        found = keys.authenticate(key.strip())
        if found is None:
            raise ServeError(401, "invalid_api_key", "invalid API key")
        return found

    return tenant


def residency_metrics(bank: PrefixBank, store: PrefixStore) -> dict:
    """The prefix cache's counters and sizes, read from the bank when /metrics is rendered."""
    return {"prefixtune_prefix_cache_hits_total": lambda: bank.hits,
            "prefixtune_prefix_cache_misses_total": lambda: bank.misses,
            "prefixtune_prefix_cache_evictions_total": lambda: bank.evictions,
            "prefixtune_prefixes_resident": bank.resident_count,
            "prefixtune_prefixes_resident_bytes": bank.resident_bytes,
            "prefixtune_prefixes_stored": store.count}


def create_app(model, tokenizer, settings: ServeSettings, keys: KeyRing, bank: PrefixBank | None = None) -> FastAPI:
    """The server for one frozen model. `keys` maps API keys to tenants; `settings` holds every limit."""
    bank = bank or PrefixBank(model, tokenizer, max_resident=settings.max_resident_prefixes,
                              max_resident_bytes=settings.max_resident_bytes)
    base_name = settings.model_name or model_name(model)
    metrics = Metrics()
    store = PrefixStore(bank, settings, keys.tenants(), reserved=(base_name,), model_names=(base_name, model_name(model)))
    batcher = EngineWorker(bank, settings, metrics)  # the one decoding worker: continuous batching
    metrics.gauges.update({"prefixtune_queue_depth": batcher.depth, "prefixtune_prefixes": store.count,
                           "prefixtune_worker_alive": lambda: int(batcher.alive()),
                           "prefixtune_worker_heartbeat_age_seconds": batcher.heartbeat_age,
                           "prefixtune_worker_stall_seconds": batcher.stall_s,
                           "prefixtune_worker_longest_stall_seconds": lambda: batcher.longest_stall_s})
    metrics.gauges.update(residency_metrics(bank, store))
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

    install_handlers(app)
    complete = Completions(tokenizer, settings, store, batcher, metrics, base_name)
    chat = ChatCompletions(complete)

    # -- prefixes ---------------------------------------------------------------------------
    @app.put("/v1/prefixes/{name}", status_code=201, openapi_extra=UPLOAD_BODY, tags=["prefixes"],
             summary="Upload a prefix (.safetensors export) under NAME; If-None-Match: * refuses to overwrite")
    async def upload_prefix(name: str, request: Request, tenant: str = Depends(tenant_of)):
        check_name(name)
        limit = settings.max_upload_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise ServeError(413, "upload_too_large", f"upload exceeds the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ServeError(413, "upload_too_large", f"upload exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)  # the one copy the store parses (a bytearray needs another: safetensors takes bytes)
        del chunks
        if not body:
            raise ServeError(400, "empty_upload", "empty upload: send the .safetensors file as the request body")
        overwrite = request.headers.get("if-none-match", "").strip() != "*"
        info, created = await run_in_threadpool(store.put, tenant, name, body, overwrite)
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

    # `path`: a base model's name is a hub id or a local path ("HuggingFaceTB/SmolLM2-135M"), slashes and all. No
    # other route lies under /v1/models/ for it to shadow.
    @app.get("/v1/models/{model:path}", tags=["openai"], summary="The base model or one of the caller's prefixes")
    async def get_model(model: str, tenant: str = Depends(tenant_of)):
        if model == base_name:
            return base_card()
        try:
            return prefix_card(store.get(tenant, model), tenant)
        except ServeError:
            raise ServeError(404, "model_not_found", f"the model {model!r} does not exist") from None

    # -- completions (OpenAI) ---------------------------------------------------------------
    @app.post("/v1/completions", tags=["openai"], summary="OpenAI completions; `model` names a prefix")
    async def completions(req: CompletionRequest, request: Request, tenant: str = Depends(tenant_of)):
        return await complete(req, request, tenant)

    @app.post("/v1/chat/completions", tags=["openai"], summary="OpenAI chat completions; `model` names a prefix")
    async def chat_completions(req: ChatCompletionRequest, request: Request, tenant: str = Depends(tenant_of)):
        return await chat(req, request, tenant)

    # -- operations -------------------------------------------------------------------------
    @app.get("/health", tags=["operations"],
             summary="200 while the decoding worker runs and no row has waited over --worker-stall-s for a token")
    async def health():
        alive, age = batcher.alive(), batcher.heartbeat_age()
        stalled = batcher.stalled(settings.worker_stall_s) if alive else None
        body = {"status": "ok" if alive and not stalled else "unavailable", "model": base_name,
                "worker_alive": alive, "worker_heartbeat_age_s": round(age, 3),
                "stall_s": round(batcher.stall_s(), 3), "queue_depth": batcher.depth(), "prefixes": store.count()}
        if not alive:
            body["reason"] = "the decoding worker is not running"
        elif stalled:
            body["reason"] = stalled
        return JSONResponse(body, status_code=200 if alive and not stalled else 503)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
