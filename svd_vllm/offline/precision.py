"""Which precision the offline tools compute in on this machine.

On a CPU without native bf16 (AVX2 only), a bf16 matmul is tens of times slower than float32
(measured 43x for 1024x576 @ 576x1536 on an AMD EPYC), so bf16 autocast is only "auto" where the
processor has AVX512-BF16 or AMX. Never assume one: the project's machines vary.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["cpu_has_native_bf16", "use_cpu_bf16"]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def use_cpu_bf16(requested: bool | None) -> bool:
    """``requested`` if given, else bf16 exactly where the CPU has it natively."""
    return cpu_has_native_bf16() if requested is None else requested
