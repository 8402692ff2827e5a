"""Rules for values that users send, shared by every entry point (CLI, sidecar, vLLM admission).

One place decides what a finite number, an admissible scale or alpha, and a readable pydantic
error look like, so the engine, the sidecar and the registry can never disagree about them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Protocol

from pydantic import Field

from .settings import engine_settings

__all__ = [
    "MAX_ABS_SCALE",
    "Alpha",
    "FiniteFloat",
    "Scale",
    "check_alpha",
    "check_scale",
    "finite",
    "pydantic_message",
]

#: Bound on ``|scale|`` (per request, a vector's default scale): ``SVD_VLLM_MAX_SCALE``, read once
#: when this module is imported (the field types below carry it).
MAX_ABS_SCALE = engine_settings().max_scale


#: pydantic field types: one rule for every model that takes these values (registry entries,
#: artifact metadata, sidecar bodies). A finite float (computed values: numpy scalars pass).
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
#: A strength multiplier a user sets: strictly a number (never a numeric string), finite,
#: within ``+-MAX_ABS_SCALE`` (``check_scale`` is the same rule off pydantic).
Scale = Annotated[
    float, Field(strict=True, allow_inf_nan=False, ge=-MAX_ABS_SCALE, le=MAX_ABS_SCALE)
]
#: A confidence-mask threshold in (0, 1], strictly a number (``check_alpha`` off pydantic).
Alpha = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0.0, le=1.0)]


def finite(value: float, what: str) -> float:
    """``value`` if it is a finite number; ``ValueError`` naming ``what`` otherwise."""
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return value


def check_scale(value: float, what: str) -> float:
    """A finite strength multiplier within ``+-MAX_ABS_SCALE``."""
    finite(value, what)
    if abs(value) > MAX_ABS_SCALE:
        raise ValueError(f"{what} must be within +-{MAX_ABS_SCALE:g}, got {value:g}")
    return value


def check_alpha(value: float, what: str) -> float:
    """A confidence-mask threshold in (0, 1]."""
    finite(value, what)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{what} must be in (0, 1], got {value:g}")
    return value


class _HasErrors(Protocol):
    def errors(self) -> Sequence[Mapping[str, Any]]: ...


def pydantic_message(e: _HasErrors, root: str = "body", under: str = "") -> str:
    """``field.path: message`` per problem, ``; ``-joined (``root`` names a top-level problem;
    ``under`` prefixes every path, for a model that validates one field of a larger body).

    Takes pydantic's ``ValidationError`` and FastAPI's ``RequestValidationError`` alike.
    """
    prefix = f"{under}." if under else ""
    return "; ".join(
        f"{prefix + '.'.join(str(x) for x in err['loc']) if err['loc'] else under or root}: "
        f"{err['msg']}"
        for err in e.errors()
    )
