"""The sidecar's FastAPI application, assembled from its routers, state and error handlers."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool

from .errors import install_handlers
from .limits import BodyLimit
from .routers import compositions, health, openai, presets, vectors
from .settings import SidecarSettings
from .state import SidecarState

__all__ = ["create_app"]


def create_app(
    settings: SidecarSettings | None = None, *, transport: httpx.AsyncBaseTransport | None = None
) -> FastAPI:
    """Build the app; settings default to the environment (``SVD_SIDECAR_*``).

    ``transport`` replaces the network transport to vLLM (tests use ``httpx.MockTransport``).
    """
    settings = settings or SidecarSettings()
    state = SidecarState(settings, transport)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.http()
        _clean_uploads(settings.registry)
        await run_in_threadpool(state.registry.cleanup)
        try:
            yield
        finally:
            await state.http().aclose()
            state.client = None

    app = FastAPI(
        title="svd-vllm sidecar",
        version="0.1.0",
        description="Steering-vector management and an OpenAI-compatible front for vLLM with SVD.",
        lifespan=lifespan,
    )
    app.state.sidecar = state
    install_handlers(app, state.metrics)

    def body_limit(path: str) -> int:
        if path.startswith(vectors.router.prefix):  # the artifact plus multipart framing
            return settings.max_upload_bytes + 64 * 1024
        return settings.max_body_bytes

    # Innermost of the middleware (added first): the route reads through it directly, so its
    # 413 reaches the exception handlers rather than a middleware's task group.
    app.add_middleware(BodyLimit, limit_for=body_limit, timeout=settings.body_timeout)

    @app.middleware("http")
    async def _timing(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        state.metrics.latency.labels(path).observe(time.perf_counter() - t0)
        return response

    app.include_router(vectors.router)
    app.include_router(compositions.router)
    app.include_router(presets.router)
    app.include_router(health.router)
    app.include_router(openai.router)
    return app


def _clean_uploads(registry: Path) -> None:
    """Remove uploads left by a killed sidecar (they were never registered)."""
    up_dir = registry / ".uploads"
    if up_dir.is_dir():
        for p in up_dir.glob("upload-*"):
            with contextlib.suppress(OSError):
                p.unlink()
