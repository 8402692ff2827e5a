"""The registry's manifest schema: what ``manifest.json`` holds (vectors, compositions, presets)
and the rules an entry obeys. Pure pydantic models: the store that reads and writes them is
``directory``; the request contract (``request``) checks requests against them.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Any, ClassVar, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from ..core.artifact import NAME_PATTERN
from ..core.validation import Alpha, FiniteFloat, Scale

__all__ = [
    "MANIFEST_FORMAT",
    "MAX_MEMBERS",
    "PRESET_PATTERN",
    "CompositionEntry",
    "Manifest",
    "Member",
    "PresetEntry",
    "RegistryError",
    "RegistryErrorCode",
    "SettingsPatch",
    "VectorEntry",
    "check_name",
    "servable",
]

MANIFEST_FORMAT = 1
_NAME_RE = re.compile(NAME_PATTERN)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


#: Why a registry operation failed (``RegistryError.code``; the sidecar answers with it).
RegistryErrorCode = Literal[
    "invalid",  # a bad name or argument
    "validation",  # a manifest, entry or patch that fails its schema
    "not_found",  # no vector / composition / preset of that name
    "conflict",  # the name is taken, or a composition still uses the vector
    "unreadable",  # the manifest cannot be parsed
    "empty_patch",  # a settings change that changes nothing
    "unknown_vector",  # ``servable``: no such vector
    "disabled_vector",  # ``servable``: the vector is switched off
]


class RegistryError(ValueError):
    """A registry operation that cannot be done; nothing was written."""

    def __init__(self, message: str, *, code: RegistryErrorCode = "invalid") -> None:
        self.code: RegistryErrorCode = code
        super().__init__(message)


class VectorEntry(BaseModel):
    """One registered vector: the file of its current version and its serving settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    version: int = Field(ge=1)
    content_hash: str
    file: str = Field(description="path relative to the registry root")
    vocab_size: int = Field(gt=0)
    base_model: str
    adapter: str
    mu_bar: FiniteFloat = Field(description="calibrated strength from the artifact")
    alpha: Alpha = Field(description="calibrated mask threshold")
    mu_bar_override: FiniteFloat | None = None
    alpha_override: Alpha | None = None
    # Bounded by ``check_scale`` when written, not when read: a manifest written under a larger
    # SVD_VLLM_MAX_SCALE must still load.
    default_scale: FiniteFloat = 1.0
    enabled: bool = True
    created: str = Field(default_factory=_now)
    updated: str = Field(default_factory=_now)

    def strength(self, scale: float | None = None) -> float:
        """The ``mu`` a request steers with: the override or the calibrated strength, times the
        request's ``scale`` (default: this vector's ``default_scale``). The one rule for it."""
        mu = self.mu_bar if self.mu_bar_override is None else self.mu_bar_override
        return mu * (self.default_scale if scale is None else scale)

    def mask_alpha(self, alpha: float | None = None) -> float:
        """The confidence-mask threshold: the request's, else the override, else calibrated."""
        if alpha is not None:
            return alpha
        return self.alpha if self.alpha_override is None else self.alpha_override

    @property
    def key(self) -> str:
        """Identity of this exact version and content: ``name@version#hash12``.

        The content hash is part of it because versions restart when a registry is deleted (or
        an older manifest restored): an engine that cached ``name@1`` must never serve those
        bytes for a different ``name@1``.
        """
        return f"{self.name}@{self.version}#{self.content_hash.split(':')[-1][:12]}"


#: The most vectors one composition may combine.
MAX_MEMBERS = 8


