"""The sidecar's FastAPI application, assembled from its routers, state and error handlers."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import install_handlers
from .limits import BodyLimit
from .metrics import SidecarMetrics
from .routers import compositions, health, openai, presets, vectors
from .settings import SidecarSettings
from .state import SidecarState

__all__ = ["app_from_environment", "create_app"]


def create_app(
    settings: SidecarSettings | None = None, *, transport: httpx.AsyncBaseTransport | None = None
) -> FastAPI:
    """Build the app; settings default to the environment (``SVD_SIDECAR_*``).

    ``transport`` replaces the network transport to vLLM (tests use ``httpx.MockTransport``).
    """
    settings = settings or SidecarSettings()
    state = SidecarState(settings, transport)

    writes = settings.role != "front"

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.http()
        if writes:
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

    app.add_middleware(Timing, metrics=state.metrics)
    if writes:
        app.include_router(vectors.router)
        app.include_router(compositions.router)
        app.include_router(presets.router)
    app.include_router(health.router)
    if settings.role != "management":
        app.include_router(openai.router)
    return app


def app_from_environment() -> FastAPI:
    """The app of a uvicorn worker (``--workers N`` imports it by name): settings from the
    environment, which ``svd-sidecar`` set from its command line."""
    return create_app()


class Timing:
    """ASGI middleware: each request's time to its response's start, by route. Pure ASGI (not
    Starlette's ``BaseHTTPMiddleware``, which copies every chunk of a streamed answer through a
    memory stream: on an SSE relay that is most of the front's CPU per event)."""

    def __init__(self, app: ASGIApp, metrics: SidecarMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = scope.get("route")
                path = getattr(route, "path", "unmatched")
                self.metrics.latency.labels(path).observe(time.perf_counter() - t0)
            await send(message)

        await self.app(scope, receive, timed_send)


def _clean_uploads(registry: Path) -> None:
    """Remove uploads left by a killed sidecar (they were never registered)."""
    up_dir = registry / ".uploads"
    if up_dir.is_dir():
        for p in up_dir.glob("upload-*"):
            with contextlib.suppress(OSError):
                p.unlink()
