"""Request and response bodies of the sidecar API."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from svd_vllm.artifact import NAME_PATTERN
from svd_vllm.registry import VectorEntry
from svd_vllm.request_args import MAX_ABS_SCALE

__all__ = [
    "ErrorBody",
    "RegisterByPath",
    "SteeringOptions",
    "VectorDetail",
    "VectorInfo",
    "VectorPatch",
]


def _finite(v: float | None) -> float | None:
    if v is not None and not math.isfinite(v):
        raise ValueError("must be finite")
    return v


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class VectorInfo(BaseModel):
    name: str
    version: int
    content_hash: str
    vocab_size: int
    base_model: str
    adapter: str
    mu_bar: float = Field(description="calibrated strength (from the artifact)")
    alpha: float = Field(description="calibrated mask threshold (from the artifact)")
    mu_bar_override: float | None
    alpha_override: float | None
    default_scale: float
    effective_mu: float = Field(description="strength a request with no scale gets")
    effective_alpha: float
    enabled: bool
    created: str
    updated: str

    @classmethod
    def of(cls, e: VectorEntry) -> VectorInfo:
        return cls(
            **e.model_dump(exclude={"file"}),
            effective_mu=e.effective_mu,
            effective_alpha=e.effective_alpha,
        )


class VectorDetail(VectorInfo):
    mu_bar_exact: float | None
    shift_weighting: str
    estimator: str
    tokenizer_fingerprint: str
    calibration: dict[str, Any]


class RegisterByPath(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        min_length=1, max_length=4096, description="artifact file under an allowed root"
    )
    name: str | None = Field(None, pattern=NAME_PATTERN, description="default: the artifact's name")
    default_scale: float | None = Field(None, ge=-MAX_ABS_SCALE, le=MAX_ABS_SCALE)

    _f = field_validator("default_scale")(lambda cls, v: _finite(v))


class VectorPatch(BaseModel):
    """Strength settings; each accepted change bumps the vector's version."""

    model_config = ConfigDict(extra="forbid")

    default_scale: float | None = Field(None, ge=-MAX_ABS_SCALE, le=MAX_ABS_SCALE)
    mu_bar: float | None = Field(None, ge=-1e6, le=1e6, description="override; null clears it")
    alpha: float | None = Field(None, gt=0.0, le=1.0, description="override; null clears it")
    enabled: bool | None = None

    _f = field_validator("default_scale", "mu_bar")(lambda cls, v: _finite(v))


class SteeringOptions(BaseModel):
    """The ``steering`` field the OpenAI-compatible front accepts on completions."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = None
    scale: float | None = Field(None, ge=-MAX_ABS_SCALE, le=MAX_ABS_SCALE)
    vector: str | None = Field(None, pattern=NAME_PATTERN)
    alpha: float | None = Field(None, gt=0.0, le=1.0)

    _f = field_validator("scale")(lambda cls, v: _finite(v))
