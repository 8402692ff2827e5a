"""Steered models by name: ``ADAPTER:svd`` and ``ADAPTER:svd-PRESET``.

Many clients (Open WebUI, LangChain's chat models, lm-evaluation-harness, IDE plugins) can only
pick a ``model``. For every served model whose requests can steer (a servable vector or
composition named like it), the front lists steered variants in ``/v1/models``, and a request
for one is proxied as the model itself with steering on:

* ``ADAPTER:svd`` -- ``vllm_xargs = {"svd": 1}``: the vector's (or composition's) default scale;
* ``ADAPTER:svd-NAME`` -- also ``svd_scale`` (and ``svd_alpha``) from the registry's preset
  ``NAME``.

The answer reports the name the client asked for in its ``model`` field(s).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from svd_vllm.registry import Manifest, PresetEntry
from svd_vllm.registry.request import (
    ALPHA_KEY,
    ENABLE_KEY,
    LORA_KEY,
    SCALE_KEY,
    STEERING_KEYS,
    SteeringError,
)

from .errors import ApiError
from .state import SidecarState

__all__ = [
    "SUFFIX",
    "Variant",
    "listed_variants",
    "not_found",
    "rename_event",
    "rename_model",
    "resolve",
]

#: What marks a steered variant: ``ADAPTER:svd`` or ``ADAPTER:svd-PRESET``.
SUFFIX = ":svd"


@dataclass(frozen=True)
class Variant:
    requested: str  # what the client asked for, e.g. "my-lora:svd-strong"
    model: str  # what vLLM serves, e.g. "my-lora"
    xargs: dict[str, Any]  # the steering it stands for


def parse(name: str) -> tuple[str, str | None] | None:
    """(model, preset or None) of a variant name; None for any other model name."""
    model, sep, rest = name.rpartition(SUFFIX)
    if not sep or not model:
        return None
    if rest == "":
        return model, None
    if rest.startswith("-") and len(rest) > 1:
        return model, rest[1:]
    return None


def _xargs(preset: PresetEntry | None) -> dict[str, Any]:
    xargs: dict[str, Any] = {ENABLE_KEY: 1}
    if preset is not None:
        xargs[SCALE_KEY] = preset.scale
        if preset.alpha is not None:
            xargs[ALPHA_KEY] = preset.alpha
    return xargs


def _problem(state: SidecarState, manifest: Manifest, model: str) -> str | None:
    """Why ``model``'s requests cannot steer by default (the engine's admission rule)."""
    try:
        state.admit({ENABLE_KEY: 1, LORA_KEY: model}, manifest)
    except SteeringError as e:
        return str(e)
    return None


def _not_found(name: str, why: str) -> ApiError:
    return ApiError(
        404, "model_not_found", f"The model `{name}` does not exist: {why}", param="model"
    )


def not_found(variant: Variant, refusal: SteeringError) -> ApiError:
    """The 404 a variant gets when admission refuses its steering: the model it names is not
    one this server can serve."""
    return _not_found(variant.requested, f"{variant.model!r} cannot steer ({refusal})")


def resolve(state: SidecarState, body: dict[str, Any]) -> Variant | None:
    """The variant ``body`` asks for; None when its model is not a variant name.

    ``ApiError``: 404 ``model_not_found`` for an unknown preset, 400 ``steering_conflict`` when
    the body also asks for steering itself. Whether the model can steer is the admission check
    that every steered request gets once (``not_found`` words its refusal for a variant).
    """
    requested = body.get("model")
    parsed = parse(requested) if isinstance(requested, str) else None
    if parsed is None:
        return None
    assert isinstance(requested, str)
    model, preset_name = parsed
    manifest = state.registry.manifest()
    preset = None
    if preset_name is not None:
        preset = manifest.presets.get(preset_name)
        if preset is None:
            known = ", ".join(sorted(manifest.presets)) or "none"
            raise _not_found(requested, f"no steering preset named {preset_name!r} ({known})")
    xargs = body.get("vllm_xargs")
    asked = [k for k in STEERING_KEYS if isinstance(xargs, dict) and k in xargs]
    if "steering" in body or asked:
        field = "steering" if "steering" in body else f"vllm_xargs.{asked[0]}"
        raise ApiError(
            400,
            "steering_conflict",
            f"{field}: the model `{requested}` already chooses the steering; ask for `{model}` "
            "to steer with your own settings",
        )
    return Variant(requested, model, _xargs(preset))


def listed_variants(
    state: SidecarState, manifest: Manifest, model: dict[str, Any]
) -> list[dict[str, Any]]:
    """The ``/v1/models`` entries of ``model``'s steered variants: none for a base model (vLLM
    lists LoRA adapters with a ``parent``; only their requests carry the adapter name the engine
    steers by) or for an adapter that cannot steer."""
    name = str(model.get("id"))
    if not model.get("parent") or parse(name) is not None:
        return []
    if _problem(state, manifest, name) is not None:
        return []
    presets: list[PresetEntry | None] = [None, *sorted(manifest.presets.values(), key=_name)]
    out = []
    for preset in presets:
        suffix = SUFFIX if preset is None else f"{SUFFIX}-{preset.name}"
        entry = {k: v for k, v in model.items() if k not in ("id", "svd_steering")}
        entry["id"] = name + suffix
        entry["parent"] = name
        entry["svd_steering"] = {
            "variant_of": name,
            "preset": None if preset is None else preset.name,
            "vllm_xargs": _xargs(preset),
        }
        out.append(entry)
    return out


def _name(p: PresetEntry) -> str:
    return p.name


def rename_model(data: Any, served: str, requested: str) -> Any:
    """``data`` (a JSON answer or stream event) with ``model`` fields that say ``served`` --
    top level, or in a ``response`` / ``message`` object (Responses and Messages APIs) --
    saying ``requested``."""
    if not isinstance(data, dict):
        return data
    if data.get("model") == served:
        data["model"] = requested
    for key in ("response", "message"):
        inner = data.get(key)
        if isinstance(inner, dict) and inner.get("model") == served:
            inner["model"] = requested
    return data


def rename_event(event: bytes, served: str, requested: str) -> bytes:
    """One SSE event with its ``data:`` JSON renamed (anything else unchanged)."""
    lines = event.split(b"\n")
    for i, line in enumerate(lines):
        if line.startswith(b"data: ") and line[6:7] in (b"{", b"["):
            try:
                data = json.loads(line[6:])
            except ValueError:
                continue
            lines[i] = b"data: " + json.dumps(rename_model(data, served, requested)).encode()
    return b"\n".join(lines)
