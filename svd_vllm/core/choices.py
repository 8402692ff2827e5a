"""Names the CLI offers as choices: the reference decoder's modes, devices and dtypes. Torch-free,
so that ``svd-vllm --help`` imports no torch; ``core.steering`` and ``offline.precision`` build on
these names."""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["DEVICES", "DTYPE_NAMES", "EVAL_METHODS", "MODES", "PEFT_METHODS", "Mode"]

Mode = Literal["base", "adapter", "svd-exact", "svd-precomputed", "logit-bias"]
MODES: tuple[str, ...] = get_args(Mode)
DEVICES = ("auto", "cuda", "cpu")
#: ``auto``, then torch's own names of the dtypes a model may be loaded in.
DTYPE_NAMES = ("auto", "bfloat16", "float16", "float32")
#: The PEFT methods a warm start trains.
PEFT_METHODS = ("lora", "ia3", "prompt", "ptuning")
#: What an evaluation scores: the base, the PEFT model, and the PEFT model steered three ways.
EVAL_METHODS = ("base", "peft", "peft+svd-exact", "peft+svd-precomputed", "peft+logit-bias")
