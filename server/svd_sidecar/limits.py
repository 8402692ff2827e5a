"""Request body limits, enforced as the bytes arrive (chunked uploads included).

A handler that buffers a body (``request.body()``, ``request.form()``) would otherwise hold all
of it, in memory or in a spooled temp file, before any size check could run: a 300 MB POST to
the open OpenAI front took the sidecar from 304 MB to 1.5 GB. This ASGI middleware counts the
bytes of each ``http.request`` message and raises ``ApiError(413)`` inside the handler's read the
moment the route's limit is passed, and refuses a declared ``Content-Length`` over it at the
first read, so nothing past the limit is ever buffered.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError

__all__ = ["BodyLimit"]


class BodyLimit:
    """ASGI middleware: at most ``limit_for(path)`` body bytes per request, else 413."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > limit
        received = 0

        def refuse() -> ApiError:
            return ApiError(413, "size", f"request body is over the {limit}-byte limit")

        async def limited() -> Message:
            nonlocal received
            if too_big:
                raise refuse()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise refuse()
            return message

        await self.app(scope, limited, send)
