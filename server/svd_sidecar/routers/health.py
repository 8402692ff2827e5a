"""Liveness (``/healthz``), readiness (``/readyz``: registry usable, vLLM up), ``/metrics``.

A front (``role = front``) only reads the registry: its readiness does not ask for a writable one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import httpx
from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from svd_vllm.registry import RegistryError

from ..deps import State
from ..schemas import ErrorBody
from ..state import SidecarState

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorBody}})
async def readyz(state: State) -> JSONResponse:
    settings = state.settings
    checks: dict[str, str] = {}
    want = {"registry": "writable", "manifest": "readable", "vllm": "reachable"}
    if settings.role == "front":  # reads the registry, never writes it
        del want["registry"]
    else:
        checks["registry"] = await run_in_threadpool(_registry_writable, state)
    try:
        await run_in_threadpool(state.registry.manifest)
        checks["manifest"] = "readable"
    except RegistryError as e:
        checks["manifest"] = str(e)
    try:
        r = await state.http().get(f"{settings.vllm_url}/health", timeout=3)
        checks["vllm"] = "reachable" if r.status_code == 200 else f"status {r.status_code}"
    except httpx.HTTPError as e:
        checks["vllm"] = f"unreachable: {type(e).__name__}"
    ok = checks == want
    return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics", include_in_schema=False)
def metrics(state: State) -> Response:
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def _registry_writable(state: SidecarState) -> str:
    settings = state.settings
    try:
        _probe_writable(settings.registry)
        free = shutil.disk_usage(settings.registry).free
    except OSError as e:
        return f"not writable: {e}"
    if free < settings.max_upload_bytes:  # the next upload might not fit
        return f"disk almost full: {free} bytes free"
    return "writable"


def _probe_writable(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".probe-", dir=root)
    os.close(fd)
    os.unlink(name)
