"""The OpenAI-compatible front: proxies vLLM, turning a ``steering`` field into ``vllm_xargs``.

Steering is injected (and the ``steering`` field stripped) on every generation endpoint vLLM
serves: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/responses`` (OpenAI Responses API)
and ``/v1/messages`` (Anthropic-compatible), streamed or not (SSE passed through). ``/v1/models``
is annotated with each model's steering and lists the steered variants (``ADAPTER:svd``, see
``variants``), and ``/tokenize`` / ``/detokenize`` pass through. Any other path is an allow-list
miss: a 404 that says so (vLLM's admin endpoints, such as LoRA loading, stay off this open port).

The keys it writes and the admission rule it checks them with are the engine's own
(``svd_vllm.registry.request.check_request``), so a request the sidecar lets through is one vLLM
admits. Bodies are parsed by ``json_body`` and sent by ``upstream``.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from svd_vllm.core.validation import pydantic_message
from svd_vllm.registry import CompositionEntry, Manifest, VectorEntry
from svd_vllm.registry.request import (
    ALPHA_KEY,
    ENABLE_KEY,
    INTERNAL_KEYS,
    LORA_KEY,
    SCALE_KEY,
    STEERING_KEYS,
    VECTOR_KEY,
    XARGS_NAMES,
    ArgNames,
    SteeringError,
)

from .. import variants
from ..deps import State
from ..errors import ApiError
from ..json_body import parse_json_object
from ..schemas import SteeringOptions, VectorInfo
from ..state import SidecarState
from ..upstream import forward

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
    """vLLM's model list; each model gets ``svd_steering``: the vector or composition its
    requests steer with by default (the one named like the model, for a LoRA adapter), or null,
    with a ``status`` that says whether a request asking for it would be admitted. Clients may
    ignore the field."""
    resp = await forward(state, request, "GET", "/v1/models", None, "models", "none")
    if resp.status_code != 200 or isinstance(resp, StreamingResponse):
        return resp
    try:
        listing = json.loads(bytes(resp.body))
        data = listing["data"]
        assert isinstance(data, list)
    except (ValueError, KeyError, TypeError, AssertionError):
        return resp  # not the shape we know: unchanged
    manifest = state.manifest()
    # vLLM's plugin lists the steered variants too: the sidecar lists its own, once.
    data = [m for m in data if not variants.is_listed_variant(m)]
    for model in data:
        if isinstance(model, dict):
            name = str(model.get("id"))
            entry, comp = manifest.vectors.get(name), manifest.compositions.get(name)
            info = None
            if entry is not None:
                info = _steering_info(state, entry)
            elif comp is not None:
                status, problem = _composition_status(state, manifest, comp)
                info = {
                    "composition": comp.name,
                    "version": comp.version,
                    "status": status,
                    "problem": problem,
                    "vectors": [m.model_dump() for m in comp.members],
                }
            model["svd_steering"] = info
    listing["data"] = [
        entry
        for model in data
        for entry in (
            [model, *variants.listed_variants(state, manifest, model)]
            if isinstance(model, dict)
            else [model]
        )
    ]
    return Response(json.dumps(listing), status_code=200, media_type="application/json")


def _steering_info(state: SidecarState, entry: VectorEntry) -> dict[str, Any]:
    info = VectorInfo.of(entry, state.problem(entry))
    return {
        "vector": info.name,
        "version": info.version,
        "status": info.status,
        "effective_mu": info.effective_mu,
        "effective_alpha": info.effective_alpha,
    }


def _composition_status(
    state: SidecarState, manifest: Manifest, comp: CompositionEntry
) -> tuple[str, str | None]:
    """``ready`` exactly when a request steering with ``comp`` would be admitted (the engine's
    rule); else ``disabled`` (it, or a member) or ``unloadable``, with the reason."""
    try:
        state.admit({ENABLE_KEY: 1, VECTOR_KEY: comp.name}, manifest)
    except SteeringError as e:
        return ("disabled" if e.code == "disabled_vector" else "unloadable"), str(e)
    return "ready", None


def _generation_route(path: str, label: str) -> None:
    async def generate(request: Request, state: State) -> Response:
        return await _generate(state, request, path, label)

    generate.__name__ = f"proxy_{label}"
    router.add_api_route(path, generate, methods=["POST"], name=f"proxy {path}")


for _path, _label in GENERATION_ENDPOINTS.items():
    _generation_route(_path, _label)


def _passthrough_route(path: str, label: str) -> None:
    async def passthrough(request: Request, state: State) -> Response:
        body = parse_json_object(await request.body())
        body.pop("steering", None)  # meaningless here, and not vLLM's
        return await forward(state, request, "POST", path, body, label, "none")

    passthrough.__name__ = f"proxy_{label}"
    router.add_api_route(path, passthrough, methods=["POST"], name=f"proxy {path}")


for _path, _label in PASSTHROUGH.items():
    _passthrough_route(_path, _label)


def not_proxied(path: str) -> ApiError:
    allowed = ", ".join(
        ["GET /v1/models", *(f"POST {p}" for p in (*GENERATION_ENDPOINTS, *PASSTHROUGH))]
    )
    return ApiError(
        404,
        "not_proxied",
        f"/{path} is not proxied by the svd-vllm sidecar (it serves {allowed}, and "
        "/v1/steering/*); call vLLM directly for anything else",
    )


def _steering_xargs(
    state: SidecarState, body: dict[str, Any], variant: variants.Variant | None = None
) -> tuple[dict[str, Any], str]:
    """The request's ``vllm_xargs`` with its ``steering`` field folded in (``variants.resolve``
    folded in the ``variant``'s), checked once by the engine's own rule, and a metric label.
    ``vllm_xargs`` values that only the plugin may write are dropped, as the plugin drops them."""
    raw_opts = body.pop("steering", None)
    try:
        opts = SteeringOptions.model_validate(raw_opts if raw_opts is not None else {})
    except ValidationError as e:
        raise ApiError(400, "steering", pydantic_message(e, under="steering")) from e
    xargs = body.get("vllm_xargs")
    if xargs is None:
        xargs = {}
    if not isinstance(xargs, dict):
        raise ApiError(400, "steering", f"vllm_xargs must be an object, got {type(xargs).__name__}")
    xargs = {k: v for k, v in xargs.items() if k not in INTERNAL_KEYS}
    label = "default" if variant is None else "variant"
    if opts.enabled is not None:
        xargs[ENABLE_KEY] = 1 if opts.enabled else 0
        label = "on" if opts.enabled else "off"
    if opts.vector is not None:
        xargs[VECTOR_KEY] = opts.vector
    if opts.scale is not None:
        xargs[SCALE_KEY] = opts.scale
    if opts.alpha is not None:
        xargs[ALPHA_KEY] = opts.alpha
    if opts.vectors is not None:
        xargs[VECTOR_KEY] = [v.vector for v in opts.vectors]
        label = "composed" if opts.enabled else label
    if not any(k in xargs for k in STEERING_KEYS):
        return xargs, label  # nothing asked: the server default applies, never refused
    manifest = state.manifest()
    names = XARGS_NAMES
    if raw_opts is not None:
        vector_field = "steering.vectors" if opts.vectors is not None else "steering.vector"
        names = ArgNames(enable="steering.enabled", vector=vector_field)
    if opts.vectors is not None and any(v.scale is not None for v in opts.vectors):
        # The members without a scale: their vector's default scale, so the lists align (an
        # unknown name's placeholder never leaves: the check below refuses it).
        xargs[SCALE_KEY] = [
            v.scale if v.scale is not None else _default_scale(manifest, v.vector)
            for v in opts.vectors
        ]
    model = body.get("model")
    stamped = {**xargs, LORA_KEY: model} if isinstance(model, str) and model else xargs
    try:
        state.admit(stamped, manifest, names)
    except SteeringError as e:
        raise (
            variants.not_found(variant, e) if variant else ApiError(400, e.code, str(e))
        ) from None
    return xargs, label


def _default_scale(manifest: Manifest, name: str) -> float:
    entry = manifest.vectors.get(name)
    return entry.default_scale if entry is not None else 1.0


async def _generate(state: SidecarState, request: Request, path: str, endpoint: str) -> Response:
    body = parse_json_object(await request.body())
    variant = None
    resolved = variants.resolve(state, body)
    if resolved is not None:  # a steered model by name: the model itself, steering on
        variant, body["vllm_xargs"] = resolved
        body["model"] = variant.model
    xargs, label = _steering_xargs(state, body, variant)
    if xargs:
        body["vllm_xargs"] = xargs
    else:
        body.pop("vllm_xargs", None)
    rename = None if variant is None else (variant.model, variant.requested)
    return await forward(state, request, "POST", path, body, endpoint, label, rename)


@router.api_route(
    "/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False
)
async def everything_else(path: str) -> Response:
    raise not_proxied(path)
