"""The hop to vLLM: one request upstream, and its answer, or its failure, back to the client.

A fault of vLLM or of the network between is never a 500 and never looks like success:

* unreachable, refused, or a connection that drops before the whole answer: ``502 upstream``;
* no answer (headers, or the rest of a non-streamed body) within the proxy timeout:
  ``504 upstream_timeout``;
* a stream (SSE) that breaks off or stalls past the proxy timeout after it started: the client
  gets one last event in the endpoint's own error shape (what vLLM sends for its own errors
  mid-stream) and no terminating ``data: [DONE]``, so a truncated answer cannot pass for a
  complete one.

The sidecar asks vLLM for an unencoded body (``Accept-Encoding: identity``) and decodes one that
comes compressed anyway: it forwards bodies without ``Content-Encoding``.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from .errors import ApiError
from .state import SidecarState
from .variants import rename_events, rename_model

__all__ = ["forward", "stream_error_event"]

#: Client headers passed on to vLLM, and vLLM's headers passed back.
_REQUEST_HEADERS = (
    "authorization",
    "accept",
    "user-agent",
    "x-request-id",
    "x-api-key",
    "anthropic-version",
    "anthropic-beta",
)
_RESPONSE_HEADERS = ("content-type", "x-request-id", "cache-control")


async def forward(
    state: SidecarState,
    request: Request,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    endpoint: str,
    steering: str,
    rename: tuple[str, str] | None = None,
) -> Response:
    """Send ``body`` to vLLM's ``path`` and relay the answer (``endpoint`` labels metrics and
    picks the shape of a mid-stream error event). ``rename = (served, requested)``: the
    answer's ``model`` fields say ``requested`` where vLLM says ``served``."""
    settings = state.settings
    client = state.http()
    headers = _request_headers(request)
    headers["accept-encoding"] = "identity"
    upstream = client.build_request(
        method, settings.vllm_url + path, json=body, headers=headers, params=request.query_params
    )
    try:
        resp = await client.send(upstream, stream=True)
    except httpx.HTTPError as e:
        raise _fault(state, endpoint, e, "before answering") from e
    state.metrics.proxied.labels(endpoint, steering).inc()
    passthrough = {k: v for k, v in resp.headers.items() if k.lower() in _RESPONSE_HEADERS}
    if "text/event-stream" in resp.headers.get("content-type", ""):
        return StreamingResponse(
            _relay(state, resp, endpoint, rename),
            status_code=resp.status_code,
            headers=passthrough,
        )
    try:
        content = await resp.aread()
    except httpx.HTTPError as e:
        raise _fault(state, endpoint, e, "in the middle of its answer") from e
    finally:
        await resp.aclose()
    if rename is not None and resp.status_code == 200:
        with contextlib.suppress(ValueError):
            content = json.dumps(rename_model(json.loads(content), *rename)).encode()
    return Response(content, status_code=resp.status_code, headers=passthrough)


def _request_headers(request: Request) -> dict[str, str]:
    """The client headers vLLM gets: the allow-listed ones, their values trimmed (some clients
    send ``Authorization: Bearer `` with no key, which the HTTP client to vLLM would refuse to
    send), and none with a control character."""
    out = {}
    for key, value in request.headers.items():
        value = value.strip(" \t")
        if key.lower() in _REQUEST_HEADERS and not _CONTROL.search(value):
            out[key] = value
    return out


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _fault(state: SidecarState, endpoint: str, e: httpx.HTTPError, when: str) -> ApiError:
    url = state.settings.vllm_url
    if isinstance(e, httpx.TimeoutException):
        state.metrics.upstream_faults.labels(endpoint, "timeout").inc()
        return ApiError(
            504,
            "upstream_timeout",
            f"vLLM at {url} did not answer within {state.settings.proxy_timeout:g} s ({when})",
        )
    state.metrics.upstream_faults.labels(endpoint, "dropped").inc()
    return ApiError(502, "upstream", f"vLLM at {url} failed {when}: {type(e).__name__}")


async def _relay(
    state: SidecarState, resp: httpx.Response, endpoint: str, rename: tuple[str, str] | None
) -> AsyncIterator[bytes]:
    """vLLM's stream, decoded, passed on an event at a time; on a fault, one error event
    instead of the rest (and no ``[DONE]``), with the partial event before it dropped. The
    upstream response is closed however the stream ends (when the client leaves first, this
    generator is cancelled at its read)."""
    pending = b""
    # Unencoded (what the sidecar asks for): the raw bytes, without httpx's decoder layers.
    encoded = resp.headers.get("content-encoding", "identity").lower() != "identity"
    try:
        async for chunk in resp.aiter_bytes() if encoded else resp.aiter_raw():
            if not pending and chunk.endswith(b"\n\n"):  # whole events: the usual case
                yield chunk if rename is None else rename_events(chunk, *rename)
                continue
            pending += chunk
            end = _events_end(pending)
            if end or len(pending) > _MAX_EVENT_BYTES:
                end = end or len(pending)
                events, pending = pending[:end], pending[end:]
                yield events if rename is None else rename_events(events, *rename)
        if pending:
            yield pending
    except httpx.HTTPError as e:
        error = _fault(state, endpoint, e, "in the middle of a stream")
        yield stream_error_event(endpoint, error)
    finally:
        await resp.aclose()


#: An upstream "event" longer than this without a blank line is passed on as it is.
_MAX_EVENT_BYTES = 1 << 20


def _events_end(buf: bytes) -> int:
    """Where the last complete SSE event in ``buf`` ends (0: none yet)."""
    lf, crlf = buf.rfind(b"\n\n"), buf.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def stream_error_event(endpoint: str, error: ApiError) -> bytes:
    """The SSE event vLLM itself sends when a stream fails, in each API's shape: an ``error``
    object for completions and chat (vLLM's ``ErrorResponse``), an ``error`` event for the
    Responses and Messages APIs."""
    code, message = error.code, error.message
    if endpoint == "messages":  # Anthropic's error event
        kind = "timeout_error" if error.status_code == 504 else "api_error"
        data: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
        return b"event: error\ndata: " + json.dumps(data).encode() + b"\n\n"
    if endpoint == "responses":
        data = {"type": "error", "code": code, "message": message, "param": None}
        return b"event: error\ndata: " + json.dumps(data).encode() + b"\n\n"
    data = {"error": {"message": message, "type": code, "param": None, "code": error.status_code}}
    return b"data: " + json.dumps(data).encode() + b"\n\n"
