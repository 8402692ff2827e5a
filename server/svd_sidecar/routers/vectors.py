"""``/v1/steering/vectors``: register, inspect, change and remove steering vectors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from svd_vllm.core import artifact
from svd_vllm.core.artifact import NAME_PATTERN, ArtifactError
from svd_vllm.core.validation import check_scale
from svd_vllm.registry import RegistryError, SettingsPatch, VectorEntry, check_name

from ..deps import ReadAccess, State, WriteAccess
from ..errors import ERROR_RESPONSES, ApiError, validation_error
from ..schemas import ErrorBody, RegisterByPath, VectorDetail, VectorInfo
from ..settings import SidecarSettings
from ..state import SidecarState

__all__ = ["router"]

router = APIRouter(prefix="/v1/steering/vectors", tags=["vectors"], responses=ERROR_RESPONSES)

_REGISTER_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "name": {"type": "string", "pattern": NAME_PATTERN},
                        "default_scale": {"type": "number"},
                    },
                }
            },
            "application/json": {"schema": RegisterByPath.model_json_schema()},
        },
    }
}


def _entry(state: SidecarState, name: str) -> VectorEntry:
    check_name(name)
    return state.registry.get(name)


@router.get("", response_model=list[VectorInfo])
def list_vectors(state: State, _: ReadAccess) -> list[VectorInfo]:
    return [VectorInfo.of(e, state.problem(e)) for e in state.registry.list()]


def _unreadable(e: VectorEntry, problem: str) -> VectorDetail:
    """A vector whose file cannot be read now: its registry entry, the problem, and none of
    the fields only the artifact holds."""
    return VectorDetail(
        **VectorInfo.of(e, problem).model_dump(),
        mu_bar_exact=None,
        shift_weighting=None,
        estimator=None,
        tokenizer_fingerprint=None,
        calibration=None,
    )


@router.get("/{name}", response_model=VectorDetail)
def get_vector(name: str, state: State, _: ReadAccess) -> VectorDetail:
    e = _entry(state, name)
    problem = state.problem(e)
    if problem is not None:  # say what is wrong; the artifact's own fields are unknown
        return _unreadable(e, problem)
    info = VectorInfo.of(e, problem).model_dump()
    try:
        meta = state.registry.load(e).meta
    except (ArtifactError, OSError) as exc:  # changed since the check: report, never a 500
        return _unreadable(e, str(exc))
    return VectorDetail(
        **info,
        mu_bar_exact=meta.mu_bar_exact,
        shift_weighting=meta.shift_weighting,
        estimator=meta.estimator,
        tokenizer_fingerprint=meta.tokenizer_fingerprint,
        calibration=meta.calibration.model_dump(mode="json"),
    )


@router.post(
    "",
    status_code=201,
    response_model=VectorInfo,
    responses={409: {"model": ErrorBody}, 413: {"model": ErrorBody}, 415: {"model": ErrorBody}},
    openapi_extra=_REGISTER_DOC,
)
async def register_vector(
    request: Request,
    state: State,
    _: WriteAccess,
    replace: Annotated[bool, Query(description="replace an existing name")] = False,
) -> VectorInfo:
    ctype = request.headers.get("content-type", "").lower()
    settings = state.settings
    vocab = await state.vocab_size()
    limit = settings.max_upload_bytes
    tmp: Path | None = None
    try:
        if ctype.startswith("multipart/form-data"):
            source, name, scale = await _from_multipart(request, settings)
            tmp = source
        elif ctype.startswith("application/json"):
            try:
                body = RegisterByPath.model_validate_json(await request.body())
            except ValidationError as e:
                raise validation_error(e) from e
            source = _allowed_path(body.path, settings)
            name, scale = body.name, body.default_scale
        else:
            raise ApiError(
                415, "content_type", "send multipart/form-data (file) or application/json (path)"
            )
        if name is not None:
            try:
                check_name(name)
            except RegistryError as e:
                raise ApiError(400, "name", str(e)) from e

        def work() -> VectorEntry:
            art = artifact.load(source, expected_vocab_size=vocab, max_bytes=limit)
            return state.registry.add(art, name=name, replace=replace, default_scale=scale)

        entry = await run_in_threadpool(work)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    state.metrics.registrations.labels("replace" if entry.version > 1 and replace else "add").inc()
    return VectorInfo.of(entry)


@router.patch("/{name}", response_model=VectorInfo)
async def patch_vector(name: str, patch: SettingsPatch, state: State, _: WriteAccess) -> VectorInfo:
    _entry(state, name)
    entry = await run_in_threadpool(state.registry.update, name, patch)
    state.metrics.registrations.labels("patch").inc()
    return VectorInfo.of(entry, await run_in_threadpool(state.problem, entry))


@router.delete("/{name}", status_code=204)
async def delete_vector(name: str, state: State, _: WriteAccess) -> Response:
    _entry(state, name)
    await run_in_threadpool(state.registry.remove, name)
    state.metrics.registrations.labels("delete").inc()
    return Response(status_code=204)


# -- helpers ----------------------------------------------------------------------------------
async def _from_multipart(
    request: Request, settings: SidecarSettings
) -> tuple[Path, str | None, float | None]:
    """(spooled upload, name, default scale) of a multipart registration."""
    limit = settings.max_upload_bytes
    try:  # the body's size is capped as it arrives (limits.BodyLimit)
        form = await request.form(max_files=1, max_fields=4)
    except ApiError:
        raise
    except Exception as e:  # malformed multipart
        raise ApiError(400, "parse", f"malformed multipart body: {e}") from e
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "missing_file", "multipart field 'file' is required")
    name = form.get("name")
    scale_raw = form.get("default_scale")
    scale = _parse_scale(scale_raw) if isinstance(scale_raw, str) and scale_raw else None
    tmp = await _spool_upload(upload, settings.registry, limit)
    return tmp, name if isinstance(name, str) and name else None, scale


def _parse_scale(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, "validation", f"default_scale must be a number, got {raw!r}") from None
    try:
        return check_scale(value, "default_scale")
    except ValueError as e:
        raise ApiError(400, "validation", str(e)) from None


async def _spool_upload(upload: Any, registry: Path, limit: int) -> Path:
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
                    raise ApiError(413, "size", f"upload is over the {limit}-byte limit")
                f.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _allowed_path(raw: str, settings: SidecarSettings) -> Path:
    try:
        p = Path(raw).expanduser().resolve(strict=True)
    except (OSError, RuntimeError, ValueError) as e:  # ValueError: an embedded NUL byte
        raise ApiError(400, "path", f"{raw}: no such file") from e
    roots = [r.expanduser().resolve() for r in settings.allowed_roots]
    if not any(p.is_relative_to(r) for r in roots):
        raise ApiError(
            400,
            "path_not_allowed",
            f"{raw} is outside the allowed roots "
            f"(SVD_SIDECAR_ALLOWED_ROOTS: {[str(r) for r in roots]})",
        )
    if not p.is_file():
        raise ApiError(400, "path", f"{raw}: not a file")
    return p
