"""``Annotated`` dependencies: the app's state and the two access levels (write, read)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from .errors import ApiError
from .state import SidecarState

__all__ = ["ReadAccess", "State", "WriteAccess"]


def get_state(request: Request) -> SidecarState:
    state: SidecarState = request.app.state.sidecar
    return state


State = Annotated[SidecarState, Depends(get_state)]


def _check_key(request: Request, state: SidecarState) -> None:
    key = state.settings.api_key
    if key is None:  # dev mode (settings refuse a keyless non-dev start)
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), key.get_secret_value().encode()
    ):
        raise ApiError(401, "unauthorized", "missing or invalid bearer key")


def require_key(request: Request, state: State) -> None:
    """Mutations always need the bearer key (unless the sidecar runs in dev mode)."""
    _check_key(request, state)


def read_access(request: Request, state: State) -> None:
    """Reads need the key only with ``SVD_SIDECAR_READS_REQUIRE_KEY``."""
    if state.settings.reads_require_key:
        _check_key(request, state)


WriteAccess = Annotated[None, Depends(require_key)]
ReadAccess = Annotated[None, Depends(read_access)]
