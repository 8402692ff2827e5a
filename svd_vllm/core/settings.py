"""The engine's settings: every ``SVD_VLLM_*`` variable, read and checked in one place.

vLLM's processes (the plugin, the engine), the CLI and the offline tools all read their settings
through :func:`engine_settings`, so a variable has one name, one type, one default and one error
message; the configuration page of the docs is generated from this class. The sidecar has its
own ``SVD_SIDECAR_*`` settings (``svd_sidecar.settings``).

This module is also the one place in ``svd_vllm`` that touches the process environment
(:func:`environment`, :func:`set_default`), so what the package reads from it is all here.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "ENV_PREFIX",
    "EngineSettings",
    "SettingDoc",
    "SettingsError",
    "describe",
    "engine_settings",
    "environment",
    "set_default",
]

ENV_PREFIX = "SVD_VLLM_"
_TRUE = {"1", "true", "on", "yes"}
_FALSE = {"0", "false", "off", "no"}


class SettingsError(ValueError):
    """A ``SVD_VLLM_*`` variable with a value it cannot take; the message names both."""


class EngineSettings(BaseSettings):
    """Every ``SVD_VLLM_*`` setting (the field name, upper-cased, after the prefix)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=None, extra="ignore", env_ignore_empty=True, frozen=True
    )

    registry: Path = Field(
        Path("~/.local/share/svd-vllm/registry"),
        description="the steering registry directory (vLLM reads it; the sidecar and CLI write it)",
    )
    cache: Path = Field(
        Path("~/.cache/svd-vllm"),
        description="models, tasks, adapters and vectors the offline tools and benchmarks build",
    )
    default: bool = Field(
        False,
        description="steer requests that do not say (`on`/`off`): a request's own `svd` wins",
    )
    host_cache: int = Field(
        64, ge=1, description="vector versions each engine keeps in host memory (LRU)"
    )
    kernel: Literal["auto", "torch"] = Field(
        "auto", description="`auto`: Triton on CUDA when importable; `torch`: always torch"
    )
    max_scale: float = Field(
        100.0,
        gt=0,
        allow_inf_nan=False,
        description="bound on a steering scale's magnitude (per request, and a vector's default)",
    )

    @field_validator("registry", "cache", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("default", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        if isinstance(value, str):
            word = value.strip().lower()
            if word in _TRUE or word in _FALSE:
                return word in _TRUE
            raise ValueError("must be 'on' or 'off'")
        return value

    @field_validator("kernel", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() or "auto" if isinstance(value, str) else value


#: What a failed check says after ``NAME=value``, by pydantic's error type.
_REASONS = {
    "int_parsing": "is not an integer",
    "float_parsing": "is not a number",
    "finite_number": "is not a finite number",
    "literal_error": "is not one of {expected}",
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
}


def _message(err: ValidationError) -> str:
    problems = []
    for e in err.errors():
        name = ENV_PREFIX + str(e["loc"][0]).upper()
        ctx = e.get("ctx") or {}
        if e["type"] == "value_error":
            reason = str(ctx.get("error", e["msg"]))
        elif e["type"] == "literal_error":
            field = EngineSettings.model_fields[str(e["loc"][0])]
            expected = ", ".join(str(v) for v in get_args(field.annotation))
            reason = _REASONS["literal_error"].format(expected=expected)
        else:
            reason = _REASONS.get(e["type"], e["msg"]).format(**ctx)
        problems.append(f"{name}={e['input']!r} {reason}")
    return "; ".join(problems)


def engine_settings() -> EngineSettings:
    """The settings as the environment holds them now, so a test's or a child process's
    environment is seen; a bad value raises :class:`SettingsError`. Parsed again only when a
    ``SVD_VLLM_*`` variable (or ``HOME``, which ``~`` expands to) changed: vLLM's admission and
    the sidecar read it on every request, and a parse costs about 0.3 ms, a scan of the
    environment about 25 us."""
    n = len(ENV_PREFIX)  # pydantic-settings matches names in any case
    key = tuple(sorted((k, v) for k, v in os.environ.items() if k[:n].upper() == ENV_PREFIX))
    return _parsed(key, os.environ.get("HOME"))


@functools.lru_cache(maxsize=16)
def _parsed(variables: tuple[tuple[str, str], ...], home: str | None) -> EngineSettings:
    """``EngineSettings`` of the environment that ``variables`` and ``home`` describe (the
    cache's key; pydantic-settings reads the environment itself)."""
    try:
        return EngineSettings()
    except ValidationError as e:
        raise SettingsError(_message(e)) from None


def environment() -> dict[str, str]:
    """A copy of this process's environment: what a child process it starts inherits."""
    return dict(os.environ)


def set_default(name: str, value: str) -> None:
    """Set an environment variable for this process and its children unless it is set."""
    os.environ.setdefault(name, value)


class SettingDoc(NamedTuple):
    """One setting as the docs and ``--help`` show it."""

    variable: str
    type: str
    default: str
    meaning: str


def _type_name(annotation: Any) -> str:
    """A type as a reader says it (no ``|``: the docs put it in a table cell)."""
    args = get_args(annotation)
    if annotation is SecretStr:
        return "str (secret)"
    if getattr(annotation, "__origin__", None) is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if args and type(None) in args:
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " (optional)"
    name = getattr(annotation, "__name__", None)
    if name is not None and not args:
        return str(name)
    return str(annotation).replace("pathlib.", "")


def describe(settings: type[BaseSettings]) -> list[SettingDoc]:
    """Every field of a settings class: its variable, type, default and description."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    rows = []
    for name, field in settings.model_fields.items():
        if field.default_factory is not None:
            default = "[]" if field.default_factory is list else "see meaning"
        elif field.default is None:
            default = "unset"
        elif isinstance(field.default, bool):
            default = "on" if field.default else "off"
        else:
            default = str(field.default)
        rows.append(
            SettingDoc(
                prefix + name.upper(),
                _type_name(field.annotation),
                default,
                field.description or "",
            )
        )
    return rows
