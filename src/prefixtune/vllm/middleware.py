"""The OpenAI front end of `prefixtune serve --engine vllm`: an ASGI middleware inside vLLM's own server.

`vllm serve ... --middleware prefixtune.vllm.middleware.PrefixtuneMiddleware` (the launcher passes it,
with its settings as JSON in $PREFIXTUNE_VLLM_CONFIG). It gives vLLM's server prefixtune's tenants and
prefix store and turns `model` = prefix name into what the connector serves:

* every `/v1/*` call needs an API key (tenants and keys as `prefixtune serve`: $PREFIXTUNE_API_KEYS,
  --keys-file); /health, /ping, /version and /metrics stay public; every other path of vLLM's server
  (tokenizer, admin, LoRA loading, cache reset, ...) answers 404;
* `PUT/GET/DELETE /v1/prefixes/{name}` and `GET /v1/prefixes`: the same store as `prefixtune serve`
  (`STORE/<tenant-hash>/<name>.safetensors`, validated against the base model, quotas, atomic writes);
* `GET /v1/models`: the base model and the caller's prefixes;
* `POST /v1/completions` with `model` = one of the caller's prefixes: each prompt (the source) goes
  through the prefix's training template (`"raw": true` skips it), is tokenized and gets P placeholder
  tokens in front; the request gets the prefix's cache salt and kv_transfer_params, and `model` becomes
  the base model. As with `prefixtune serve`, decoding is greedy unless `temperature` is given, and
  with no `stop` it stops at a newline;
* a client's own `kv_transfer_params` and `cache_salt` are dropped (a tenant cannot name another's
  prefix, nor probe another's cached blocks: each tenant's requests carry its own salt).

Everything else (sampling parameters, streaming, usage) is vLLM's own.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from .. import user_text
from .protocol import PLACEHOLDER_TOKEN_ID, PrefixRef, prompt_ids, template_of, tenant_salt

log = logging.getLogger("prefixtune.vllm")
CONFIG_ENV = "PREFIXTUNE_VLLM_CONFIG"
PUBLIC = {"/health", "/ping", "/version", "/metrics"}
_PREFIX_ROUTE = re.compile(r"^/v1/prefixes(?:/([^/]*))?$")
_MODEL_ROUTE = re.compile(r"^/v1/models(?:/(.+))?$")


@dataclass
class _Meta:
    prefix_len: int
    sha256: str
    template: str


class _MetaBank:
    """What PrefixStore needs from a PrefixBank, without a model: the spec, and what each prefix is."""

    def __init__(self, spec):
        self.spec = spec
        self._meta: dict[str, _Meta] = {}
        self._lock = threading.Lock()

    def add(self, bank_id: str, prefix, loader=None):
        with self._lock:
            self._meta[bank_id] = _Meta(prefix.prefix_len, prefix.metadata.get("sha256", ""),
                                        template_of(prefix.metadata))
        return prefix

    def register(self, bank_id: str, loader):
        """A stored prefix at start: read now (what is kept is small); one that fails validation (the
        store logs why) is left out, so requests for it get 404."""
        try:
            self.add(bank_id, loader())
        except Exception:
            pass

    def prefetch(self, bank_id: str):
        pass  # everything is resident

    def remove(self, bank_id: str):
        with self._lock:
            if self._meta.pop(bank_id, None) is None:
                raise KeyError(bank_id)

    def get(self, bank_id: str) -> _Meta | None:
        with self._lock:
            return self._meta.get(bank_id)


class _Reply(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


class Frontend:
    """The state behind the middleware: keys, the store, the tokenizer. Built once per server process."""

    def __init__(self, config: dict):
        from transformers import AutoConfig, AutoTokenizer

        from ..serve.settings import ServeSettings
        from ..serve.store import PrefixStore
        from ..serve.tenants import ENV_VAR, KeyRing
        from .protocol import spec_of_config

        self.served = config["served_model_name"]
        self.placeholder = int(config.get("placeholder_token_id", PLACEHOLDER_TOKEN_ID))
        self.max_source_len = int(config.get("max_source_len", 512))
        self.keys = KeyRing.load(config.get("keys_file"))
        if not len(self.keys):
            raise ValueError(f"no API keys: set ${ENV_VAR}='key:tenant,...' or pass --keys-file")
        self.settings = ServeSettings(store_dir=Path(config["store"]), model_name=self.served,
                                      **config.get("limits", {}))
        self.tokenizer = AutoTokenizer.from_pretrained(config["model_dir"])
        self.bank = _MetaBank(spec_of_config(AutoConfig.from_pretrained(config["model_dir"])))
        self.store = PrefixStore(self.bank, self.settings, self.keys.tenants())

    # -- requests --------------------------------------------------------------------------------
    def tenant(self, headers: dict) -> str:
        scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            key = headers.get(b"x-api-key", b"").decode("latin-1")
        if not key.strip():
            raise _Reply(401, "missing API key: send 'Authorization: Bearer KEY'", "missing_api_key")
        tenant = self.keys.authenticate(key.strip())
        if tenant is None:
            raise _Reply(401, "invalid API key", "invalid_api_key")
        return tenant

    def rewrite(self, path: str, body: dict, tenant: str) -> dict:
        """The JSON body vLLM gets for a caller's POST to `path`."""
        from ..serve.tenants import tenant_dir_name

        for field in ("kv_transfer_params", "cache_salt"):
            body.pop(field, None)
        body["cache_salt"] = tenant_salt(tenant_dir_name(tenant))
        if path == "/v1/completions" and body.get("temperature") is None:
            body["temperature"] = 0  # greedy unless asked otherwise, as `prefixtune serve` (vLLM's default is 1)
        model = body.get("model", self.served)
        if model in (None, self.served):
            body["model"] = self.served
            return body
        from ..serve.errors import ServeError

        try:
            bank_id = self.store.resolve(tenant, model) if isinstance(model, str) else None
        except ServeError as e:  # a stored prefix whose file fails validation
            raise _Reply(e.status, e.message, e.code, "model") from None
        meta = self.bank.get(bank_id) if bank_id else None
        if meta is None:
            raise _Reply(404, f"the model {model!r} does not exist", "model_not_found", "model")
        if path != "/v1/completions":
            raise _Reply(400, "prefixes are served through /v1/completions", "unsupported", "model")
        for field in ("echo", "prompt_logprobs", "prompt_embeds"):
            if body.get(field):
                raise _Reply(400, f"{field} is not supported with a prefix", "unsupported", field)
        prompts = body.get("prompt")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise _Reply(400, "prompt must be a string or a list of strings (the source texts)", "invalid_prompt",
                         "prompt")
        raw = bool(body.pop("raw", False))
        ids = []
        for text in prompts:
            if raw:  # user text as text, as `prefixtune serve` (bank.encode): a spelled <|im_end|> is no control token
                source = user_text.encode(self.tokenizer, lambda guard, text=text: guard(text))[-self.max_source_len:]
            else:
                from ..data.collate import source_ids

                source = source_ids(self.tokenizer, "decoder", text, meta.template, self.max_source_len)
            if not source:
                raise _Reply(400, "a prompt has no tokens", "invalid_prompt", "prompt")
            ids.append(prompt_ids(source, meta.prefix_len, self.placeholder))
        ref = PrefixRef(bank_id, meta.prefix_len, meta.sha256)
        body.update(model=self.served, prompt=ids, cache_salt=ref.salt, kv_transfer_params=ref.params())
        if body.get("stop") is None:
            body["stop"] = ["\n"]  # prefixtune's default: one line per source
        return body

    def models(self, tenant: str, model: str | None) -> dict:
        base = {"id": self.served, "object": "model", "owned_by": "prefixtune", "root": self.served, "parent": None}
        cards = [base] + [{"id": i.name, "object": "model", "created": i.created, "owned_by": tenant,
                           "root": self.served, "parent": self.served, "prefix_len": i.prefix_len}
                          for i in self.store.list(tenant)]
        if model is None:
            return {"object": "list", "data": cards}
        for card in cards:
            if card["id"] == model:
                return card
        raise _Reply(404, f"the model {model!r} does not exist", "model_not_found")

    def prefixes(self, method: str, name: str | None, tenant: str, body: bytes, headers: dict) -> tuple[int, dict]:
        from ..serve.errors import ServeError

        try:
            if name is None:
                if method != "GET":
                    raise _Reply(405, "method not allowed", "method_not_allowed")
                return 200, {"object": "list", "data": [i.as_dict() for i in self.store.list(tenant)]}
            if method == "PUT":
                if not body:
                    raise _Reply(400, "empty upload: send the .safetensors file as the request body", "empty_upload")
                overwrite = headers.get(b"if-none-match", b"").strip() != b"*"
                info, created = self.store.put(tenant, name, body, overwrite)
                return (201 if created else 200), info.as_dict()
            if method == "GET":
                return 200, self.store.get(tenant, name).as_dict()
            if method == "DELETE":
                self.store.delete(tenant, name)
                return 200, {"id": name, "object": "prefix", "deleted": True}
            raise _Reply(405, "method not allowed", "method_not_allowed")
        except ServeError as e:
            raise _Reply(e.status, e.message, e.code) from None