class Member(BaseModel):
    """One vector of a composition and its scale (None: the vector's default scale): a
    registered composition's member, and an item of a request's ``steering.vectors``. Input may
    call the vector ``vector`` or ``name``."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    vector: str = Field(
        strict=True, pattern=NAME_PATTERN, validation_alias=AliasChoices("vector", "name")
    )
    scale: Scale | None = None


class CompositionEntry(BaseModel):
    """A named composition of registered vectors: the default steering of the LoRA adapter of
    the same name (or of requests that name it), combined at request time from the members'
    current versions, each pinned per request like a single vector."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    members: tuple[Member, ...] = Field(min_length=1, max_length=MAX_MEMBERS)
    alpha: Alpha | None = Field(None, description="default: the members' min")
    enabled: bool = True
    version: int = Field(1, ge=1)
    created: str = Field(default_factory=_now)
    updated: str = Field(default_factory=_now)

    @field_validator("members")
    @classmethod
    def _distinct(cls, v: tuple[Member, ...]) -> tuple[Member, ...]:
        names = [m.vector for m in v]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise ValueError(f"members[{i}]: {n!r} is listed twice")
        return v


#: A preset's name: the suffix of the steered model names it adds (``MODEL:svd-NAME``).
PRESET_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"
_PRESET_RE = re.compile(PRESET_PATTERN)


class PresetEntry(BaseModel):
    """A named steering strength: every steered model is also offered as ``MODEL:svd-NAME``,
    which steers with ``svd_scale = scale`` (and ``svd_alpha = alpha`` when set), for clients
    that can only pick a model name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(strict=True, pattern=PRESET_PATTERN)
    scale: Scale
    alpha: Alpha | None = None
    version: int = Field(1, ge=1)
    created: str = Field(default_factory=_now)
    updated: str = Field(default_factory=_now)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: int = MANIFEST_FORMAT
    generation: int = 0
    vectors: dict[str, VectorEntry] = Field(default_factory=dict)
    last_version: dict[str, int] = Field(
        default_factory=dict, description="highest version ever issued per name"
    )
    compositions: dict[str, CompositionEntry] = Field(default_factory=dict)
    #: Written only when there are some, so engines of earlier releases still read the file.
    presets: dict[str, PresetEntry] = Field(default_factory=dict)


def servable(entry: VectorEntry | None, name: str) -> VectorEntry:
    """``entry`` if a request may steer with it: it exists and is enabled.

    The one rule for "this vector can serve", used by vLLM admission, the engine and the
    sidecar. ``RegistryError`` codes: ``unknown_vector``, ``disabled_vector``.
    """
    if entry is None:
        raise RegistryError(f"no steering vector named {name!r}", code="unknown_vector")
    if not entry.enabled:
        raise RegistryError(f"steering vector {name!r} is disabled", code="disabled_vector")
    return entry


class SettingsPatch(BaseModel):
    """A change to a vector's serving settings (the sidecar's PATCH body, ``registry set``).

    Unset fields are left alone; ``mu_bar`` / ``alpha`` set to null clear the override.
    """

    model_config = ConfigDict(extra="forbid")

    default_scale: Scale | None = None
    mu_bar: FiniteFloat | None = Field(
        None, strict=True, ge=-1e6, le=1e6, description="override; null clears it"
    )
    alpha: Alpha | None = Field(None, description="override; null clears it")
    enabled: bool | None = Field(None, strict=True)

    def changes(self) -> dict[str, Any]:
        """The ``VectorEntry`` fields this patch sets; ``RegistryError`` if it sets none."""
        fields = self.model_fields_set
        if not fields:
            raise RegistryError("nothing to change", code="empty_patch")
        for required in ("default_scale", "enabled"):
            if required in fields and getattr(self, required) is None:
                raise RegistryError(f"{required} cannot be null", code="validation")
        out: dict[str, Any] = {}
        for field, target in self._TARGETS.items():
            if field in fields:
                out[target] = getattr(self, field)
        return out

    _TARGETS: ClassVar[dict[str, str]] = {
        "default_scale": "default_scale",
        "mu_bar": "mu_bar_override",
        "alpha": "alpha_override",
        "enabled": "enabled",
    }


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):  # '$' would allow a '\n'
        raise RegistryError(
            f"invalid vector name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            code="invalid",
        )
    return name
