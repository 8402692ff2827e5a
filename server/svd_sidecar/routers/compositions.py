"""``/v1/steering/compositions``: named compositions of vectors (an adapter's default steering).

A composition named like a LoRA adapter is what that adapter's requests steer with when they ask
for steering without naming a vector; a request may also name it as ``steering.vector``.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from svd_vllm.core.validation import Alpha
from svd_vllm.registry import MAX_MEMBERS, CompositionEntry, Member, check_name

from ..deps import ReadAccess, State, WriteAccess
from ..errors import ERROR_RESPONSES, ApiError

__all__ = ["router"]

router = APIRouter(
    prefix="/v1/steering/compositions", tags=["compositions"], responses=ERROR_RESPONSES
)


class CompositionBody(BaseModel):
    """PUT body: the members (registered vectors, each with an optional scale) and settings."""

    model_config = ConfigDict(extra="forbid")

    members: list[Member] = Field(min_length=1, max_length=MAX_MEMBERS)
    alpha: Alpha | None = Field(None, description="default: the members' min")
    enabled: bool = Field(True, strict=True)


@router.get("", response_model=list[CompositionEntry])
def list_compositions(state: State, _: ReadAccess) -> list[CompositionEntry]:
    return state.registry.compositions()


@router.get("/{name}", response_model=CompositionEntry)
def get_composition(name: str, state: State, _: ReadAccess) -> CompositionEntry:
    check_name(name)
    entry = state.registry.manifest().compositions.get(name)
    if entry is None:
        raise ApiError(404, "not_found", f"no composition named {name!r}")
    return entry


@router.put("/{name}", response_model=CompositionEntry)
async def put_composition(
    name: str, body: CompositionBody, state: State, _: WriteAccess
) -> CompositionEntry:
    """Create or replace; each change bumps the version, live for new requests within 1 s."""
    check_name(name)
    entry = await run_in_threadpool(
        lambda: state.registry.compose(
            name, body.members, alpha=body.alpha, enabled=body.enabled, replace=True
        )
    )
    state.metrics.registrations.labels("compose").inc()
    return entry


@router.delete("/{name}", status_code=204)
async def delete_composition(name: str, state: State, _: WriteAccess) -> Response:
    check_name(name)
    await run_in_threadpool(state.registry.remove_composition, name)
    state.metrics.registrations.labels("decompose").inc()
    return Response(status_code=204)
