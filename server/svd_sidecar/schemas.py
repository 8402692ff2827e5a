"""Request and response bodies of the sidecar API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from svd_vllm.core.artifact import NAME_PATTERN
from svd_vllm.core.validation import Alpha, Scale
from svd_vllm.registry import MAX_MEMBERS, Member, VectorEntry

__all__ = [
    "ErrorBody",
    "RegisterByPath",
    "SteeringOptions",
    "VectorDetail",
    "VectorInfo",
]


class ErrorDetail(BaseModel):
    code: str
    message: str
    type: str = Field(description="OpenAI's error type, e.g. invalid_request_error")
    param: str | None = Field(None, description="the request field it is about, if any")


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
    status: Literal["ready", "disabled", "unloadable"] = Field(
        description="ready: requests may use it; unloadable: its file is missing or corrupt "
        "(explicit requests get a 400 naming it; see `problem`)"
    )
    problem: str | None = Field(None, description="why it cannot load (status unloadable)")

    @classmethod
    def of(cls, e: VectorEntry, problem: str | None = None) -> VectorInfo:
        status = "unloadable" if problem else ("ready" if e.enabled else "disabled")
        return cls(
            **e.model_dump(exclude={"file"}),
            effective_mu=e.strength(),
            effective_alpha=e.mask_alpha(),
            status=status,
            problem=problem,
        )


class VectorDetail(VectorInfo):
    """Everything about one vector; the artifact's fields are null when it cannot load."""

    mu_bar_exact: float | None
    shift_weighting: str | None
    estimator: str | None
    tokenizer_fingerprint: str | None
    calibration: dict[str, Any] | None


class RegisterByPath(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        min_length=1, max_length=4096, description="artifact file under an allowed root"
    )
    name: str | None = Field(None, pattern=NAME_PATTERN, description="default: the artifact's name")
    default_scale: Scale | None = None


class SteeringOptions(BaseModel):
    """The ``steering`` field the OpenAI-compatible front accepts on every generation endpoint.

    ``vector``/``scale`` name one vector; ``vectors`` composes up to ``MAX_MEMBERS`` (their
    combined shift is applied at strength 1; alpha defaults to the smallest of theirs).
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = Field(None, strict=True)
    scale: Scale | None = None
    vector: str | None = Field(None, strict=True, pattern=NAME_PATTERN)
    vectors: list[Member] | None = Field(
        None, min_length=1, max_length=MAX_MEMBERS, description="each {name, scale}"
    )
    alpha: Alpha | None = None

    @model_validator(mode="after")
    def _one_form(self) -> SteeringOptions:
        if self.vectors is not None:
            if self.vector is not None or self.scale is not None:
                raise ValueError("give either vector/scale or vectors, not both")
            names = [v.vector for v in self.vectors]
            for i, n in enumerate(names):
                if n in names[:i]:
                    raise ValueError(f"vectors[{i}]: {n!r} is listed twice")
        return self
