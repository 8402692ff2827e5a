"""Steered models by name (``ADAPTER:svd``, ``ADAPTER:svd-PRESET``) through the sidecar.

The names, the steering they stand for and their refusals are ``svd_vllm.registry.variants``
(the rule vLLM's plugin applies too); this module turns them into the sidecar's HTTP answers:
the ``/v1/models`` entries, the ``ApiError`` refusals, and the ``model`` fields of an answer
renamed back to the name the client asked for.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from svd_vllm.registry import Manifest
from svd_vllm.registry import variants as rule
from svd_vllm.registry.request import ENABLE_KEY, LORA_KEY, SteeringError
from svd_vllm.registry.variants import Variant, VariantError

from .errors import ApiError
from .state import SidecarState

__all__ = [
    "Variant",
    "is_listed_variant",
    "listed_variants",
    "not_found",
    "rename_events",
    "rename_model",
    "resolve",
]


def _api_error(e: VariantError) -> ApiError:
    return ApiError(e.status, e.code, str(e), param="model" if e.status == 404 else None)


def not_found(variant: Variant, refusal: SteeringError) -> ApiError:
    """The 404 a variant gets when admission refuses its steering: the model it names is not
    one this server can serve."""
    return _api_error(rule.cannot_steer(variant, refusal))


def resolve(state: SidecarState, body: dict[str, Any]) -> tuple[Variant, dict[str, Any]] | None:
    """The variant ``body`` asks for and its ``vllm_xargs`` with the variant's steering; None
    when its model is not a variant name. ``ApiError``: the rule's refusals."""
    variant = rule.parse(body.get("model"))
    if variant is None:
        return None
    xargs = body.get("vllm_xargs")
    try:
        steered = rule.steering_xargs(
            variant,
            state.manifest(),
            xargs if isinstance(xargs, dict) else None,
            conflicting_field="steering" if "steering" in body else None,
        )
    except VariantError as e:
        raise _api_error(e) from None
    return variant, steered


def listed_variants(
    state: SidecarState, manifest: Manifest, model: dict[str, Any]
) -> list[dict[str, Any]]:
    """The ``/v1/models`` entries of ``model``'s steered variants: none for a base model (vLLM
    lists LoRA adapters with a ``parent``; only their requests carry the adapter name the engine
    steers by) or for an adapter that cannot steer."""
    name = str(model.get("id"))
    if not model.get("parent") or rule.parse(name) is not None:
        return []
    try:
        state.admit({ENABLE_KEY: 1, LORA_KEY: name}, manifest)
    except SteeringError:
        return []
    out = []
    for variant, info in rule.listed(name, manifest):
        entry = {k: v for k, v in model.items() if k not in ("id", "svd_steering")}
        out.append(entry | {"id": variant, "parent": name, "svd_steering": info})
    return out


def is_listed_variant(model: Any) -> bool:
    """Whether a ``/v1/models`` entry is a steered variant (vLLM's plugin lists them too)."""
    info = model.get("svd_steering") if isinstance(model, dict) else None
    return isinstance(info, dict) and "variant_of" in info


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


def rename_events(events: bytes, served: str, requested: str) -> bytes:
    """Complete SSE events with the ``model`` fields of their ``data:`` JSON renamed.

    vLLM writes compact JSON, so ``"model":"<served>"`` is replaced as bytes, with no decode:
    inside a JSON string every quote is escaped, so the pattern can only be a real ``model``
    key. An event that names ``"model"`` in another spelling is decoded and renamed instead
    (``rename_model``); anything else passes unchanged.
    """
    compact, renamed, quoted = _patterns(served, requested)
    events = events.replace(compact, renamed)
    if quoted not in events or b'"model"' not in events:
        return events
    lines = events.split(b"\n")
    for i, line in enumerate(lines):
        if line.startswith(b"data: ") and line[6:7] in (b"{", b"["):
            try:
                data = json.loads(line[6:])
            except ValueError:
                continue
            lines[i] = b"data: " + json.dumps(rename_model(data, served, requested)).encode()
    return b"\n".join(lines)


@functools.lru_cache(maxsize=256)
def _patterns(served: str, requested: str) -> tuple[bytes, bytes, bytes]:
    """``"model":"<served>"``, its replacement, and ``"<served>"`` (made once per name pair, not
    once per event)."""
    quoted = json.dumps(served).encode()
    return b'"model":' + quoted, b'"model":' + json.dumps(requested).encode(), quoted
