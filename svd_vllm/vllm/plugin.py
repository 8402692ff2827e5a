"""``vllm.general_plugins`` hook: tell steering which LoRA adapter a request uses.

No logits-processor interface sees the LoRA request, so this wraps
``InputProcessor.process_inputs`` (private API; ``compat`` checks it on every vLLM it loads on)
to stamp the adapter's name into a NEW ``extra_args`` dict of a shallow copy of the request's
params, before vLLM validates them, so ``validate_params`` and the processor both see it. It
also pins the vector version current at admission (``name@version``), so the engine steers
with exactly the version that was validated, even if it is replaced while the request runs.
Client-sent values under either key are dropped (the stamps are trusted). It records the served
model's vocab size for admission checks too. A LoRA request named as a steered variant
(``ADAPTER:svd``, see ``model_names``) becomes the adapter's own, with the variant's steering.

On a vLLM whose interfaces differ from what the plugin needs, loading it raises
``UnsupportedVLLMError``, which stops the engine with the version and the supported range.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from typing import Any

import msgspec

from ..core.settings import engine_settings
from ..registry import variants
from ..registry.request import INTERNAL_KEYS, LORA_KEY, PIN_KEY
from . import admission, compat, model_names

__all__ = ["UnsupportedVLLMError", "register"]

logger = logging.getLogger("vllm.svd_vllm")


class UnsupportedVLLMError(RuntimeError):
    """The installed vLLM lacks an interface svd-vllm needs."""


def check_vllm() -> None:
    """Raise ``UnsupportedVLLMError`` unless the imported vLLM has every interface needed."""
    import vllm

    problems = compat.installed_problems()
    if problems:
        raise UnsupportedVLLMError(
            f"svd-vllm cannot run on vLLM {vllm.__version__} (supported: "
            f"vllm{compat.SUPPORTED_VLLM}, see docs/compatibility.md): {'; '.join(problems)}. "
            "Install a supported vLLM, or uninstall svd-vllm."
        )
    if not compat.in_range(vllm.__version__):
        logger.warning(
            "svd-vllm: vLLM %s is outside the verified range %s; every interface the plugin "
            "uses is present, so it runs",
            vllm.__version__,
            compat.SUPPORTED_VLLM,
        )


def _skips_processors(input_processor: Any) -> str | None:
    """Why this engine runs no installed logits processor, or None. vLLM's V1 model runner with
    speculative decoding refuses processors passed explicitly but silently skips the installed
    ones (``build_logitsprocs``): steering would be a no-op that nobody sees."""
    cfg = getattr(input_processor, "vllm_config", None)
    if cfg is None or getattr(cfg, "speculative_config", None) is None:
        return None
    if bool(getattr(cfg, "use_v2_model_runner", False)):
        return None  # MRV2 runs the processor on every draft row
    return (
        "this server runs speculative decoding on vLLM's V1 model runner, which skips logits "
        "processors, so steering cannot apply (use the V2 model runner, the GPU default, or "
        "serve without --speculative-config)"
    )


def _adapter_steering(lora: Any, params: Any) -> tuple[Any, dict[str, Any]]:
    """The LoRA request the engine gets and the request's ``extra_args`` with the adapter's name
    stamped (a client's values under the internal keys dropped). A steered variant name
    (``ADAPTER:svd``) becomes the adapter's own, with the variant's steering added."""
    extra = dict(params.extra_args or {})
    for key in INTERNAL_KEYS:
        extra.pop(key, None)
    if lora is None:
        return None, extra
    variant = variants.parse(lora.lora_name)
    if variant is not None:
        extra = variants.steering_xargs(variant, admission.current_manifest(), extra)
        lora = msgspec.structs.replace(lora, lora_name=variant.model)
    extra[LORA_KEY] = lora.lora_name
    return lora, extra


def register() -> None:
    """Entry point: check the vLLM and every ``SVD_VLLM_*`` setting (a bad value stops the
    server at start, naming the variable), then patch ``InputProcessor.process_inputs`` and the
    front's model-name methods (``model_names``) once."""
    check_vllm()
    engine_settings()
    from vllm import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    model_names.install()
    if getattr(InputProcessor.process_inputs, model_names.WRAPPED, False):
        admission.set_stamping(True)
        return
    original = InputProcessor.process_inputs
    signature = inspect.signature(original)

    @functools.wraps(original)
    def process_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        params = bound.arguments.get("params")
        if isinstance(params, SamplingParams):
            if admission.served_vocab_size() is None:
                admission.set_served_vocab_size(int(self.model_config.get_vocab_size()))
                admission.set_processors_skipped(_skips_processors(self))
            lora, extra = _adapter_steering(bound.arguments.get("lora_request"), params)
            bound.arguments["lora_request"] = lora
            pin = admission.admission_pin(extra)
            if pin is not None:
                extra[PIN_KEY] = pin
            stamped = copy.copy(params)  # the caller's params object is never mutated
            stamped.extra_args = extra or None
            bound.arguments["params"] = stamped
        return original(*bound.args, **bound.kwargs)

    setattr(process_inputs, model_names.WRAPPED, True)
    InputProcessor.process_inputs = process_inputs
    admission.set_stamping(True)
