"""Steering slots: one per request index, on the host and mirrored on the device.

The index is what vLLM indexes a request's state by (its ``idx_mapping`` maps logits rows to
it): a persistent-batch row on the V1 runner, a request state index (``req_idx``) on the V2
runner. Per index: the ``table_row`` of the vector table holding its shift (``-1``: not
steered), its strength ``mu`` and ``log alpha``. The host arrays are the truth; the device
mirror is refreshed by ``flush`` only after a change, through one of two pinned staging buffers
(alternating, so the host never rewrites a buffer that a pending copy still reads).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

__all__ = ["RequestSlots", "SlotTensors"]


class SlotTensors(NamedTuple):
    """The steering slots on the logits' device (1-D, one length): the table row
    (``-1``: not steered), ``mu`` and ``log alpha``."""

    table_row: torch.Tensor
    mu: torch.Tensor
    log_alpha: torch.Tensor


class RequestSlots:
    """One steering slot per request index (the module doc); ``table_row == -1``: not steered."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.device = device
        self.count = 0  # indices currently steered
        self.version = 0  # bumps on every change (lets the torch kernel path reuse its work)
        self._alloc(max(size, 1))

    def _alloc(self, size: int, old: RequestSlots | None = None) -> None:
        self.table_row = np.full(size, -1, dtype=np.int32)
        self.mu = np.zeros(size, dtype=np.float32)
        self.log_alpha = np.zeros(size, dtype=np.float32)
        if old is not None:
            n = old.table_row.shape[0]
            self.table_row[:n], self.mu[:n], self.log_alpha[:n] = (
                old.table_row,
                old.mu,
                old.log_alpha,
            )
        if self.device.type == "cpu":  # the device arrays ARE the host arrays
            self.dev_table_row = torch.from_numpy(self.table_row)
            self.dev_mu = torch.from_numpy(self.mu)
            self.dev_log_alpha = torch.from_numpy(self.log_alpha)
            self._staging: list[tuple[torch.Tensor, ...]] = []
        else:
            self.dev_table_row = torch.full((size,), -1, dtype=torch.int32, device=self.device)
            self.dev_mu = torch.zeros(size, dtype=torch.float32, device=self.device)
            self.dev_log_alpha = torch.zeros(size, dtype=torch.float32, device=self.device)
            pin = torch.cuda.is_available()
            self._staging = [
                (
                    torch.empty(size, dtype=torch.int32, pin_memory=pin),
                    torch.empty(size, dtype=torch.float32, pin_memory=pin),
                    torch.empty(size, dtype=torch.float32, pin_memory=pin),
                )
                for _ in range(2)
            ]
        #: the device mirror as the kernel takes it (current after ``flush``)
        self.tensors = SlotTensors(self.dev_table_row, self.dev_mu, self.dev_log_alpha)
        self._next = 0
        self.dirty = True
        self.version += 1

    @property
    def size(self) -> int:
        return int(self.table_row.shape[0])

    def ensure(self, size: int) -> None:
        """Grow to hold index ``size - 1`` (rare: the first batch larger than configured)."""
        if size > self.size:
            self._alloc(max(size, 2 * self.size), old=self)

    def set(self, i: int, table_row: int, mu: float, log_alpha: float) -> None:
        self.ensure(i + 1)
        self.count += int(table_row >= 0) - int(self.table_row[i] >= 0)
        self.table_row[i], self.mu[i], self.log_alpha[i] = table_row, mu, log_alpha
        self.dirty = True
        self.version += 1

    def clear(self, i: int) -> int:
        """Unset index ``i``; returns its previous table row (or -1)."""
        if i >= self.size:
            return -1
        old = int(self.table_row[i])
        if old >= 0:
            self.count -= 1
            self.table_row[i] = -1
            self.dirty = True
            self.version += 1
        return old

    def move(self, a: int, b: int, swap: bool) -> None:
        """V1's batch condensing: ``a`` to ``b`` (``b`` already released), or a swap."""
        self.ensure(max(a, b) + 1)
        for arr in (self.table_row, self.mu, self.log_alpha):
            if swap:
                arr[a], arr[b] = arr[b], arr[a]
            else:
                arr[b] = arr[a]
        if not swap:
            self.table_row[a] = -1
        self.count = int((self.table_row >= 0).sum())
        self.dirty = True
        self.version += 1

    def steered(self, indices: np.ndarray) -> bool:
        """Whether any of ``indices`` is steered (host arrays only: no device sync)."""
        inside = indices[indices < self.size]
        return bool((self.table_row[inside] >= 0).any())

    def flush(self) -> None:
        """Copy the host state to the device if it changed (non-blocking, no allocation)."""
        if not self.dirty:
            return
        self.dirty = False
        if not self._staging:
            return
        stage = self._staging[self._next]
        self._next ^= 1
        for host, arr, dev in zip(
            stage,
            (self.table_row, self.mu, self.log_alpha),
            (self.dev_table_row, self.dev_mu, self.dev_log_alpha),
            strict=True,
        ):
            host.numpy()[:] = arr
            dev.copy_(host, non_blocking=True)
