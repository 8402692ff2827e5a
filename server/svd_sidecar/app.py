"""The sidecar's FastAPI application: vector management, health, metrics, OpenAI front."""

from __future__ import annotations

import contextlib
import hmac
import json
import math
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.background import BackgroundTask

from svd_vllm import artifact
from svd_vllm.artifact import ArtifactError
from svd_vllm.registry import Registry, RegistryError, check_name

from .metrics import SidecarMetrics
from .schemas import (
    ErrorBody,
    RegisterByPath,
    SteeringOptions,
    VectorDetail,
    VectorInfo,
    VectorPatch,
)
from .settings import SidecarSettings

__all__ = ["create_app"]

_ERRORS = {400: {"model": ErrorBody}, 401: {"model": ErrorBody}, 404: {"model": ErrorBody}}


class ApiError(HTTPException):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status_code=status, detail={"code": code, "message": message})


def _artifact_reason(e: ArtifactError) -> str:
    p = e.problem
    for key, reason in (
        ("safetensors", "parse"), ("hash", "hash"), ("dtype", "dtype"), ("shape", "shape"),
        ("entries", "shape"), ("non-finite", "non_finite"), ("vocab_size", "vocab"),
        ("metadata", "metadata"), ("format", "format"), ("bytes", "size"),
    ):  # fmt: skip
        if key in p:
            return reason
    return "invalid_artifact"


class SidecarState:
    def __init__(self, settings: SidecarSettings) -> None:
        self.settings = settings
        self.registry = Registry(settings.registry)
        self.metrics = SidecarMetrics()
        self.client: httpx.AsyncClient | None = None
        self.transport: httpx.AsyncBaseTransport | None = None
        self._vocab: int | None = settings.vocab_size

    def http(self) -> httpx.AsyncClient:
        """The client to vLLM (made by the lifespan; lazily if the app runs without one)."""
        if self.client is None:
            self.client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.settings.proxy_timeout, connect=10),
                transport=self.transport,
            )
        return self.client

    def reject(self, status: int, reason: str, message: str) -> ApiError:
        self.metrics.rejections.labels(reason).inc()
        return ApiError(status, reason, message)

    async def vocab_size(self) -> int:
        """The served model's logits width: setting, model dir, or the model vLLM serves."""
        if self._vocab is not None:
            return self._vocab
        model_dir = self.settings.model_dir
        if model_dir is None:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
                r = await self.http().get(f"{self.settings.vllm_url}/v1/models", timeout=5)
                roots = [m.get("root") or m["id"] for m in r.json()["data"] if not m.get("parent")]
                model_dir = Path(roots[0]) if roots else None
        if model_dir is not None and (model_dir / "config.json").exists():
            cfg = json.loads((model_dir / "config.json").read_text())
            vocab = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
            if isinstance(vocab, int) and vocab > 0:
                self._vocab = vocab
                return vocab
        raise self.reject(
            503, "vocab_unknown",
            "cannot determine the served model's vocab size: set SVD_SIDECAR_VOCAB_SIZE or "
            "SVD_SIDECAR_MODEL_DIR, or start vLLM",
        )  # fmt: skip


