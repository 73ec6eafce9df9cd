"""The client's side of a request: noticing when the client has gone away (so that its rows stop
using the decoding worker)."""
from __future__ import annotations

import asyncio

from starlette.requests import ClientDisconnect

__all__ = ["ClientDisconnect", "unless_disconnected"]


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
        work.cancel()
        raise
    finally:
        gone.cancel()
    if work in done:
        return work.result()
    work.cancel()
    if gone in done:
        raise ClientDisconnect()
    raise asyncio.TimeoutError
