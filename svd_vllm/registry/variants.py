"""Steered models by name: ``ADAPTER:svd`` and ``ADAPTER:svd-PRESET``, the one rule.

Many clients (Open WebUI, LangChain's chat models, lm-evaluation-harness, IDE plugins) can only
pick a ``model``. Every served LoRA adapter whose requests can steer is also offered as

* ``ADAPTER:svd`` -- the adapter with ``vllm_xargs = {"svd": 1}`` (its vector's default scale);
* ``ADAPTER:svd-NAME`` -- also ``svd_scale`` (and ``svd_alpha``) from the registry's preset
  ``NAME``.

A request for one runs as the adapter itself (the same LoRA slot) with that steering, and its
answer names the model asked for. vLLM (the plugin) and the sidecar both apply this module, so the
names, the steering they stand for and their refusals are the same through either. Pure: no vLLM,
no HTTP.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .manifest import Manifest, PresetEntry
from .request import ALPHA_KEY, ENABLE_KEY, SCALE_KEY, STEERING_KEYS

__all__ = [
    "SUFFIX",
    "Variant",
    "VariantError",
    "cannot_steer",
    "listed",
    "not_found",
    "parse",
    "preset_xargs",
    "steering_xargs",
]

#: What marks a steered variant: ``ADAPTER:svd`` or ``ADAPTER:svd-PRESET``.
SUFFIX = ":svd"


class VariantError(ValueError):
    """A variant name that cannot be served: ``code`` is ``model_not_found`` (HTTP 404) or
    ``steering_conflict`` (HTTP 400, the request also asks for steering itself)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    @property
    def status(self) -> int:
        return 400 if self.code == "steering_conflict" else 404


@dataclass(frozen=True)
class Variant:
    requested: str  # what the client asked for, e.g. "my-lora:svd-strong"
    model: str  # the adapter vLLM serves, e.g. "my-lora"
    preset: str | None  # e.g. "strong"


def parse(name: object) -> Variant | None:
    """The variant ``name`` asks for; None for any other model name (or a non-string)."""
    if not isinstance(name, str):
        return None
    model, sep, rest = name.rpartition(SUFFIX)
    if not sep or not model:
        return None
    if rest == "":
        return Variant(name, model, None)
    if rest.startswith("-") and len(rest) > 1:
        return Variant(name, model, rest[1:])
    return None


def not_found(requested: str, why: str) -> VariantError:
    return VariantError("model_not_found", f"The model `{requested}` does not exist: {why}")


def cannot_steer(variant: Variant, refusal: Exception) -> VariantError:
    """The 404 a variant gets when admission refuses its adapter's steering."""
    return not_found(variant.requested, f"{variant.model!r} cannot steer ({refusal})")


def preset_xargs(preset: PresetEntry | None) -> dict[str, Any]:
    """The steering a variant with ``preset`` (or none) stands for."""
    xargs: dict[str, Any] = {ENABLE_KEY: 1}
    if preset is not None:
        xargs[SCALE_KEY] = preset.scale
        if preset.alpha is not None:
            xargs[ALPHA_KEY] = preset.alpha
    return xargs


def steering_xargs(
    variant: Variant,
    manifest: Manifest,
    xargs: Mapping[str, Any] | None,
    conflicting_field: str | None = None,
) -> dict[str, Any]:
    """``xargs`` (the request's own ``vllm_xargs``) with the variant's steering added.

    ``VariantError``: 404 for an unknown preset; 400 when the request also asks for steering
    (a steering key in ``xargs``, or ``conflicting_field``, e.g. the sidecar's ``steering``).
    Whether the adapter can steer is the admission check that every steered request gets.
    """
    preset = None
    if variant.preset is not None:
        preset = manifest.presets.get(variant.preset)
        if preset is None:
            known = ", ".join(sorted(manifest.presets)) or "none"
            raise not_found(
                variant.requested, f"no steering preset named {variant.preset!r} ({known})"
            )
    asked = [k for k in STEERING_KEYS if xargs and k in xargs]
    field = conflicting_field or (f"vllm_xargs.{asked[0]}" if asked else None)
    if field is not None:
        raise VariantError(
            "steering_conflict",
            f"{field}: the model `{variant.requested}` already chooses the steering; ask for "
            f"`{variant.model}` to steer with your own settings",
        )
    return {**(xargs or {}), **preset_xargs(preset)}


def listed(model: str, manifest: Manifest) -> list[tuple[str, dict[str, Any]]]:
    """``(name, svd_steering info)`` of each variant of ``model`` (an adapter that can steer):
    ``model:svd`` first, then one per preset by name."""
    presets: list[PresetEntry | None] = [None, *sorted(manifest.presets.values(), key=_name)]
    out = []
    for preset in presets:
        suffix = SUFFIX if preset is None else f"{SUFFIX}-{preset.name}"
        info = {
            "variant_of": model,
            "preset": None if preset is None else preset.name,
            "vllm_xargs": preset_xargs(preset),
        }
        out.append((model + suffix, info))
    return out


def _name(p: PresetEntry) -> str:
    return p.name
