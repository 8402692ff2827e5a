"""Where and in which precision the offline tools run (the one rule for ``--device``/``--dtype``),
and how much memory one of their passes may take.

* ``device="auto"``: CUDA when available, else CPU.
* ``dtype="auto"``: bf16 on CUDA; on CPU bf16 only with AMX tiles, float32 otherwise. Measured
  (``benchmarks/cpu_dtype.py``, figures per CPU kind in ``benchmarks/results/cpu-dtype-*``): on
  AVX2 a bf16 matmul is tens of times slower than float32 (43x for 1024x576 @ 576x1536 on an
  AMD EPYC); with AVX512-BF16 but no AMX a SmolLM2-135M forward is 1.8x slower in bf16; with
  AMX bf16 is faster. Never assume one: the project's machines vary.

Whatever the weights' dtype, everything after the logits (log-softmax, the log ratio, the running
sums of the shift and the Gauss-Newton terms) is computed in float32 or float64: see
``extraction`` and ``calibration``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..core.choices import DEVICES, DTYPE_NAMES

__all__ = [
    "CHUNK_ELEMENTS",
    "DEVICES",
    "DTYPES",
    "ROW_ELEMENTS",
    "TOKENS_PER_PASS",
    "Placement",
    "cpu_bf16_is_fast",
    "float32_chunks",
    "resolve",
    "resolve_device",
    "resolve_dtype",
]

DTYPES: dict[str, torch.dtype | None] = {
    name: None if name == "auto" else getattr(torch, name) for name in DTYPE_NAMES
}


#: Float32 logits per chunk of per-token work (64 MiB; 130 rows at a 128k vocabulary).
CHUNK_ELEMENTS = 1 << 24
#: Completion logits kept per forward pass, in the model's dtype (at most ~0.5 GiB in bf16).
ROW_ELEMENTS = 1 << 28
#: Padded tokens per forward pass (with batch 64, prompts up to 256 tokens fill one pass).
TOKENS_PER_PASS = 1 << 14


def float32_chunks(n_rows: int, vocab_size: int) -> Iterator[slice]:
    """Row slices whose float32 ``[rows, vocab]`` work stays within ``CHUNK_ELEMENTS``."""
    step = max(1, CHUNK_ELEMENTS // max(vocab_size, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


@functools.cache
def cpu_bf16_is_fast() -> bool:
    """Whether bf16 beats float32 on this CPU: only with AMX tiles (AVX512-BF16 alone measured
    slower than float32; see the module doc)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda if available else cpu; an unavailable CUDA is a clear error."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}") from e
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"unsupported device {name!r}; use one of {', '.join(DEVICES)}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto`` (or None) -> bf16 on CUDA, bf16 on CPUs with AMX, else float32."""
    if isinstance(dtype, torch.dtype):
        chosen: torch.dtype | None = dtype
    else:
        key = "auto" if dtype is None else str(dtype).removeprefix("torch.")
        if key not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        chosen = DTYPES[key]
    if chosen is None:
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_bf16_is_fast() else torch.float32
    if chosen not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"unsupported dtype {chosen}; use one of {', '.join(DTYPES)}")
    return chosen


@dataclass(frozen=True)
class Placement:
    """A resolved (device, dtype) pair, printable for logs and benchmark files."""

    device: torch.device
    dtype: torch.dtype

    def describe(self) -> str:
        where = str(self.device)
        if self.device.type == "cuda":
            where += f" ({torch.cuda.get_device_name(self.device)})"
        else:
            where += f" ({torch.backends.cpu.get_cpu_capability()})"
        return f"{where}, {str(self.dtype).removeprefix('torch.')}"


def resolve(
    device: str | torch.device = "auto", dtype: str | torch.dtype | None = "auto"
) -> Placement:
    """Both rules at once: the placement every offline verb uses."""
    dev = resolve_device(device)
    return Placement(dev, resolve_dtype(dtype, dev))
