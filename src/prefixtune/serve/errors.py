"""The server's errors: one exception, one response shape (OpenAI's), one place that installs the handlers.

Every refusal, wherever it is decided (the routes, the store, the decoding queue), raises a
`ServeError`; every error leaves the server as `{"error": {...}}` with a status code.
"""
from __future__ import annotations

import logging

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .connection import BodyError, ClientDisconnect

log = logging.getLogger("prefixtune.serve")


class ServeError(Exception):
    """A refused request; `status` is the HTTP status to answer with, `code` OpenAI's error code."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


class QueueFull(ServeError):
    """The queue is full for this tenant: over `limit`, and either over its fair `share` (`own` rows waiting, the
    queue divided among `tenants`) or over twice `limit`, the bound on all tenants within their shares."""

    def __init__(self, depth: int, rows: int, limit: int, own: int = 0, share: int = 0, tenants: int = 1):
        why = f"your rows waiting ({own}) and this request's would pass your fair share of the queue, {share} rows " \
              f"({limit} shared by {tenants} tenant(s) with rows waiting)" if own + rows > share else \
              f"the tenants within their fair shares may take it to at most {2 * limit}"
        super().__init__(429, "queue_full", f"server busy: {depth} engine rows are waiting (at most {limit}) and this "
                                            f"request adds {rows} (prompts x max(n, num_beams)); {why}; retry later")


class ShuttingDown(ServeError):
    def __init__(self):
        super().__init__(503, "unavailable", "server is not accepting work (decoding worker stopped)")


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


def install_handlers(app):
    """Errors always in OpenAI's shape, always with a status code, never a dead server."""

    @app.exception_handler(ServeError)
    async def _refused(request, e: ServeError):
        return error_response(e.status, e.message, e.code, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        parts = []
        for err in e.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ())[1:]) or "body"
            if err.get("type") == "extra_forbidden":
                parts.append(f"unknown parameter {where!r} (not supported by this server)")
            else:
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
