"""The client's side of a request: its body, read under a size cap and a time limit, and noticing
when the client has gone away (so that its rows stop using the decoding worker)."""
from __future__ import annotations

import asyncio
import time

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

__all__ = ["BodyTooLarge", "BodyTimeout", "ClientDisconnect", "guarded_receive", "unless_disconnected"]


class BodyError(HTTPException):
    """Raised from `receive` while the app reads a body. An HTTPException, so FastAPI's body parsing
    passes it on unchanged (anything else there becomes a 400 "error parsing the body")."""

    code = "invalid_body"

    def __init__(self, status: int, message: str):
        # the body was not read to its end: the connection cannot carry another request
        super().__init__(status, message, headers={"Connection": "close"})


class BodyTooLarge(BodyError):
    code = "body_too_large"

    def __init__(self, limit: int):
        super().__init__(413, f"request body over {limit} bytes")


class BodyTimeout(BodyError):
    code = "body_timeout"

    def __init__(self, seconds: float):
        super().__init__(408, f"request body not received within {seconds:g} s")


def guarded_receive(receive, timeout_s: float, max_bytes: int | None):
    """`receive` that refuses a body over `max_bytes` (None: no cap here) or one that takes longer
    than `timeout_s` to arrive (slowloris). Once the body is complete it is `receive` unchanged:
    waiting then for `http.disconnect` is how a handler notices that its client left."""
    deadline = time.monotonic() + timeout_s
    received, complete = 0, False

    async def receive_guarded():
        nonlocal received, complete
        if complete:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise BodyTimeout(timeout_s) from None
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            complete = not message.get("more_body", False)
            if max_bytes is not None and received > max_bytes:
                raise BodyTooLarge(max_bytes)
        return message

    return receive_guarded


async def _disconnected(receive):
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(awaitable, receive, timeout_s: float):
    """The result of `awaitable`, unless the client disconnects first (ClientDisconnect) or
    `timeout_s` passes (asyncio.TimeoutError); `awaitable` is cancelled in both cases."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({work, gone}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler was cancelled (shutdown): so is its work
        _cancel(work)
        raise
    finally:
        gone.cancel()
    if work in done:
        return work.result()
    _cancel(work)
    if gone in done:
        raise ClientDisconnect()
    raise asyncio.TimeoutError


def _cancel(work: asyncio.Future):
    work.cancel()
    # a cancelled gather() ends with CancelledError as its *exception*: read it, or asyncio logs an ERROR
    work.add_done_callback(lambda f: f.cancelled() or f.exception())
