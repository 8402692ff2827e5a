"""Engine-side steering state shared by the V1 and V2 processors (engine core / GPU worker).

* ``SlotState`` -- per index (a V1 persistent-batch row or a V2 request slot): the vector's
  device-table row, ``mu`` and ``log alpha``. The host arrays are the truth; a device mirror is
  refreshed by ``flush`` only after a change, through one of two pinned staging buffers
  (alternating, so the host never rewrites a buffer a pending copy still reads).
* ``EngineSteering`` -- the registry's ``VectorStore``, turning a request's ``SamplingParams``
  into a slot's state (pinning the vector version), the kernel, and the one-instance-per-engine
  rule.
"""

from __future__ import annotations

import logging
import math
import weakref
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from ..registry import Registry, RegistryError, servable
from ..registry.vector_store import VectorStore
from .admission import PIN_KEY, SteeringRequest, expand_composition, parse_request_args
from .kernel import SlotTensors, SteeringKernel

if TYPE_CHECKING:
    from vllm import SamplingParams

__all__ = ["EngineSteering", "SlotState"]

logger = logging.getLogger("vllm.svd_vllm")


class SlotState:
    """Steering state per index; ``table_idx == -1`` means not steered."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.device = device
        self.count = 0  # indices currently steered
        self.version = 0  # bumps on every change (lets the torch kernel path reuse its work)
        self._alloc(max(size, 1))

    def _alloc(self, size: int, old: SlotState | None = None) -> None:
        self.table_idx = np.full(size, -1, dtype=np.int32)
        self.mu = np.zeros(size, dtype=np.float32)
        self.log_alpha = np.zeros(size, dtype=np.float32)
        if old is not None:
            n = old.table_idx.shape[0]
            self.table_idx[:n], self.mu[:n], self.log_alpha[:n] = (
                old.table_idx,
                old.mu,
                old.log_alpha,
            )
        if self.device.type == "cpu":  # the device arrays ARE the host arrays
            self.dev_table_idx = torch.from_numpy(self.table_idx)
            self.dev_mu = torch.from_numpy(self.mu)
            self.dev_log_alpha = torch.from_numpy(self.log_alpha)
            self._staging: list[tuple[torch.Tensor, ...]] = []
        else:
            self.dev_table_idx = torch.full((size,), -1, dtype=torch.int32, device=self.device)
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
        self._next = 0
        self.dirty = True
        self.version += 1

    @property
    def size(self) -> int:
        return int(self.table_idx.shape[0])

    def ensure(self, size: int) -> None:
        """Grow to hold index ``size - 1`` (rare: the first batch larger than configured)."""
        if size > self.size:
            self._alloc(max(size, 2 * self.size), old=self)

    def set(self, i: int, table_idx: int, mu: float, log_alpha: float) -> None:
        self.ensure(i + 1)
        self.count += int(table_idx >= 0) - int(self.table_idx[i] >= 0)
        self.table_idx[i], self.mu[i], self.log_alpha[i] = table_idx, mu, log_alpha
        self.dirty = True
        self.version += 1

    def clear(self, i: int) -> int:
        """Unset index ``i``; returns its previous table row (or -1)."""
        if i >= self.size:
            return -1
        old = int(self.table_idx[i])
        if old >= 0:
            self.count -= 1
            self.table_idx[i] = -1
            self.dirty = True
            self.version += 1
        return old

    def move(self, a: int, b: int, swap: bool) -> None:
        """V1's batch condensing: ``a`` to ``b`` (``b`` already released), or a swap."""
        self.ensure(max(a, b) + 1)
        for arr in (self.table_idx, self.mu, self.log_alpha):
            if swap:
                arr[a], arr[b] = arr[b], arr[a]
            else:
                arr[b] = arr[a]
        if not swap:
            self.table_idx[a] = -1
        self.count = int((self.table_idx >= 0).sum())
        self.dirty = True
        self.version += 1

    def steered(self, indices: np.ndarray) -> bool:
        """Whether any of ``indices`` is steered (host arrays only: no device sync)."""
        inside = indices[indices < self.size]
        return bool((self.table_idx[inside] >= 0).any())

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
            (self.table_idx, self.mu, self.log_alpha),
            (self.dev_table_idx, self.dev_mu, self.dev_log_alpha),
            strict=True,
        ):
            host.numpy()[:] = arr
            dev.copy_(host, non_blocking=True)


def worker_rank(vllm_config: Any) -> str:
    """This worker's place in the engine, for the log: every rank that samples builds a
    processor and loads the vectors (vLLM numbers ranks pipeline-major)."""
    par = vllm_config.parallel_config
    tp, pp = int(par.tensor_parallel_size), int(par.pipeline_parallel_size)
    rank = int(par.rank)
    return f"rank {rank} (tp {rank % tp}/{tp}, pp {rank // tp}/{pp})"


