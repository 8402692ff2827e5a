"""The OpenAI-compatible front: proxies vLLM, turning a ``steering`` field into ``vllm_xargs``.

Steering is injected (and the ``steering`` field stripped) on every generation endpoint vLLM
serves: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/responses`` (OpenAI Responses API)
and ``/v1/messages`` (Anthropic-compatible), streamed or not (SSE passed through). ``/v1/models``
is annotated with each model's steering vector, and ``/tokenize`` / ``/detokenize`` pass through.
Any other path is an allow-list miss: a 404 that says so (vLLM's admin endpoints, such as LoRA
loading, stay off this open port).

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

from svd_vllm.registry import RegistryError, VectorEntry, servable
from svd_vllm.vllm.admission import ALPHA_KEY, ENABLE_KEY, SCALE_KEY, VECTOR_KEY

from ..deps import State
from ..errors import ApiError, validation_error
from ..schemas import SteeringOptions, VectorInfo
from ..state import SidecarState

__all__ = ["GENERATION_ENDPOINTS", "router"]

router = APIRouter(tags=["openai"])

#: path -> metric label: where a ``steering`` object is folded into ``vllm_xargs``.
GENERATION_ENDPOINTS = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
}
#: Other vLLM paths proxied unchanged.
PASSTHROUGH = {"/tokenize": "tokenize", "/detokenize": "detokenize"}


@router.get("/v1/models")
async def models(request: Request, state: State) -> Response:
    """vLLM's model list; each model gets ``svd_steering``: the vector its requests steer with
    by default (the one named like the model, for a LoRA adapter), or null. Clients may ignore
    the field."""
    resp = await _forward(state, request, "GET", "/v1/models", None, "models", "none")
    if resp.status_code != 200 or isinstance(resp, StreamingResponse):
        return resp
    try:
        listing = json.loads(bytes(resp.body))
        data = listing["data"]
        assert isinstance(data, list)
    except (ValueError, KeyError, TypeError, AssertionError):
        return resp  # not the shape we know: unchanged
    manifest = state.registry.manifest()
    for model in data:
        if isinstance(model, dict):
            name = str(model.get("id"))
            entry, comp = manifest.vectors.get(name), manifest.compositions.get(name)
            info = None
            if entry is not None:
                info = _steering_info(state, entry)
            elif comp is not None:
                info = {"composition": comp.name, "version": comp.version,
                        "status": "ready" if comp.enabled else "disabled",
                        "vectors": [m.model_dump() for m in comp.members]}  # fmt: skip
            model["svd_steering"] = info
    return Response(json.dumps(listing), status_code=200, media_type="application/json")


def _steering_info(state: SidecarState, entry: VectorEntry) -> dict[str, Any]:
    info = VectorInfo.of(entry, state.problem(entry))
    return {"vector": info.name, "version": info.version, "status": info.status,
            "effective_mu": info.effective_mu, "effective_alpha": info.effective_alpha}  # fmt: skip


def _generation_route(path: str, label: str) -> None:
    async def generate(request: Request, state: State) -> Response:
        return await _generate(state, request, path, label)

    generate.__name__ = f"proxy_{label}"
    router.add_api_route(path, generate, methods=["POST"], name=f"proxy {path}")


for _path, _label in GENERATION_ENDPOINTS.items():
    _generation_route(_path, _label)


def _passthrough_route(path: str, label: str) -> None:
    async def passthrough(request: Request, state: State) -> Response:
        body = await _json_body(request)
        return await _forward(state, request, "POST", path, body, label, "none")

    passthrough.__name__ = f"proxy_{label}"
    router.add_api_route(path, passthrough, methods=["POST"], name=f"proxy {path}")


for _path, _label in PASSTHROUGH.items():
    _passthrough_route(_path, _label)


def not_proxied(path: str) -> ApiError:
    allowed = ", ".join(
        ["GET /v1/models", *(f"POST {p}" for p in (*GENERATION_ENDPOINTS, *PASSTHROUGH))]
    )
    return ApiError(
        404, "not_proxied",
        f"/{path} is not proxied by the svd-vllm sidecar (it serves {allowed}, and "
        "/v1/steering/*); call vLLM directly for anything else",
    )  # fmt: skip


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
    manifest = state.registry.manifest()
    vectors = manifest.vectors
    if opts.vectors is not None:
        xargs[VECTOR_KEY] = [v.name for v in opts.vectors]
        if any(v.scale is not None for v in opts.vectors):  # the rest: their default scale
            xargs[SCALE_KEY] = [
                v.scale if v.scale is not None else _member(vectors, v.name, i).default_scale
                for i, v in enumerate(opts.vectors)
            ]
        label = "composed" if opts.enabled else label
    if opts.enabled:
        if opts.vectors is not None:
            names = [v.name for v in opts.vectors]
        else:
            name = opts.vector or body.get("model")
            if not isinstance(name, str):
                raise ApiError(400, "steering", "steering needs a vector or a LoRA model name")
            names = [name]
        comps = manifest.compositions
        if opts.vectors is None and names[0] not in vectors and names[0] in comps:
            comp = comps[names[0]]
            if not comp.enabled:
                raise ApiError(400, "disabled_vector", f"composition {comp.name!r} is disabled")
            names = [m.vector for m in comp.members]
        for i, name in enumerate(names):
            entry = _member(vectors, name, i if opts.vectors is not None else None)
            problem = state.problem(entry)
            if problem is not None:  # the engine would refuse it too: say so before proxying
                raise ApiError(
                    400, "unloadable_vector",
                    f"steering vector {name!r} ({entry.key}) cannot be loaded: {problem}",
                )  # fmt: skip
    return xargs, label


def _member(vectors: dict[str, VectorEntry], name: str, index: int | None) -> VectorEntry:
    """``servable`` for one named vector; in a composition the error names
    ``steering.vectors[i]``."""
    try:
        return servable(vectors.get(name), name)
    except RegistryError as e:
        if index is None:
            raise
        raise RegistryError(f"steering.vectors[{index}]: {e}", code=e.code) from None


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise ApiError(400, "json", f"request body is not JSON: {e}") from e
    except RecursionError:
        raise ApiError(400, "json", "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "json", "request body must be a JSON object")
    return body


async def _generate(state: SidecarState, request: Request, path: str, endpoint: str) -> Response:
    body = await _json_body(request)
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
    forward = ("authorization", "accept", "user-agent", "x-request-id", "x-api-key",
               "anthropic-version", "anthropic-beta")  # fmt: skip
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


@router.api_route(
    "/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False
)
async def everything_else(path: str) -> Response:
    raise not_proxied(path)
