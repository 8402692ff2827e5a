"""The serving step: filtered precomputed SVD on a batch of logits rows, in place.

``steer_rows_`` is what both processors call. Row ``r`` of ``logits`` reads its steering state
(``SlotTensors``) at index ``i = idx_mapping[r]`` (``i = r`` when ``idx_mapping`` is None): the
device-table row ``table_row[i]`` (``-1``: the row is not steered and stays untouched), the
strength ``mu[i]`` and ``log_alpha[i]``. Every steered row becomes

    z + mu * p * (<p, s> - s)   on the mask  z >= max z + log alpha,   -inf elsewhere

(``core.steering.steer(z, precomputed_delta(z, s), mu, confidence_mask(z, alpha))``).

Two implementations with one contract:

* CUDA with Triton importable: ``_triton_steer`` -- two launches over (row, chunk) programs,
  unsteered rows exit at once, no host sync, nothing allocated per call beyond a workspace that
  ``SteeringKernel`` keeps (it grows only when a batch is larger than any before).
* Everything else (CPU, or no Triton): the torch reference ``core.steering.steer_table_rows_``
  on the steered rows, which it finds with ``nonzero`` (a host sync on CUDA) -- once per state
  change on the V1 runner, where rows are the state's indices.
"""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType

import torch

from ..core.settings import engine_settings, environment
from ..core.steering import steer_table_rows_
from .request_slots import SlotTensors

__all__ = [
    "SlotTensors",
    "SteeringKernel",
    "interpreting",
    "kernel_setting",
    "steer_rows_",
]


def kernel_setting() -> str:
    """``SVD_VLLM_KERNEL``, checked: a typo is an error at start-up, not a silent ``auto``."""
    return engine_settings().kernel


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``: tests)."""
    return environment().get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton_module() -> ModuleType | None:
    """The Triton implementation, imported on first use (CPU installs never need Triton)."""
    if kernel_setting() == "torch":
        return None
    if importlib.util.find_spec("triton") is None:
        return None
    from . import _triton_steer

    return _triton_steer


def _use_triton(logits: torch.Tensor) -> bool:
    return (logits.is_cuda or interpreting()) and _triton_module() is not None


def _check(
    logits: torch.Tensor, table: torch.Tensor, state: SlotTensors, idx_mapping: torch.Tensor | None
) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits must be [rows, vocab] with contiguous rows")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"logits dtype {logits.dtype} is not a float type the kernel supports")
    if table.dim() != 2 or table.shape[1] != logits.shape[1] or table.dtype != torch.float32:
        raise ValueError(
            f"table must be float32 [rows, {logits.shape[1]}], got {tuple(table.shape)} "
            f"{table.dtype}"
        )
    table_row, mu, log_alpha = state
    if not (table_row.shape == mu.shape == log_alpha.shape) or table_row.dim() != 1:
        raise ValueError("table_row, mu and log_alpha must be 1-D and of one length")
    if idx_mapping is None and table_row.shape[0] < logits.shape[0]:
        raise ValueError("without idx_mapping, the state arrays need one entry per logits row")
    if idx_mapping is not None and idx_mapping.shape != logits.shape[:1]:
        raise ValueError("idx_mapping needs one entry per logits row")


_Prepared = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _prepare(n: int, state: SlotTensors, idx_mapping: torch.Tensor | None) -> _Prepared | None:
    """(steered rows, distinct table rows, row -> distinct index, mu, log alpha), or None."""
    table_row, mu, log_alpha = state
    idx = torch.arange(n, device=table_row.device) if idx_mapping is None else idx_mapping.long()
    row_table_row = table_row.index_select(0, idx)
    rows = torch.nonzero(row_table_row >= 0).squeeze(1)
    if rows.numel() == 0:
        return None
    st = idx.index_select(0, rows)
    used, inverse = torch.unique(row_table_row.index_select(0, rows), return_inverse=True)
    return rows, used.long(), inverse, mu.index_select(0, st), log_alpha.index_select(0, st)


def _steer_prepared_(logits: torch.Tensor, table: torch.Tensor, prep: _Prepared) -> torch.Tensor:
    rows, used, inverse, mu, log_alpha = prep
    if rows.numel() == logits.shape[0] and logits.dtype == torch.float32 and logits.is_contiguous():
        steer_table_rows_(logits, table, used, inverse, mu, log_alpha)  # every row: in place
        return logits
    sub = logits.index_select(0, rows).float()
    steer_table_rows_(sub, table, used, inverse, mu, log_alpha)
    logits.index_copy_(0, rows, sub.to(logits.dtype))
    return logits


class SteeringKernel:
    """``steer_rows_`` with a persistent workspace: one per processor, nothing per call."""

    def __init__(self, device: torch.device | str, vocab_size: int, max_rows: int = 1) -> None:
        self.device = torch.device(device)
        self.vocab_size = vocab_size
        self.workspace: torch.Tensor | None = None
        self._prepared: _Prepared | None = None
        self._prepared_key: tuple[int, int] | None = None
        mod = _triton_module()
        if mod is not None and (self.device.type == "cuda" or interpreting()):
            self.workspace = mod.workspace(max(max_rows, 1), vocab_size, self.device)

    @property
    def name(self) -> str:
        """Which implementation steers on this device: ``triton``, ``triton (interpreted)``
        (Triton's CPU interpreter, tests only) or ``torch``."""
        if self.workspace is None:
            return "torch"
        return "triton" if self.device.type == "cuda" else "triton (interpreted)"

    def __call__(
        self,
        logits: torch.Tensor,
        table: torch.Tensor,
        state: SlotTensors,
        idx_mapping: torch.Tensor | None = None,
        slots_version: int | None = None,
    ) -> torch.Tensor:
        """Steer in place. ``slots_version`` (it changes whenever the state does) lets the torch
        path reuse its row selection while rows map to state one to one (the V1 runner)."""
        mod = _triton_module() if _use_triton(logits) else None
        if mod is None:
            key = None
            if idx_mapping is None and slots_version is not None:
                key = (slots_version, logits.shape[0])
            if key is None or key != self._prepared_key:
                self._prepared = _prepare(logits.shape[0], state, idx_mapping)
                self._prepared_key = key
            if self._prepared is None:
                return logits
            return _steer_prepared_(logits, table, self._prepared)
        if self.workspace is None or self.workspace.shape[0] < logits.shape[0]:
            # A batch larger than any before (speculative decoding's extra rows): grow once.
            self.workspace = mod.workspace(logits.shape[0], logits.shape[1], logits.device)
        mod.steer_rows_(logits, table, state, idx_mapping, self.workspace)
        return logits


def steer_rows_(
    logits: torch.Tensor,
    table: torch.Tensor,
    state: SlotTensors,
    idx_mapping: torch.Tensor | None = None,
) -> torch.Tensor:
    """Steer ``logits`` in place (see the module doc); returns ``logits``.

    A one-off call (benchmarks, tests); processors hold a ``SteeringKernel`` instead, so the
    Triton path allocates its workspace once.
    """
    _check(logits, table, state, idx_mapping)
    return SteeringKernel(logits.device, logits.shape[1], logits.shape[0])(
        logits, table, state, idx_mapping
    )