class EngineSteering:
    """What one engine's processor owns: the vector store, the slot state and the kernel."""

    _engines: ClassVar[dict[int, weakref.ref[EngineSteering]]] = {}

    def __init__(self, vllm_config: Any, device: torch.device, size: int, runner: str) -> None:
        self.device = device
        self.runner = runner
        self.vocab_size = int(vllm_config.model_config.get_vocab_size())
        # Keyed by the config object's id; holding the config keeps that id from being reused
        # by another engine's config while this instance lives.
        self._vllm_config = vllm_config
        key = id(vllm_config)
        other = self._engines.get(key)
        self.inert = other is not None and other() is not None
        self.store: VectorStore | None = None
        if self.inert:
            logger.warning(
                "svd-vllm: SVDLogitsProcessor is loaded twice for one engine (entry point "
                "and --logits-processors); the second instance does nothing"
            )
        else:
            self._engines[key] = weakref.ref(self)
            self.store = VectorStore(Registry(), device, self.vocab_size)
        self.state = SlotState(size, device)
        self.kernel = SteeringKernel(device, self.vocab_size, size)
        if self.store is not None:
            logger.info(
                "svd-vllm: steering processor active (%s runner, %s kernel, %s, registry %s, "
                "%d vectors)",
                runner, self.kernel.name, worker_rank(vllm_config), self.store.registry.root,
                len(self.store.names()),
            )  # fmt: skip

    def _resolve(self, params: SamplingParams | None) -> tuple[int, float, float] | None:
        """(device-table row, mu, log alpha) for a request, or None if it is not steered."""
        if self.store is None or params is None:
            return None
        try:
            req = parse_request_args(params.extra_args)
        except ValueError as e:  # admission already refused these; be safe anyway
            logger.warning("svd-vllm: ignoring invalid steering arguments: %s", e)
            return None
        if not req.composed and req.vector is not None:  # a registered composition?
            comps = self.store.compositions()
            if req.vector in comps:
                req = expand_composition(req, comps, self.store.entries(), params.extra_args)
        if req.composed:
            return self._resolve_composition(req, params) if req.enabled else None
        if not req.enabled or req.vector is None:
            return None
        lv = self.store.resolve(req.vector, req.pinned)
        if lv is None or (req.pinned is not None and lv.key != req.pinned):
            # Admitted against a manifest newer than ours: catch up now (a stat and one load).
            self.store.refresh()
            lv = self.store.resolve(req.vector, req.pinned)
        try:
            entry = servable(lv.entry if lv is not None else None, req.vector)
        except RegistryError as e:
            if req.explicit or req.vector_explicit:
                logger.warning("svd-vllm: %s; request not steered", e)
            return None
        assert lv is not None
        if req.pinned != lv.key:
            # Pin the version for this request's lifetime (it may be preempted and re-added).
            params.extra_args = {**(params.extra_args or {}), PIN_KEY: lv.key}
        mu = entry.strength(req.scale)
        return self.store.acquire(lv), float(mu), math.log(entry.mask_alpha(req.alpha))

    def _resolve_composition(
        self, req: SteeringRequest, params: SamplingParams
    ) -> tuple[int, float, float] | None:
        """One combined shift ``S = sum_i strength_i * shift_i`` (the maths is linear in the
        shift), built once per distinct composition and kept in a reference-counted table slot
        like any vector; the row steers with it at strength 1. Every member's version is pinned.
        """
        assert self.store is not None
        pins = req.pins or (None,) * len(req.members)
        members = [self.store.resolve(n, k) for n, k in zip(req.members, pins, strict=True)]
        if any(
            lv is None or (k is not None and lv.key != k)
            for lv, k in zip(members, pins, strict=True)
        ):
            self.store.refresh()  # admitted against a newer manifest: catch up
            members = [self.store.resolve(n, k) for n, k in zip(req.members, pins, strict=True)]
        entries = []
        for name, lv in zip(req.members, members, strict=True):
            try:
                entries.append(servable(lv.entry if lv is not None else None, name))
            except RegistryError as e:
                logger.warning("svd-vllm: %s; composed request not steered", e)
                return None
        loaded = [lv for lv in members if lv is not None]
        keys = [lv.key for lv in loaded]
        if list(req.pins) != keys:
            params.extra_args = {**(params.extra_args or {}), PIN_KEY: keys}
        strengths = [e.strength(sc) for e, sc in zip(entries, req.scales, strict=True)]
        key = "+".join(f"{k}*{m!r}" for k, m in zip(keys, strengths, strict=True))

        def combine() -> torch.Tensor:
            total = torch.zeros(self.vocab_size, dtype=torch.float64)
            for lv, m in zip(loaded, strengths, strict=True):
                total.add_(lv.shift.double(), alpha=m)
            shift = total.float()
            if not bool(torch.isfinite(shift).all()):
                raise FloatingPointError(f"composition {key} overflows float32")
            return shift

        alpha = req.alpha if req.alpha is not None else min(e.mask_alpha() for e in entries)
        try:
            slot = self.store.acquire_shift(key, combine)
        except FloatingPointError as e:
            logger.warning("svd-vllm: %s; not steered", e)
            return None
        return slot, 1.0, math.log(alpha)

    def release(self, index: int) -> None:
        old = self.state.clear(index)
        if old >= 0 and self.store is not None:
            self.store.release(old)

    def set(self, index: int, params: SamplingParams | None) -> bool:
        """(Re)initialise ``index`` for a request; returns whether it is steered."""
        self.release(index)
        res = self._resolve(params)
        if res is None:
            return False
        self.state.set(index, *res)
        return True

    def steer(self, logits: torch.Tensor, row_state: torch.Tensor | None) -> torch.Tensor:
        """Run the kernel on ``logits`` (flushing the state first if it changed)."""
        assert self.store is not None
        self.state.flush()
        state = self.state
        slots = SlotTensors(state.dev_table_idx, state.dev_mu, state.dev_log_alpha)
        return self.kernel(logits, self.store.table, slots, row_state, state.version)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
