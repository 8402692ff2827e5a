"""Typed errors and their HTTP answers: every refusal is ``{"error": {"code", "message"}}``.

Routers raise ``ApiError`` (or let a ``RegistryError`` / ``ArtifactError`` through); the
handlers here turn them into responses and count each refusal by its code.
"""

from __future__ import annotations

import errno
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from svd_vllm.core.artifact import ArtifactError
from svd_vllm.core.validation import pydantic_message
from svd_vllm.registry import RegistryError

from .metrics import SidecarMetrics
from .schemas import ErrorBody

__all__ = [
    "ERROR_RESPONSES",
    "ApiError",
    "error_body",
    "install_handlers",
    "registry_status",
    "validation_error",
]

#: OpenAPI ``responses`` for the management routes.
ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorBody},
    401: {"model": ErrorBody},
    404: {"model": ErrorBody},
}
_REGISTRY_STATUS = {"not_found": 404, "conflict": 409, "unreadable": 503}


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """``{"error": {...}}`` in OpenAI's shape (``message``, ``type``, ``param``, ``code``), so
    OpenAI SDKs surface the message and code of every refusal, ours as vLLM's."""
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"error": {"code": code, "message": message, "type": kind, "param": param}}


_ERROR_TYPES = {401: "authentication_error", 408: "timeout_error", 504: "timeout_error"}


class ApiError(HTTPException):
    """A refusal with an HTTP status, a stable machine-readable code and a message (``param``:
    the request field it is about, when there is one)."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(status_code=status, detail=error_body(status, code, message, param))
        self.code = code
        self.message = message


def registry_status(e: RegistryError) -> int:
    """The HTTP status of a registry refusal: 404 unknown name, 409 conflict, 503 when the
    manifest cannot be read (the registry, not the request, is at fault), else 400."""
    return _REGISTRY_STATUS.get(e.code, 400)


def install_handlers(app: FastAPI, metrics: SidecarMetrics) -> None:
    """Answer ``ApiError``, ``RegistryError``, ``ArtifactError`` and validation errors."""

    def refuse(status: int, code: str, message: str) -> JSONResponse:
        metrics.rejections.labels(code).inc()
        return JSONResponse(error_body(status, code, message), status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        metrics.rejections.labels(exc.code).inc()
        return JSONResponse(exc.detail, status_code=exc.status_code)

    @app.exception_handler(RegistryError)
    async def _registry_error(_: Request, exc: RegistryError) -> JSONResponse:
        return refuse(registry_status(exc), exc.code, str(exc))

    @app.exception_handler(ArtifactError)
    async def _artifact_error(_: Request, exc: ArtifactError) -> JSONResponse:
        return refuse(400, exc.code, f"invalid artifact: {exc.problem}")

    @app.exception_handler(OSError)
    async def _os_error(_: Request, exc: OSError) -> JSONResponse:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return refuse(507, "storage_full", "the registry's disk is full; nothing was changed")
        return refuse(503, "storage", f"the registry cannot be written: {exc.strerror or exc}")

    @app.exception_handler(ClientDisconnect)
    async def _client_left(_: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client closed the connection before its body was complete: nobody reads this
        # answer, and it is not a server fault (counted, not logged as a crash).
        return refuse(400, "client_disconnected", "the client left before sending its body")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return refuse(422, "validation", pydantic_message(exc))


def validation_error(e: ValueError, code: str = "validation", prefix: str = "") -> ApiError:
    """A 400 for a pydantic ``ValidationError`` (or a plain ``ValueError``)."""
    msg = pydantic_message(e) if isinstance(e, ValidationError) else str(e)
    return ApiError(400, code, prefix + msg)
