"""Request body limits, enforced as the bytes arrive (chunked uploads included): size and time.

A handler that buffers a body (``request.body()``, ``request.form()``) would otherwise hold all
of it, in memory or in a spooled temp file, before any size check could run: a 300 MB POST to
the open OpenAI front took the sidecar from 304 MB to 1.5 GB. This ASGI middleware counts the
bytes of each ``http.request`` message and raises ``ApiError(413)`` inside the handler's read the
moment the route's limit is passed, and refuses a declared ``Content-Length`` over it at the
first read, so nothing past the limit is ever buffered.

It also bounds the time a body may take: a client that declares more than it sends (or sends
one byte a minute) would otherwise hold a handler, before any check, auth included, could
answer. Past ``timeout`` seconds from the request's start, the read raises ``ApiError(408)``.
Only the body's reads are timed: once it is complete, a streamed answer may take as long as it
takes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError

__all__ = ["BodyLimit"]


class BodyLimit:
    """ASGI middleware: at most ``limit_for(path)`` body bytes per request, else 413; the whole
    body within ``timeout`` seconds, else 408."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int], timeout: float) -> None:
        self.app = app
        self.limit_for = limit_for
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > limit
        received = 0
        complete = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout

        def refuse() -> ApiError:
            return ApiError(413, "size", f"request body is over the {limit}-byte limit")

        async def limited() -> Message:
            nonlocal received, complete
            if complete:  # e.g. a streamed answer waiting for the client to leave
                return await receive()
            if too_big:
                raise refuse()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                raise ApiError(
                    408,
                    "body_timeout",
                    f"the request body did not arrive within {self.timeout:g} s",
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise refuse()
                complete = not message.get("more_body", False)
            else:
                complete = True  # http.disconnect
            return message

        await self.app(scope, limited, send)
