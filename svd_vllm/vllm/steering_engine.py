"""What one engine's steering processor owns, shared by the V1 and V2 processors.

``SteeringEngine`` holds the engine's ``VectorStore``, the ``RequestSlots`` and the
``SteeringKernel``. It turns a request's ``SamplingParams`` into the request's state (resolving
compositions and pinning each vector version through ``admission``'s rules), runs the kernel,
and enforces one processor per engine.
"""

from __future__ import annotations

import logging
import math
import weakref
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch

from ..registry import Registry, RegistryError, servable
from ..registry.request import PIN_KEY, SteeringRequest, resolve
from .kernel import SteeringKernel
from .request_slots import RequestSlots
from .vector_store import VectorStore

if TYPE_CHECKING:
    from vllm import SamplingParams

__all__ = ["SteeringEngine", "SteeringRow", "worker_rank"]

logger = logging.getLogger("vllm.svd_vllm")


def worker_rank(vllm_config: Any) -> str:
    """This worker's place in the engine, for the log: every rank that samples builds a
    processor and loads the vectors (vLLM numbers ranks pipeline-major)."""
    par = vllm_config.parallel_config
    tp, pp = int(par.tensor_parallel_size), int(par.pipeline_parallel_size)
    rank = int(par.rank)
    return f"rank {rank} (tp {rank % tp}/{tp}, pp {rank // tp}/{pp})"


class SteeringRow(NamedTuple):
    """What the kernel needs for one steered request: its row of the device table of shifts,
    its strength ``mu`` and the log of its mask threshold ``alpha``."""

    table_row: int
    mu: float
    log_alpha: float


class SteeringEngine:
    """What one engine's processor owns: the vector store, the request slots, the kernel."""

    _engines: ClassVar[dict[int, weakref.ref[SteeringEngine]]] = {}

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
        self.slots = RequestSlots(size, device)
        self.kernel = SteeringKernel(device, self.vocab_size, size)
        if self.store is not None:
            logger.info(
                "svd-vllm: steering processor active (%s runner, %s kernel, %s, registry %s, "
                "%d vectors)",
                runner,
                self.kernel.name,
                worker_rank(vllm_config),
                self.store.registry.root,
                len(self.store.names()),
            )

    def _resolve(self, params: SamplingParams | None) -> SteeringRow | None:
        """Where and how a request steers, or None if it is not steered."""
        if self.store is None or params is None:
            return None
        try:
            req = resolve(params.extra_args, self.store.registered())
        except ValueError as e:  # admission already refused these; be safe anyway
            logger.warning("svd-vllm: ignoring invalid steering arguments: %s", e)
            return None
        if req.composed:
            return self._resolve_composition(req, params) if req.enabled else None
        if not req.enabled or req.vector is None or req.disabled_composition:
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
        return SteeringRow(self.store.acquire(lv), float(mu), math.log(entry.mask_alpha(req.alpha)))

    def _resolve_composition(
        self, req: SteeringRequest, params: SamplingParams
    ) -> SteeringRow | None:
        """One combined shift ``S = sum_i strength_i * shift_i`` (the maths is linear in the
        shift), built once per distinct composition and kept in a reference-counted table row
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
            row = self.store.acquire_shift(key, combine)
        except FloatingPointError as e:
            logger.warning("svd-vllm: %s; not steered", e)
            return None
        return SteeringRow(row, 1.0, math.log(alpha))

    def release(self, index: int) -> None:
        old = self.slots.clear(index)
        if old >= 0 and self.store is not None:
            self.store.release(old)

    def set(self, index: int, params: SamplingParams | None) -> bool:
        """(Re)initialise ``index`` for a request; returns whether it is steered."""
        self.release(index)
        res = self._resolve(params)
        if res is None:
            return False
        self.slots.set(index, *res)
        return True

    def steer(self, logits: torch.Tensor, idx_mapping: torch.Tensor | None) -> torch.Tensor:
        """Run the kernel on ``logits`` (flushing the state first if it changed)."""
        assert self.store is not None
        self.slots.flush()
        return self.kernel(
            logits, self.store.table, self.slots.tensors, idx_mapping, self.slots.version
        )

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
