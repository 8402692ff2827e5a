"""The on-disk steering artifact: one safetensors file per vector.

Layout: tensor ``shift`` (float32, ``[vocab_size]``) and safetensors metadata
``{"format": "svd-vllm-steering", "format_version": "1", "svd_vllm": <JSON of ArtifactMeta>}``.
The content hash covers the shift's bytes and every metadata field except the hash itself
and ``created_at``, so it names the vector's content, and a flipped bit is caught on load.

Torch-free: the file is read and checked with numpy, so the sidecar (which validates and stores
vectors) needs no torch. ``SteeringArtifact.shift`` hands the engine and the offline tools the same
memory as a CPU ``torch.Tensor``, importing torch on first use.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as st_save

if TYPE_CHECKING:
    import torch

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
#: safetensors' dtype codes, named as the engine's torch names them (error messages).
_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}

#: A shift as callers hand it over: a torch tensor (engine, offline tools) or a numpy array.
ShiftLike: TypeAlias = "torch.Tensor | NDArray[Any]"


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


def _as_array(shift: ShiftLike, *, float32: bool = False) -> NDArray[Any]:
    """The shift as a CPU numpy array (a torch tensor's own memory where it can be), cast to
    contiguous float32 when ``float32``."""
    if isinstance(shift, np.ndarray):
        return np.ascontiguousarray(shift, dtype=np.float32) if float32 else shift
    t = shift.detach().cpu()
    if float32:
        import torch

        t = t.to(torch.float32).contiguous()
    try:
        return t.numpy()
    except TypeError:  # a dtype numpy lacks (bfloat16)
        raise ArtifactError(
            "<in memory>", f"tensor 'shift' has dtype {t.dtype}; expected float32", code="dtype"
        ) from None


def content_hash(shift: ShiftLike, meta: ArtifactMeta) -> str:
    """sha256 over the float32 little-endian bytes of ``shift`` and the canonical metadata."""
    h = hashlib.sha256()
    h.update(_as_array(shift, float32=True).astype("<f4").tobytes())
    h.update(json.dumps(meta.hashed_fields(), sort_keys=True, separators=(",", ":")).encode())
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True, init=False, eq=False)
class SteeringArtifact:
    """A validated vector: ``values`` (float32 ``[vocab_size]`` numpy) and its metadata.

    ``shift`` is the same memory as a CPU torch tensor (torch is imported on first use only).
    """

    values: NDArray[Any]
    meta: ArtifactMeta

    def __init__(self, shift: ShiftLike, meta: ArtifactMeta) -> None:
        object.__setattr__(self, "values", _as_array(shift))
        object.__setattr__(self, "meta", meta)

    @property
    def shift(self) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.values)

    @property
    def name(self) -> str:
        return self.meta.name

    @classmethod
    def create(cls, shift: ShiftLike, **meta: Any) -> SteeringArtifact:
        """Build an artifact, filling ``vocab_size`` and ``content_hash``; validates everything."""
        values = _as_array(shift, float32=True)
        meta.setdefault("vocab_size", int(values.shape[-1]) if values.ndim else 0)
        m = ArtifactMeta(**meta)
        _check_shift(values, m, "<in memory>")
        return cls(values, m.model_copy(update={"content_hash": content_hash(values, m)}))


def _check_shift(values: NDArray[Any], meta: ArtifactMeta, source: str | os.PathLike[str]) -> None:
    if values.dtype != np.float32:
        raise ArtifactError(
            source, f"tensor 'shift' has dtype {values.dtype}; expected float32", code="dtype"
        )
    if values.ndim != 1:
        raise ArtifactError(
            source,
            f"tensor 'shift' has shape {tuple(values.shape)}; expected [vocab_size]",
            code="shape",
        )
    if values.shape[0] != meta.vocab_size:
        raise ArtifactError(
            source,
            f"tensor 'shift' has {values.shape[0]} entries but metadata says "
            f"vocab_size={meta.vocab_size}",
            code="shape",
        )
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ArtifactError(
            source,
            f"tensor 'shift' has {bad.size} non-finite values (first at index {int(bad[0])})",
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
    return st_save({_SHIFT_KEY: np.ascontiguousarray(artifact.values)}, metadata=metadata)


def save(artifact: SteeringArtifact, path: str | os.PathLike[str]) -> Path:
    """Validate and write atomically (temp file, fsync, rename). Returns the path."""
    expected = content_hash(artifact.values, artifact.meta)
    if artifact.meta.content_hash != expected:
        raise ArtifactError(
            path, "content_hash does not match the content; build it with create()", code="hash"
        )
    _check_shift(artifact.values, artifact.meta, path)
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
        with safe_open(str(p), framework="numpy") as f:
            header = f.metadata() or {}
            keys = set(f.keys())
            if keys != {_SHIFT_KEY}:
                raise ArtifactError(
                    p, f"expected exactly one tensor 'shift', found {sorted(keys)}", code="shape"
                )
            code = f.get_slice(_SHIFT_KEY).get_dtype()
            if code != "F32":  # checked before reading: numpy has no bfloat16
                name = _DTYPE_NAMES.get(code, code)
                raise ArtifactError(
                    p, f"tensor 'shift' has dtype torch.{name}; expected float32", code="dtype"
                )
            values = f.get_tensor(_SHIFT_KEY)
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
    _check_shift(values, meta, p)
    if meta.content_hash != content_hash(values, meta):
        raise ArtifactError(
            p, "content hash mismatch: the file is corrupted or was edited", code="hash"
        )
    if expected_vocab_size is not None and meta.vocab_size != expected_vocab_size:
        raise ArtifactError(
            p,
            f"vocab_size {meta.vocab_size} does not match the model's {expected_vocab_size}",
            code="vocab",
        )
    return SteeringArtifact(np.ascontiguousarray(values), meta)


def validate(path: str | os.PathLike[str], **kwargs: Any) -> ArtifactMeta:
    """Check an artifact file; returns its metadata or raises ``ArtifactError``."""
    return load(path, **kwargs).meta
