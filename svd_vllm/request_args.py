"""Per-request steering arguments, as they arrive in ``SamplingParams.extra_args``.

Clients send them in the OpenAI request body as ``vllm_xargs`` (flat scalars; JSON ``true``
arrives as ``1``):

* ``svd``        -- 1 on / 0 off; absent = the server default (``SVD_VLLM_DEFAULT=off|on``).
                    An explicit 0 always wins.
* ``svd_vector`` -- vector name; default = the request's LoRA adapter name.
* ``svd_scale``  -- multiplier on the vector's strength (default: the vector's default scale).
* ``svd_alpha``  -- confidence-mask threshold override in (0, 1].

The LoRA name is stamped by the ``vllm.general_plugins`` hook under ``LORA_KEY``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ALPHA_KEY",
    "ENABLE_KEY",
    "LORA_KEY",
    "MAX_ABS_SCALE",
    "PIN_KEY",
    "SCALE_KEY",
    "VECTOR_KEY",
    "SteeringRequest",
    "default_on",
    "parse_request_args",
]

ENABLE_KEY = "svd"
VECTOR_KEY = "svd_vector"
SCALE_KEY = "svd_scale"
ALPHA_KEY = "svd_alpha"
#: Stamped by the adapter-identity hook: the request's LoRA adapter name.
LORA_KEY = "svd_lora_name"
#: Stamped by the engine on first admission: the exact vector version the request uses.
PIN_KEY = "svd_pinned"
#: Bound on ``|svd_scale|``; override with ``SVD_VLLM_MAX_SCALE``.
MAX_ABS_SCALE = float(os.environ.get("SVD_VLLM_MAX_SCALE", "100"))

_TRUE = {"1", "true", "on", "yes"}
_FALSE = {"0", "false", "off", "no"}


def default_on() -> bool:
    """The server-wide default from ``SVD_VLLM_DEFAULT`` (``off`` unless set to ``on``)."""
    value = os.environ.get("SVD_VLLM_DEFAULT", "off").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE or value == "":
        return False
    raise ValueError(f"SVD_VLLM_DEFAULT must be 'on' or 'off', got {value!r}")


@dataclass(frozen=True)
class SteeringRequest:
    """What one request asks for, before the registry is consulted."""

    enabled: bool  # steer if a vector resolves
    explicit: bool  # the client set ``svd`` itself
    vector: str | None  # the vector to use (explicit name, else the LoRA name)
    vector_explicit: bool  # the client named the vector
    scale: float | None
    alpha: float | None
    pinned: str | None  # "name@version" fixed at first admission


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"vllm_xargs.{ENABLE_KEY} must be 1 or 0 (or true/false), got {value!r}")


def _as_float(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"vllm_xargs.{key} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"vllm_xargs.{key} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"vllm_xargs.{key} must be finite, got {value!r}")
    return out


def parse_request_args(
    extra_args: Mapping[str, Any] | None, *, server_default: bool | None = None
) -> SteeringRequest:
    """Parse and check the steering arguments; ``ValueError`` names the offending field."""
    args = extra_args or {}
    on = default_on() if server_default is None else server_default
    explicit = ENABLE_KEY in args and args[ENABLE_KEY] is not None
    enabled = _as_bool(args[ENABLE_KEY]) if explicit else on
    vector = args.get(VECTOR_KEY)
    vector_explicit = vector is not None
    if vector_explicit and (not isinstance(vector, str) or not vector):
        raise ValueError(f"vllm_xargs.{VECTOR_KEY} must be a vector name, got {vector!r}")
    if vector is None:
        lora = args.get(LORA_KEY)
        vector = lora if isinstance(lora, str) and lora else None
    scale = args.get(SCALE_KEY)
    if scale is not None:
        scale = _as_float(scale, SCALE_KEY)
        if abs(scale) > MAX_ABS_SCALE:
            raise ValueError(
                f"vllm_xargs.{SCALE_KEY} must be within +-{MAX_ABS_SCALE:g}, got {scale:g}"
            )
    alpha = args.get(ALPHA_KEY)
    if alpha is not None:
        alpha = _as_float(alpha, ALPHA_KEY)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"vllm_xargs.{ALPHA_KEY} must be in (0, 1], got {alpha:g}")
    pinned = args.get(PIN_KEY)
    return SteeringRequest(
        enabled=enabled,
        explicit=explicit,
        vector=vector,
        vector_explicit=vector_explicit,
        scale=scale,
        alpha=alpha,
        pinned=pinned if isinstance(pinned, str) else None,
    )
