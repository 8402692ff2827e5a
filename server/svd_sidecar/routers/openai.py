"""The OpenAI-compatible front: proxies vLLM, turning a ``steering`` field into ``vllm_xargs``.

The keys it writes and the "vector can serve" rule are the engine's own
(``svd_vllm.vllm.admission``, ``svd_vllm.registry.servable``), so a request the sidecar lets
through is one vLLM admits.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask

from svd_vllm.registry import servable
from svd_vllm.vllm.admission import ALPHA_KEY, ENABLE_KEY, SCALE_KEY, VECTOR_KEY

from ..deps import State
from ..errors import ApiError, validation_error
from ..schemas import SteeringOptions
from ..state import SidecarState

__all__ = ["router"]

router = APIRouter(tags=["openai"])


@router.get("/v1/models")
async def models(request: Request, state: State) -> Response:
    return await _forward(state, request, "GET", "/v1/models", None, "models", "none")


@router.post("/v1/completions")
async def completions(request: Request, state: State) -> Response:
    return await _generate(state, request, "/v1/completions", "completions")


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, state: State) -> Response:
    return await _generate(state, request, "/v1/chat/completions", "chat")


def _steering_xargs(state: SidecarState, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The request's ``vllm_xargs`` with its ``steering`` field folded in, and a metric label."""
    raw_opts = body.pop("steering")
    try:
        opts = SteeringOptions.model_validate(raw_opts if raw_opts is not None else {})
    except ValidationError as e:
        raise validation_error(e, "steering", "invalid steering: ") from e
    xargs = body.get("vllm_xargs") or {}
    if not isinstance(xargs, dict):
        raise ApiError(400, "steering", "vllm_xargs must be an object")
    xargs = dict(xargs)
    label = "default"
    if opts.enabled is not None:
        xargs[ENABLE_KEY] = 1 if opts.enabled else 0
        label = "on" if opts.enabled else "off"
    if opts.vector is not None:
        xargs[VECTOR_KEY] = opts.vector
    if opts.scale is not None:
        xargs[SCALE_KEY] = opts.scale
    if opts.alpha is not None:
        xargs[ALPHA_KEY] = opts.alpha
    if opts.enabled:
        name = opts.vector or body.get("model")
        if not isinstance(name, str):
            raise ApiError(400, "steering", "steering needs a vector or a LoRA model name")
        entry = servable(state.registry.manifest().vectors.get(name), name)
        problem = state.problem(entry)
        if problem is not None:  # the engine would refuse it too: say so before proxying
            raise ApiError(
                400, "unloadable_vector",
                f"steering vector {name!r} ({entry.key}) cannot be loaded: {problem}",
            )  # fmt: skip
    return xargs, label


async def _generate(state: SidecarState, request: Request, path: str, endpoint: str) -> Response:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise ApiError(400, "json", f"request body is not JSON: {e}") from e
    except RecursionError:
        raise ApiError(400, "json", "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "json", "request body must be a JSON object")
    label = "default"
    if "steering" in body:
        xargs, label = _steering_xargs(state, body)
        if xargs:
            body["vllm_xargs"] = xargs
    return await _forward(state, request, "POST", path, body, endpoint, label)


async def _forward(
    state: SidecarState, request: Request, method: str, path: str, body: dict[str, Any] | None,
    endpoint: str, steering: str,
) -> Response:  # fmt: skip
    settings = state.settings
    client = state.http()
    forward = ("authorization", "accept", "user-agent", "x-request-id")
    headers = {k: v for k, v in request.headers.items() if k.lower() in forward}
    upstream = client.build_request(
        method, settings.vllm_url + path, json=body, headers=headers, params=request.query_params
    )
    try:
        resp = await client.send(upstream, stream=True)
    except httpx.HTTPError as e:
        raise ApiError(
            502, "upstream", f"vLLM at {settings.vllm_url} is unreachable: {type(e).__name__}"
        ) from e
    state.metrics.proxied.labels(endpoint, steering).inc()
    keep = ("content-type", "x-request-id", "cache-control")
    passthrough = {k: v for k, v in resp.headers.items() if k.lower() in keep}
    if "text/event-stream" in resp.headers.get("content-type", ""):
        return StreamingResponse(
            resp.aiter_raw(), status_code=resp.status_code, headers=passthrough,
            background=BackgroundTask(resp.aclose),
        )  # fmt: skip
    content = await resp.aread()
    await resp.aclose()
    return Response(content, status_code=resp.status_code, headers=passthrough)
