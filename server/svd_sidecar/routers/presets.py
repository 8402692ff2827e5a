"""``/v1/steering/presets``: named strengths, offered by every steered model as ``MODEL:svd-NAME``.

``PUT /v1/steering/presets/strong {"scale": 2}`` makes ``my-lora:svd-strong`` appear in
``/v1/models`` next to ``my-lora:svd`` for each adapter that can steer, so a client that only
picks a model name can choose the strength too.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict

from svd_vllm.core.validation import Alpha, Scale
from svd_vllm.registry import PresetEntry

from ..deps import ReadAccess, State, WriteAccess
from ..errors import ERROR_RESPONSES, ApiError

__all__ = ["router"]

router = APIRouter(prefix="/v1/steering/presets", tags=["presets"], responses=ERROR_RESPONSES)


class PresetBody(BaseModel):
    """PUT body: the request scale (``svd_scale``) and, optionally, the mask threshold."""

    model_config = ConfigDict(extra="forbid")

    scale: Scale
    alpha: Alpha | None = None


@router.get("", response_model=list[PresetEntry])
def list_presets(state: State, _: ReadAccess) -> list[PresetEntry]:
    return state.registry.presets()


@router.get("/{name}", response_model=PresetEntry)
def get_preset(name: str, state: State, _: ReadAccess) -> PresetEntry:
    entry = state.registry.manifest().presets.get(name)
    if entry is None:
        raise ApiError(404, "not_found", f"no preset named {name!r}")
    return entry


@router.put("/{name}", response_model=PresetEntry)
async def put_preset(name: str, body: PresetBody, state: State, _: WriteAccess) -> PresetEntry:
    """Create or replace; each change bumps the version, live for new requests at once."""
    entry = await run_in_threadpool(
        lambda: state.registry.set_preset(name, body.scale, alpha=body.alpha)
    )
    state.metrics.registrations.labels("preset").inc()
    return entry


@router.delete("/{name}", status_code=204)
async def delete_preset(name: str, state: State, _: WriteAccess) -> Response:
    await run_in_threadpool(state.registry.remove_preset, name)
    state.metrics.registrations.labels("unpreset").inc()
    return Response(status_code=204)
