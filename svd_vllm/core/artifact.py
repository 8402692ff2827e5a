"""The on-disk steering artifact: one safetensors file per vector.

Layout: tensor ``shift`` (float32, ``[vocab_size]``) and safetensors metadata
``{"format": "svd-vllm-steering", "format_version": "1", "svd_vllm": <JSON of ArtifactMeta>}``.
The content hash covers the shift's bytes and every metadata field except the hash itself
and ``created_at``, so it names the vector's content, and a flipped bit is caught on load.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from .validation import Alpha, FiniteFloat, pydantic_message

__all__ = [
    "ARTIFACT_FORMAT",
    "FORMAT_VERSION",
    "MAX_ARTIFACT_BYTES",
    "NAME_PATTERN",
    "ArtifactError",
    "ArtifactMeta",
    "ArtifactProblem",
    "CalibrationStats",
    "SteeringArtifact",
    "atomic_write_bytes",
    "content_hash",
    "load",
    "save",
    "validate",
]

ARTIFACT_FORMAT = "svd-vllm-steering"
FORMAT_VERSION = 1
#: Refuse files larger than this (a 262k-vocab float32 shift is 1 MiB).
MAX_ARTIFACT_BYTES = 64 * 1024 * 1024
#: Vector names: no path separators, bounded length; safe as file names and URL segments.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_SHIFT_KEY = "shift"
_META_KEY = "svd_vllm"


ArtifactProblem = Literal[
    "not_found",
    "size",
    "parse",
    "shape",
    "dtype",
    "non_finite",
    "vocab",
    "metadata",
    "format",
    "hash",
]


class ArtifactError(ValueError):
    """A steering artifact that cannot be used; the message names the file and the problem.

    ``code`` says which kind of problem it is, so callers (the sidecar's HTTP errors) never
    have to read the message.
    """

    def __init__(
        self, source: str | os.PathLike[str], problem: str, *, code: ArtifactProblem
    ) -> None:
        self.source = str(source)
        self.problem = problem
        self.code: ArtifactProblem = code
        super().__init__(f"{self.source}: {problem}")


class CalibrationStats(BaseModel):
    """What the strength calibration saw (all finite)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    items: int = Field(0, ge=0, description="calibration items (examples)")
    tokens: int = Field(0, ge=0, description="label tokens teacher-forced")
    positions: int = Field(0, ge=0, description="tokens with a non-zero masked dz (used for mu*)")
    mu_mean: FiniteFloat = 0.0
    mu_median: FiniteFloat = 0.0
    mu_std: FiniteFloat = 0.0
    estimators: dict[str, FiniteFloat] = Field(
        default_factory=dict, description="mu from every estimator, by name"
    )
    nll: dict[str, FiniteFloat] = Field(
        default_factory=dict, description="calibration NLL per estimator / baseline"
    )


class ArtifactMeta(BaseModel):
    """Everything a server needs to trust and apply a vector, besides the vector itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    format_version: int = FORMAT_VERSION
    base_model: str = Field(min_length=1, description="identity of the base model")
    adapter: str = Field(min_length=1, description="identity of the PEFT adapter")
    vocab_size: int = Field(gt=0, description="logits width of the served model")
    tokenizer_fingerprint: str = Field(min_length=1)
    mu_bar: FiniteFloat = Field(description="strength for the precomputed direction")
    mu_bar_exact: FiniteFloat | None = Field(
        None, description="strength for exact SVD, if calibrated"
    )
    alpha: Alpha = Field(0.1, description="confidence-mask threshold")
    shift_weighting: str = Field("prob", description="'prob' (p-weighted) or 'mean'")
    estimator: str = Field("pooled", description="estimator that chose mu_bar")
    calibration: CalibrationStats = Field(default_factory=CalibrationStats)
    created_at: str = Field(
        default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    )
    content_hash: str = ""

    @field_validator("format_version")
    @classmethod
    def _check_version(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(
                f"format_version {v} is not supported (this build reads {FORMAT_VERSION})"
            )
        return v

    def hashed_fields(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"content_hash", "created_at"})


def content_hash(shift: torch.Tensor, meta: ArtifactMeta) -> str:
    """sha256 over the float32 little-endian bytes of ``shift`` and the canonical metadata."""
    h = hashlib.sha256()
    h.update(shift.detach().to(torch.float32).contiguous().cpu().numpy().astype("<f4").tobytes())
    h.update(json.dumps(meta.hashed_fields(), sort_keys=True, separators=(",", ":")).encode())
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class SteeringArtifact:
    """A validated vector: ``shift`` (float32 ``[vocab_size]``, CPU) and its metadata."""

    shift: torch.Tensor
    meta: ArtifactMeta

    @property
    def name(self) -> str:
        return self.meta.name

    @classmethod
    def create(cls, shift: torch.Tensor, **meta: Any) -> SteeringArtifact:
        """Build an artifact, filling ``vocab_size`` and ``content_hash``; validates everything."""
        shift = shift.detach().to(torch.float32).contiguous().cpu()
        meta.setdefault("vocab_size", int(shift.shape[-1]) if shift.dim() else 0)
        m = ArtifactMeta(**meta)
        art = cls(shift=shift, meta=m)
        _check_shift(art.shift, m, "<in memory>")
        return cls(shift=shift, meta=m.model_copy(update={"content_hash": content_hash(shift, m)}))


def _check_shift(shift: torch.Tensor, meta: ArtifactMeta, source: str | os.PathLike[str]) -> None:
    if shift.dtype != torch.float32:
        raise ArtifactError(
            source, f"tensor 'shift' has dtype {shift.dtype}; expected float32", code="dtype"
        )
    if shift.dim() != 1:
        raise ArtifactError(
            source,
            f"tensor 'shift' has shape {tuple(shift.shape)}; expected [vocab_size]",
            code="shape",
        )
    if shift.shape[0] != meta.vocab_size:
        raise ArtifactError(
            source,
            f"tensor 'shift' has {shift.shape[0]} entries but metadata says "
            f"vocab_size={meta.vocab_size}",
            code="shape",
        )
    bad = (~torch.isfinite(shift)).nonzero()
    if bad.numel():
        raise ArtifactError(
            source,
            f"tensor 'shift' has {bad.numel()} non-finite values (first at index {int(bad[0, 0])})",
            code="non_finite",
        )


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path``: readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def to_bytes(artifact: SteeringArtifact) -> bytes:
    """The safetensors serialisation of an artifact."""
    metadata = {
        "format": ARTIFACT_FORMAT,
        "format_version": str(artifact.meta.format_version),
        _META_KEY: artifact.meta.model_dump_json(),
    }
    return st_save({_SHIFT_KEY: artifact.shift.contiguous()}, metadata=metadata)


def save(artifact: SteeringArtifact, path: str | os.PathLike[str]) -> Path:
    """Validate and write atomically (temp file, fsync, rename). Returns the path."""
    expected = content_hash(artifact.shift, artifact.meta)
    if artifact.meta.content_hash != expected:
        raise ArtifactError(
            path, "content_hash does not match the content; build it with create()", code="hash"
        )
    _check_shift(artifact.shift, artifact.meta, path)
    atomic_write_bytes(path, to_bytes(artifact))
    return Path(path)


def load(
    path: str | os.PathLike[str],
    *,
    expected_vocab_size: int | None = None,
    max_bytes: int = MAX_ARTIFACT_BYTES,
) -> SteeringArtifact:
    """Read and fully validate an artifact; any problem raises ``ArtifactError`` naming it."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(p, "no such file", code="not_found")
    size = p.stat().st_size
    if size > max_bytes:
        raise ArtifactError(
            p, f"file is {size} bytes, over the {max_bytes}-byte limit", code="size"
        )
    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
            keys = set(f.keys())
            if keys != {_SHIFT_KEY}:
                raise ArtifactError(
                    p, f"expected exactly one tensor 'shift', found {sorted(keys)}", code="shape"
                )
            shift = f.get_tensor(_SHIFT_KEY)
    except SafetensorError as e:
        raise ArtifactError(p, f"not a readable safetensors file ({e})", code="parse") from e
    except ArtifactError:
        raise
    except Exception as e:  # malformed headers surface as assorted errors
        raise ArtifactError(
            p, f"not a readable safetensors file ({type(e).__name__}: {e})", code="parse"
        ) from e
    if header.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(
            p,
            f"metadata 'format' is {header.get('format')!r}; expected {ARTIFACT_FORMAT!r}",
            code="format",
        )
    if header.get("format_version") != str(FORMAT_VERSION):
        raise ArtifactError(
            p,
            f"format_version {header.get('format_version')!r} is not supported "
            f"(this build reads {FORMAT_VERSION})",
            code="format",
        )
    raw = header.get(_META_KEY)
    if raw is None:
        raise ArtifactError(p, f"metadata key {_META_KEY!r} is missing", code="metadata")
    try:
        meta = ArtifactMeta.model_validate_json(raw)
    except ValidationError as e:
        problems = pydantic_message(e, root="metadata")
        raise ArtifactError(p, f"invalid metadata: {problems}", code="metadata") from e
    _check_shift(shift, meta, p)
    if meta.content_hash != content_hash(shift, meta):
        raise ArtifactError(
            p, "content hash mismatch: the file is corrupted or was edited", code="hash"
        )
    if expected_vocab_size is not None and meta.vocab_size != expected_vocab_size:
        raise ArtifactError(
            p,
            f"vocab_size {meta.vocab_size} does not match the model's {expected_vocab_size}",
            code="vocab",
        )
    return SteeringArtifact(shift=shift.contiguous(), meta=meta)


def validate(path: str | os.PathLike[str], **kwargs: Any) -> ArtifactMeta:
    """Check an artifact file; returns its metadata or raises ``ArtifactError``."""
    return load(path, **kwargs).meta