_frontend: Frontend | None = None
_frontend_lock = threading.Lock()


def frontend() -> Frontend:
    global _frontend
    with _frontend_lock:
        if _frontend is None:
            raw = os.environ.get(CONFIG_ENV)
            if not raw:
                raise RuntimeError(f"${CONFIG_ENV} is not set: start the server with `prefixtune serve --engine vllm`")
            _frontend = Frontend(json.loads(raw))
        return _frontend


async def _json(send, status: int, payload: dict, headers: list | None = None):
    data = json.dumps(payload, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


async def _error(send, e: _Reply):
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}.get(
        e.status, "invalid_request_error" if e.status < 500 else "server_error")
    headers = [(b"www-authenticate", b"Bearer")] if e.status == 401 else None
    await _json(send, e.status, {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}},
                headers)


class PrefixtuneMiddleware:
    """Pure ASGI middleware (vLLM adds it with `app.add_middleware(PrefixtuneMiddleware)`)."""

    def __init__(self, app, config: dict | None = None):
        self.app = app
        # built when the server starts, so a bad store or keys fail then, not at the first request
        self.front = Frontend(config) if config is not None else frontend()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if path in PUBLIC:
            return await self.app(scope, receive, send)
        try:
            if not path.startswith("/v1/"):
                raise _Reply(404, "not found", "not_found")
            headers = dict(scope.get("headers") or [])
            tenant = self.front.tenant(headers)
            prefix_route = _PREFIX_ROUTE.match(path)
            limit = self.front.settings.max_upload_bytes if prefix_route else self.front.settings.max_json_bytes
            body = await _read(receive, limit)
            if prefix_route:
                from starlette.concurrency import run_in_threadpool

                status, payload = await run_in_threadpool(self.front.prefixes, method, prefix_route.group(1), tenant,
                                                          body, headers)
                return await _json(send, status, payload)
            model_route = _MODEL_ROUTE.match(path)
            if model_route and method == "GET":
                return await _json(send, 200, self.front.models(tenant, model_route.group(1)))
            if method == "POST":
                try:
                    parsed = json.loads(body or b"{}")
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise _Reply(400, "the body is not valid JSON", "invalid_json") from None
                if not isinstance(parsed, dict):
                    raise _Reply(400, "the body must be a JSON object", "invalid_json")
                body = json.dumps(self.front.rewrite(path, parsed, tenant)).encode()
        except _Reply as e:
            return await _error(send, e)
        scope = dict(scope, headers=[(k, v) for k, v in scope.get("headers") or [] if k != b"content-length"]
                     + [(b"content-length", str(len(body)).encode())])
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the client's disconnect, as Starlette expects

        return await self.app(scope, replay, send)


async def _read(receive, limit: int) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Reply(400, "client disconnected", "disconnected")
        body += message.get("body", b"")
        if len(body) > limit:
            raise _Reply(413, f"request body over {limit} bytes", "body_too_large")
        if not message.get("more_body"):
            return bytes(body)
