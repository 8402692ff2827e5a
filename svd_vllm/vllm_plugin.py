"""``vllm.general_plugins`` hook: tell steering which LoRA adapter a request uses.

No logits-processor interface sees the LoRA request, so this wraps
``InputProcessor.process_inputs`` (private API, pinned to vLLM 0.32.0) to stamp the adapter's
name into a NEW ``extra_args`` dict of a shallow copy of the request's params, before vLLM
validates them, so ``validate_params`` and the processor both see it. It also pins the vector
version current at admission (``name@version``), so the engine steers with exactly the
version that was validated, even if it is replaced while the request runs. Client-sent
values under either key are dropped (the stamps are trusted). It records the served model's
vocab size for admission checks too.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging

from .request_args import LORA_KEY, PIN_KEY

__all__ = ["SUPPORTED_VLLM", "register"]

SUPPORTED_VLLM = "0.32.0"
logger = logging.getLogger("vllm.svd_vllm")


def register() -> None:
    """Entry point: patch ``InputProcessor.process_inputs`` once per process."""
    import vllm
    from vllm import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    if getattr(InputProcessor.process_inputs, "_svd_vllm_wrapped", False):
        return
    if vllm.__version__ != SUPPORTED_VLLM:
        logger.warning(
            "svd-vllm: vLLM %s is not %s; adapter names are not stamped, so clients must "
            "send vllm_xargs.svd_vector explicitly",
            vllm.__version__, SUPPORTED_VLLM,
        )  # fmt: skip
        return
    original = InputProcessor.process_inputs
    signature = inspect.signature(original)
    if "params" not in signature.parameters or "lora_request" not in signature.parameters:
        logger.warning("svd-vllm: unexpected InputProcessor.process_inputs signature; not patched")
        return

    @functools.wraps(original)
    def process_inputs(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        bound = signature.bind(self, *args, **kwargs)
        params = bound.arguments.get("params")
        if isinstance(params, SamplingParams):
            from . import processor

            if processor.SERVED_VOCAB_SIZE is None:
                processor.SERVED_VOCAB_SIZE = int(self.model_config.get_vocab_size())
            lora = bound.arguments.get("lora_request")
            extra = dict(params.extra_args or {})
            extra.pop(LORA_KEY, None)
            extra.pop(PIN_KEY, None)
            if lora is not None:
                extra[LORA_KEY] = lora.lora_name
            pin = processor.admission_pin(extra)
            if pin is not None:
                extra[PIN_KEY] = pin
            stamped = copy.copy(params)  # the caller's params object is never mutated
            stamped.extra_args = extra or None
            bound.arguments["params"] = stamped
        return original(*bound.args, **bound.kwargs)

    process_inputs._svd_vllm_wrapped = True  # type: ignore[attr-defined]
    InputProcessor.process_inputs = process_inputs  # type: ignore[method-assign]
