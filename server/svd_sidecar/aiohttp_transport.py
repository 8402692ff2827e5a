"""httpx's interface over aiohttp's connection pool and C HTTP parser: the front's hop to vLLM.

The sidecar talks to vLLM through ``httpx.AsyncClient`` (its tests swap the network for
``httpx.MockTransport``). httpx's own transport, httpcore, parses HTTP in pure Python (h11),
wraps every socket read in an anyio cancel scope, and scans its whole pool on every request:
relaying a token stream, that was most of the front's CPU per event. This transport hands the
I/O to aiohttp (``llhttp``, one buffered reader per connection) and keeps httpx's contract:

* a refused or unreachable vLLM raises ``httpx.ConnectError``, no connection in time
  ``httpx.ConnectTimeout``;
* no bytes for ``read`` seconds (headers, or mid-body: a stalled stream) ``httpx.ReadTimeout``;
* a connection that drops, or a malformed answer, ``httpx.ReadError`` /
  ``httpx.RemoteProtocolError``;

so ``upstream.forward`` maps them to 502 / 504 and mid-stream error events as before. The body
is passed on as it arrives (never re-chunked) and undecoded (the sidecar asks for identity).
Proxy variables (``HTTP_PROXY``) do not apply to this hop: vLLM is the front's neighbour.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import httpx

__all__ = ["AiohttpTransport"]

#: Request headers aiohttp writes itself from the URL and the body.
_OWN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One aiohttp session per transport (made on first use, in the running loop); no cap on
    connections: vLLM's scheduler is the backpressure, and a cap would queue the next stream
    behind the open ones. Idle connections are kept ``keepalive`` seconds for reuse."""

    def __init__(self, keepalive: float = 30.0) -> None:
        self.keepalive = keepalive
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=0, keepalive_timeout=self.keepalive, ttl_dns_cache=60
            )
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        seconds = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=seconds.get("pool"),
            sock_connect=seconds.get("connect"),
            sock_read=seconds.get("read"),
        )
        headers = [(k, v) for k, v in request.headers.multi_items() if k not in _OWN_HEADERS]
        body = await request.aread()
        try:
            resp = await self._client().request(
                request.method,
                str(request.url),
                headers=headers,
                data=body or None,
                allow_redirects=False,
                compress=False,
                timeout=timeout,
            )
        except _FAULTS as e:
            raise _httpx_error(e, request, "connecting") from e
        return httpx.Response(
            resp.status,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.raw_headers],
            stream=_Body(resp, request),
            request=request,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": (resp.reason or "").encode()},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _Body(httpx.AsyncByteStream):
    """The answer's body, each read handing on whatever has arrived."""

    def __init__(self, resp: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._resp = resp
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._resp.content
        try:
            while chunk := await content.readany():
                yield chunk
        except _FAULTS as e:
            raise _httpx_error(e, self._request, "reading") from e

    async def aclose(self) -> None:
        if self._resp.content.at_eof():
            self._resp.release()  # read to its end: the connection goes back to the pool
        else:
            self._resp.close()  # e.g. a client that left mid-stream: vLLM aborts the request


#: What aiohttp raises for a fault of the network or of the answer.
_FAULTS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


def _httpx_error(e: BaseException, request: httpx.Request, when: str) -> httpx.TransportError:
    """The httpx exception that says what aiohttp's ``e`` means (checked most specific first:
    aiohttp's timeouts are ``OSError`` too)."""
    message = f"{type(e).__name__} while {when}: {e}"
    kind: type[httpx.TransportError]
    if isinstance(e, aiohttp.ConnectionTimeoutError):
        kind = httpx.ConnectTimeout
    elif isinstance(e, aiohttp.ServerTimeoutError | asyncio.TimeoutError):
        kind = httpx.ReadTimeout
    elif isinstance(e, aiohttp.ClientConnectorError):
        kind = httpx.ConnectError
    elif isinstance(e, aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        kind = httpx.RemoteProtocolError
    else:
        kind = httpx.ReadError
    return kind(message, request=request)
