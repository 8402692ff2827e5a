"""Liveness (``/healthz``), readiness (``/readyz``: registry usable, vLLM up), ``/metrics``."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import httpx
from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from svd_vllm.registry import RegistryError

from ..deps import State
from ..schemas import ErrorBody

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorBody}})
async def readyz(state: State) -> JSONResponse:
    settings = state.settings
    checks: dict[str, str] = {}
    try:
        await run_in_threadpool(_probe_writable, settings.registry)
        checks["registry"] = "writable"
        free = shutil.disk_usage(settings.registry).free
        if free < settings.max_upload_bytes:  # the next upload might not fit
            checks["registry"] = f"disk almost full: {free} bytes free"
    except OSError as e:
        checks["registry"] = f"not writable: {e}"
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
    ok = checks == {"registry": "writable", "manifest": "readable", "vllm": "reachable"}
    return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics", include_in_schema=False)
def metrics(state: State) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _probe_writable(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".probe-", dir=root)
    os.close(fd)
    os.unlink(name)
