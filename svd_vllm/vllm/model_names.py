"""vLLM's own front serves the steered model names (``ADAPTER:svd``, ``ADAPTER:svd-PRESET``).

Clients that can only pick a ``model`` (Open WebUI, LangChain, lm-eval) then talk to vLLM itself,
with no proxy on the token path. The names and their rule are ``svd_vllm.registry.variants``, the
same the sidecar applies. Three private vLLM methods are wrapped (``compat`` checks each on every
vLLM the plugin loads on; they are the same from 0.31 to 0.33):

* ``BaseServing._check_model``: a variant of a served adapter that can steer passes; any other
  variant gets the sidecar's refusals (404 with ``type`` ``model_not_found`` and the reason,
  400 ``steering_conflict``), not vLLM's bare "does not exist".
* ``BaseServing._maybe_get_adapters``: the adapter's own ``LoRARequest`` (the same
  ``lora_int_id``, so the same LoRA slot), named as asked, so the answer's ``model`` says the
  variant. The plugin's ``process_inputs`` wrapper then turns the name back into the adapter's
  and stamps the variant's steering (``variants.steering_xargs``): the engine gets exactly what
  a request for the adapter with those ``vllm_xargs`` gives it.
* ``OpenAIServingModels.show_available_models``: ``/v1/models`` lists each served adapter's
  variants while it can steer (from the watched manifest, so presets and registrations show
  within the watcher's second).

vLLM's LoRA resolver plugins (``vllm.lora.resolver``) were the other candidate: they run only
with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, and vLLM gives each resolved name a NEW
``lora_int_id``, a second copy of the adapter in a second slot.

Each API-server process (``--api-server-count N``) loads the plugin and wraps its own classes;
the state the wrappers read (the served adapters, the manifest watcher) is per process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any

from ..registry import variants
from ..registry.variants import Variant, VariantError
from . import admission

__all__ = ["WRAPPED", "install", "variant_refusal"]

#: The attribute that marks a vLLM method the plugin has wrapped (so it is wrapped once).
WRAPPED = "_svd_vllm_wrapped"


def variant_refusal(
    variant: Variant, xargs: Mapping[str, Any] | None, served: Mapping[str, Any]
) -> VariantError | None:
    """Why ``variant`` cannot be served here, or None: its adapter is not among ``served`` (the
    server's LoRA adapters by name), its preset is unknown, the request steers itself
    (``xargs``), or admission refuses the adapter's steering."""
    if variant.model not in served:
        return variants.not_found(
            variant.requested, f"{variant.model!r} is not a LoRA adapter this server serves"
        )
    try:
        variants.steering_xargs(variant, admission.current_manifest(), xargs)
    except VariantError as e:
        return e
    refusal = admission.steering_refusal(variant.model)
    return None if refusal is None else variants.cannot_steer(variant, refusal)


def _asked(request: Any, served: Mapping[str, Any]) -> Variant | None:
    """The variant ``request`` names, unless an adapter is really called that."""
    name = getattr(request, "model", None)
    variant = variants.parse(name)
    return None if variant is None or name in served else variant


def _served(serving: Any) -> Mapping[str, Any]:
    return getattr(serving.models, "lora_requests", None) or {}


def _check_model(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def check_model(self: Any, request: Any) -> Any:
        served = _served(self)
        variant = _asked(request, served)
        if variant is None:
            return await original(self, request)
        refusal = variant_refusal(variant, getattr(request, "vllm_xargs", None), served)
        if refusal is None:
            return None
        return self.create_error_response(
            str(refusal),
            err_type=refusal.code,
            status_code=HTTPStatus(refusal.status),
            param="model" if refusal.status == 404 else None,
        )

    return check_model


def _maybe_get_adapters(original: Callable[..., Any]) -> Callable[..., Any]:
    import msgspec

    @functools.wraps(original)
    def maybe_get_adapters(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        served = _served(self)
        variant = _asked(request, served)
        if variant is None or variant.model not in served:
            return original(self, request, *args, **kwargs)
        return msgspec.structs.replace(served[variant.model], lora_name=variant.requested)

    return maybe_get_adapters


def _show_available_models(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def show_available_models(self: Any) -> Any:
        listing = await original(self)
        manifest = admission.current_manifest()
        cards = {card.id: card for card in listing.data}
        for name in list(getattr(self, "lora_requests", {})):
            card = cards.get(name)
            if card is None or variants.parse(name) is not None:
                continue
            if admission.steering_refusal(name) is not None:
                continue
            for variant, info in variants.listed(name, manifest):
                if variant not in cards:
                    update = {"id": variant, "parent": name, "svd_steering": info}
                    listing.data.append(card.model_copy(update=update))
        return listing

    return show_available_models


def install() -> None:
    """Wrap the three methods once per process."""
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve.engine.serving import BaseServing

    for cls, name, wrapper in (
        (BaseServing, "_check_model", _check_model),
        (BaseServing, "_maybe_get_adapters", _maybe_get_adapters),
        (OpenAIServingModels, "show_available_models", _show_available_models),
    ):
        original = getattr(cls, name)
        if getattr(original, WRAPPED, False):
            continue
        wrapped = wrapper(original)
        setattr(wrapped, WRAPPED, True)
        setattr(cls, name, wrapped)