def create_app(
    settings: SidecarSettings | None = None, *, transport: httpx.AsyncBaseTransport | None = None
) -> FastAPI:
    """Build the app; settings default to the environment (``SVD_SIDECAR_*``).

    ``transport`` replaces the network transport to vLLM (tests use ``httpx.MockTransport``).
    """
    settings = settings or SidecarSettings()
    state = SidecarState(settings)
    state.transport = transport

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

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        state.metrics.rejections.labels("validation").inc()
        msg = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": {"code": "validation", "message": msg}}, status_code=422)

    @app.middleware("http")
    async def _timing(request: Request, call_next):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        state.metrics.latency.labels(path).observe(time.perf_counter() - t0)
        return response

    def _check_key(request: Request) -> None:
        key = settings.api_key
        if key is None:  # dev mode (settings refuse a keyless non-dev start)
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), key.get_secret_value().encode()
        ):
            raise state.reject(401, "unauthorized", "missing or invalid bearer key")

    def require_key(request: Request) -> None:
        _check_key(request)

    def read_access(request: Request) -> None:
        if settings.reads_require_key:
            _check_key(request)

    def _entry(name: str):  # type: ignore[no-untyped-def]
        try:
            check_name(name)
            return state.registry.get(name)
        except RegistryError as e:
            raise state.reject(404 if e.code == "not_found" else 400, e.code, str(e)) from e

    # -- management API --------------------------------------------------------------------
    @app.get("/v1/steering/vectors", response_model=list[VectorInfo], responses=_ERRORS,
             dependencies=[Depends(read_access)])  # fmt: skip
    def list_vectors() -> list[VectorInfo]:
        return [VectorInfo.of(e) for e in state.registry.list()]

    @app.get("/v1/steering/vectors/{name}", response_model=VectorDetail, responses=_ERRORS,
             dependencies=[Depends(read_access)])  # fmt: skip
    def get_vector(name: str) -> VectorDetail:
        e = _entry(name)
        try:
            meta = state.registry.load(e).meta
        except (ArtifactError, OSError) as exc:
            raise state.reject(500, "artifact_unreadable", str(exc)) from exc
        return VectorDetail(
            **VectorInfo.of(e).model_dump(), mu_bar_exact=meta.mu_bar_exact,
            shift_weighting=meta.shift_weighting, estimator=meta.estimator,
            tokenizer_fingerprint=meta.tokenizer_fingerprint,
            calibration=meta.calibration.model_dump(mode="json"),
        )  # fmt: skip

    register_doc = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "name": {
                                "type": "string",
                                "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                            },
                            "default_scale": {"type": "number"},
                        },
                    }
                },
                "application/json": {"schema": RegisterByPath.model_json_schema()},
            },
        }
    }

    @app.post("/v1/steering/vectors", status_code=201, response_model=VectorInfo,
              responses={**_ERRORS, 409: {"model": ErrorBody}, 413: {"model": ErrorBody},
                         415: {"model": ErrorBody}},
              openapi_extra=register_doc, dependencies=[Depends(require_key)])  # fmt: skip
    async def register_vector(
        request: Request, replace: bool = Query(False, description="replace an existing name")
    ) -> VectorInfo:
        ctype = request.headers.get("content-type", "").lower()
        vocab = await state.vocab_size()
        limit = settings.max_upload_bytes
        tmp: Path | None = None
        try:
            if ctype.startswith("multipart/form-data"):
                length = request.headers.get("content-length")
                if length is not None and length.isdigit() and int(length) > limit + 65536:
                    raise state.reject(413, "size", f"upload is over the {limit}-byte limit")
                try:
                    form = await request.form(max_files=1, max_fields=4)
                except Exception as e:  # malformed multipart
                    raise state.reject(400, "parse", f"malformed multipart body: {e}") from e
                upload = form.get("file")
                if upload is None or isinstance(upload, str):
                    raise state.reject(400, "missing_file", "multipart field 'file' is required")
                name = form.get("name")
                name = name if isinstance(name, str) and name else None
                scale_raw = form.get("default_scale")
                scale = (
                    _parse_scale(scale_raw, state)
                    if isinstance(scale_raw, str) and scale_raw
                    else None
                )
                tmp = await _spool_upload(upload, settings.registry, limit, state)
                source: Path = tmp
            elif ctype.startswith("application/json"):
                try:
                    body = RegisterByPath.model_validate_json(await request.body())
                except ValidationError as e:
                    raise state.reject(400, "validation", _pyd_msg(e)) from e
                source = _allowed_path(body.path, settings, state)
                name, scale = body.name, body.default_scale
            else:
                raise state.reject(
                    415,
                    "content_type",
                    "send multipart/form-data (file) or application/json (path)",
                )
            if name is not None:
                try:
                    check_name(name)
                except RegistryError as e:
                    raise state.reject(400, "name", str(e)) from e

            def work():  # type: ignore[no-untyped-def]
                art = artifact.load(source, expected_vocab_size=vocab, max_bytes=limit)
                return state.registry.add(art, name=name, replace=replace, default_scale=scale)

            try:
                entry = await run_in_threadpool(work)
            except ArtifactError as e:
                raise state.reject(
                    400, _artifact_reason(e), f"invalid artifact: {e.problem}"
                ) from e
            except RegistryError as e:
                raise state.reject(409 if e.code == "conflict" else 400, e.code, str(e)) from e
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        state.metrics.registrations.labels(
            "replace" if entry.version > 1 and replace else "add"
        ).inc()
        return VectorInfo.of(entry)

    @app.patch("/v1/steering/vectors/{name}", response_model=VectorInfo, responses=_ERRORS,
               dependencies=[Depends(require_key)])  # fmt: skip
    async def patch_vector(name: str, patch: VectorPatch) -> VectorInfo:
        _entry(name)
        fields = patch.model_fields_set
        if not fields:
            raise state.reject(400, "empty_patch", "nothing to change")
        changes: dict[str, Any] = {}
        if "default_scale" in fields:
            if patch.default_scale is None:
                raise state.reject(400, "validation", "default_scale cannot be null")
            changes["default_scale"] = patch.default_scale
        if "enabled" in fields:
            if patch.enabled is None:
                raise state.reject(400, "validation", "enabled cannot be null")
            changes["enabled"] = patch.enabled
        if "mu_bar" in fields:
            changes["mu_bar_override"] = patch.mu_bar
        if "alpha" in fields:
            changes["alpha_override"] = patch.alpha
        try:
            entry = await run_in_threadpool(state.registry.update, name, **changes)
        except RegistryError as e:
            raise state.reject(404 if e.code == "not_found" else 400, e.code, str(e)) from e
        state.metrics.registrations.labels("patch").inc()
        return VectorInfo.of(entry)

    @app.delete("/v1/steering/vectors/{name}", status_code=204, responses=_ERRORS,
                dependencies=[Depends(require_key)])  # fmt: skip
    async def delete_vector(name: str) -> Response:
        _entry(name)
        try:
            await run_in_threadpool(state.registry.remove, name)
        except RegistryError as e:
            raise state.reject(404, e.code, str(e)) from e
        state.metrics.registrations.labels("delete").inc()
        return Response(status_code=204)

    # -- health and metrics ------------------------------------------------------------------
    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorBody}})
    async def readyz() -> JSONResponse:
        checks: dict[str, str] = {}
        try:
            await run_in_threadpool(_probe_writable, settings.registry)
            checks["registry"] = "writable"
        except OSError as e:
            checks["registry"] = f"not writable: {e}"
        try:
            r = await state.http().get(f"{settings.vllm_url}/health", timeout=3)
            checks["vllm"] = "reachable" if r.status_code == 200 else f"status {r.status_code}"
        except httpx.HTTPError as e:
            checks["vllm"] = f"unreachable: {type(e).__name__}"
        ok = checks["registry"] == "writable" and checks["vllm"] == "reachable"
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- OpenAI-compatible front -----------------------------------------------------------------
    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await _forward(request, "GET", "/v1/models", None, "models", "none")

    async def _completions(request: Request, path: str, endpoint: str) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise state.reject(400, "json", f"request body is not JSON: {e}") from e
        if not isinstance(body, dict):
            raise state.reject(400, "json", "request body must be a JSON object")
        steering_label = "default"
        if "steering" in body:
            raw_opts = body.pop("steering")
            try:
                opts = SteeringOptions.model_validate(raw_opts if raw_opts is not None else {})
            except ValidationError as e:
                raise state.reject(400, "steering", "invalid steering: " + _pyd_msg(e)) from e
            xargs = body.get("vllm_xargs") or {}
            if not isinstance(xargs, dict):
                raise state.reject(400, "steering", "vllm_xargs must be an object")
            xargs = dict(xargs)
            if opts.enabled is not None:
                xargs["svd"] = 1 if opts.enabled else 0
                steering_label = "on" if opts.enabled else "off"
            if opts.vector is not None:
                xargs["svd_vector"] = opts.vector
            if opts.scale is not None:
                xargs["svd_scale"] = opts.scale
            if opts.alpha is not None:
                xargs["svd_alpha"] = opts.alpha
            if opts.enabled:
                name = opts.vector or body.get("model")
                if not isinstance(name, str):
                    raise state.reject(
                        400, "steering", "steering needs a vector or a LoRA model name"
                    )
                entry = state.registry.manifest().vectors.get(name)
                if entry is None:
                    raise state.reject(400, "unknown_vector", f"no steering vector named {name!r}")
                if not entry.enabled:
                    raise state.reject(
                        400, "disabled_vector", f"steering vector {name!r} is disabled"
                    )
            if xargs:
                body["vllm_xargs"] = xargs
        return await _forward(request, "POST", path, body, endpoint, steering_label)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _completions(request, "/v1/completions", "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _completions(request, "/v1/chat/completions", "chat")

    async def _forward(
        request: Request, method: str, path: str, body: dict[str, Any] | None, endpoint: str,
        steering: str,
    ) -> Response:  # fmt: skip
        client = state.http()
        forward = ("authorization", "accept", "user-agent", "x-request-id")
        headers = {k: v for k, v in request.headers.items() if k.lower() in forward}
        upstream = client.build_request(
            method,
            settings.vllm_url + path,
            json=body,
            headers=headers,
            params=request.query_params,
        )
        try:
            resp = await client.send(upstream, stream=True)
        except httpx.HTTPError as e:
            raise state.reject(
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

    return app


def _pyd_msg(e: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()
    )


def _parse_scale(raw: str, state: SidecarState) -> float:
    try:
        v = float(raw)
    except ValueError:
        raise state.reject(
            400, "validation", f"default_scale must be a number, got {raw!r}"
        ) from None
    if not math.isfinite(v):
        raise state.reject(400, "validation", "default_scale must be finite")
    return v


async def _spool_upload(upload: Any, registry: Path, limit: int, state: SidecarState) -> Path:
    """Copy an uploaded file into the registry's upload area, refusing more than ``limit`` bytes."""
    up_dir = registry / ".uploads"
    up_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="upload-", suffix=".safetensors", dir=up_dir)
    path = Path(name)
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            while chunk := await upload.read(1 << 20):
                size += len(chunk)
                if size > limit:
                    raise state.reject(413, "size", f"upload is over the {limit}-byte limit")
                f.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _allowed_path(raw: str, settings: SidecarSettings, state: SidecarState) -> Path:
    try:
        p = Path(raw).expanduser().resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise state.reject(400, "path", f"{raw}: no such file") from e
    roots = [r.expanduser().resolve() for r in settings.allowed_roots]
    if not any(p.is_relative_to(r) for r in roots):
        raise state.reject(
            400, "path_not_allowed",
            f"{raw} is outside the allowed roots "
            f"(SVD_SIDECAR_ALLOWED_ROOTS: {[str(r) for r in roots]})",
        )  # fmt: skip
    if not p.is_file():
        raise state.reject(400, "path", f"{raw}: not a file")
    return p


def _probe_writable(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".probe-", dir=root)
    os.close(fd)
    os.unlink(name)


def _clean_uploads(registry: Path) -> None:
    """Remove uploads left by a killed sidecar (they were never registered)."""
    up_dir = registry / ".uploads"
    if up_dir.is_dir():
        for p in up_dir.glob("upload-*"):
            with contextlib.suppress(OSError):
                p.unlink()
