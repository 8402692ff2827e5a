"""The vLLM logits processor: batched precomputed SVD steering for every steered row.

One class serves both vLLM 0.32 runners: it subclasses the V1 interface
(``vllm.v1.sample.logits_processor.LogitsProcessor``: rows are persistent-batch indices,
told through ``update_state``) and the V2 interface
(``vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor``: slots, ``add_request`` and a
row -> slot mapping per step). Installed, it is loaded through the ``vllm.logits_processors``
entry point; the same class passed again with ``--logits-processors`` stays inert (one
instance per engine steers).

Per-request state lives in small numpy arrays indexed by row (V1) or slot (V2): the
vector's table slot, ``mu`` and ``log alpha``. ``apply`` selects the steered rows with numpy,
gathers nothing per row in Python, and runs one vectorised kernel
(``steering.steer_table_rows_``) over them; with no steered row it returns at once.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from .registry import Registry
from .request_args import PIN_KEY, parse_request_args
from .steering import steer_table_rows_
from .vector_store import ManifestWatcher, VectorStore

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

__all__ = ["SVDLogitsProcessor", "admission_pin", "validate_steering_params"]

logger = logging.getLogger("vllm.svd_vllm")

_watcher_lock = threading.Lock()
_watchers: dict[str, ManifestWatcher] = {}
#: Logits width of the served model, recorded by the adapter-identity hook in the frontend.
SERVED_VOCAB_SIZE: int | None = None


def _frontend_watcher() -> ManifestWatcher:
    registry = Registry()
    key = str(registry.root)
    with _watcher_lock:
        w = _watchers.get(key)
        if w is None:
            w = _watchers[key] = ManifestWatcher(registry)
        return w


def validate_steering_params(extra_args: dict[str, Any] | None) -> None:
    """Admission check (HTTP 400 on ``ValueError``): arguments, vector existence, vocab size."""
    req = parse_request_args(extra_args)
    wants = req.vector_explicit or (req.explicit and req.enabled)
    if not wants:
        return
    if req.vector is None:
        raise ValueError(
            "vllm_xargs.svd=1 but the request names no svd_vector and uses no LoRA adapter"
        )
    entry = _frontend_watcher().entry(req.vector)
    field = "svd_vector" if req.vector_explicit else "svd"
    if entry is None:
        what = "" if req.vector_explicit else " for this request's LoRA adapter"
        raise ValueError(f"vllm_xargs.{field}: no steering vector named {req.vector!r}{what}")
    if req.enabled and not entry.enabled:
        raise ValueError(f"vllm_xargs.{field}: steering vector {req.vector!r} is disabled")
    if SERVED_VOCAB_SIZE is not None and entry.vocab_size != SERVED_VOCAB_SIZE:
        raise ValueError(
            f"vllm_xargs.{field}: steering vector {req.vector!r} has vocab_size "
            f"{entry.vocab_size} but the served model has {SERVED_VOCAB_SIZE}"
        )


def admission_pin(extra_args: dict[str, Any]) -> str | None:
    """``name@version`` of the vector a request would use now (``None`` if none / invalid)."""
    try:
        req = parse_request_args(extra_args)
    except ValueError:
        return None  # validate_params reports it
    if not req.enabled or req.vector is None:
        return None
    entry = _frontend_watcher().entry(req.vector)
    return entry.key if entry is not None else None


class _RowTable:
    """Per-index (row or slot) steering state in numpy arrays; -1 = not steered."""

    def __init__(self, size: int) -> None:
        self.table_slot = np.full(size, -1, dtype=np.int64)
        self.mu = np.zeros(size, dtype=np.float32)
        self.log_alpha = np.zeros(size, dtype=np.float32)
        self.count = 0

    def ensure(self, size: int) -> None:
        if size > self.table_slot.shape[0]:
            extra = size - self.table_slot.shape[0]
            self.table_slot = np.concatenate([self.table_slot, np.full(extra, -1, np.int64)])
            self.mu = np.concatenate([self.mu, np.zeros(extra, np.float32)])
            self.log_alpha = np.concatenate([self.log_alpha, np.zeros(extra, np.float32)])

    def set(self, i: int, slot: int, mu: float, log_alpha: float) -> None:
        self.ensure(i + 1)
        self.count += int(slot >= 0) - int(self.table_slot[i] >= 0)
        self.table_slot[i], self.mu[i], self.log_alpha[i] = slot, mu, log_alpha

    def clear(self, i: int) -> int:
        """Unset index ``i``; returns its previous table slot (or -1)."""
        if i >= self.table_slot.shape[0]:
            return -1
        old = int(self.table_slot[i])
        if old >= 0:
            self.count -= 1
        self.table_slot[i] = -1
        return old

    def move(self, a: int, b: int, swap: bool) -> None:
        self.ensure(max(a, b) + 1)
        for arr in (self.table_slot, self.mu, self.log_alpha):
            if swap:
                arr[a], arr[b] = arr[b], arr[a]
            else:
                arr[b] = arr[a]
        if not swap:
            self.table_slot[a] = -1
        self.count = int((self.table_slot >= 0).sum())


class SVDLogitsProcessor(V1LogitsProcessor, V2LogitsProcessor):
    """Steering Vector Decoding with precomputed per-adapter vectors (see the module doc)."""

    _engines: ClassVar[dict[int, weakref.ref]] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        validate_steering_params(sampling_params.extra_args)

    def __init__(self, vllm_config: VllmConfig, *args: Any) -> None:
        if len(args) == 2:  # V1: (device, is_pin_memory)
            device, self.runner = torch.device(args[0]), "v1"
            size = vllm_config.scheduler_config.max_num_seqs
        elif len(args) == 1:  # V2: (req_states,)
            device, self.runner = torch.device(args[0].device), "v2"
            size = args[0].max_num_reqs
        else:
            raise TypeError(
                "expected (vllm_config, device, is_pin_memory) or (vllm_config, req_states)"
            )
        self.device = device
        self.vocab_size = int(vllm_config.model_config.get_vocab_size())
        # Keyed by the config object's id; holding the config keeps that id from being reused
        # by another engine's config while this instance lives.
        self._vllm_config = vllm_config
        key = id(vllm_config)
        other = self._engines.get(key)
        self.inert = other is not None and other() is not None
        if self.inert:
            logger.warning(
                "svd-vllm: SVDLogitsProcessor is loaded twice for one engine (entry point "
                "and --logits-processors); the second instance does nothing"
            )
            self.store: VectorStore | None = None
        else:
            self._engines[key] = weakref.ref(self)
            self.store = VectorStore(Registry(), device, self.vocab_size)
            logger.info(
                "svd-vllm: steering processor active (%s runner, registry %s, %d vectors)",
                self.runner, self.store.registry.root, len(self.store.names()),
            )  # fmt: skip
        self.state = _RowTable(size)
        self._prepared: tuple[torch.Tensor, ...] | None = None
        self._prepared_rows: np.ndarray | None = None
        self._dirty = True
        self._batch_size = 0

    def is_argmax_invariant(self) -> bool:
        return False  # steering changes the argmax; greedy requests must see it

    # -- per-request resolution (both runners) -----------------------------------------------
    def _resolve(self, params: SamplingParams | None) -> tuple[int, float, float] | None:
        if self.store is None or params is None:
            return None
        try:
            req = parse_request_args(params.extra_args)
        except ValueError as e:  # admission already refused these; be safe anyway
            logger.warning("svd-vllm: ignoring invalid steering arguments: %s", e)
            return None
        if not req.enabled or req.vector is None:
            return None
        lv = self.store.resolve(req.vector, req.pinned)
        if lv is None or (req.pinned is not None and lv.key != req.pinned):
            # Admitted against a manifest newer than ours: catch up now (a stat and one load).
            self.store.refresh()
            lv = self.store.resolve(req.vector, req.pinned)
        if lv is None or not lv.entry.enabled:
            if req.explicit or req.vector_explicit:
                logger.warning(
                    "svd-vllm: vector %r is not available; request not steered", req.vector
                )
            return None
        if req.pinned != lv.key:
            # Pin the version for this request's lifetime (it may be preempted and re-added).
            params.extra_args = {**(params.extra_args or {}), PIN_KEY: lv.key}
        e = lv.entry
        mu = (e.mu_bar if e.mu_bar_override is None else e.mu_bar_override) * (
            req.scale if req.scale is not None else e.default_scale
        )
        alpha = req.alpha if req.alpha is not None else e.effective_alpha
        return self.store.acquire(lv), float(mu), math.log(alpha)

    def _set(self, index: int, params: SamplingParams | None) -> bool:
        old = self.state.clear(index)
        if old >= 0 and self.store is not None:
            self.store.release(old)
        res = self._resolve(params)
        if res is None:
            return False
        self.state.set(index, *res)
        return True

    # -- V1 runner ---------------------------------------------------------------------------
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None or self.store is None:
            return
        for index in batch_update.removed:
            old = self.state.clear(index)
            if old >= 0:
                self.store.release(old)
        for index, params, _, _ in batch_update.added:
            self._set(index, params)
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.UNIDIRECTIONAL:
                old = self.state.clear(b)  # b is overwritten by a
                if old >= 0:
                    self.store.release(old)
            self.state.move(a, b, swap=direction == MoveDirectionality.SWAP)
        self._batch_size = batch_update.batch_size
        self._dirty = True

    def _prepare(self, rows: np.ndarray, index: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Device tensors for logits ``rows``, state at ``index`` (rows in V1, slots in V2)."""
        used, row_slot = np.unique(self.state.table_slot[index], return_inverse=True)
        dev = self.device
        return (
            torch.from_numpy(rows).to(dev, non_blocking=True),
            torch.from_numpy(used).to(dev, non_blocking=True),
            torch.from_numpy(row_slot.astype(np.int64)).to(dev, non_blocking=True),
            torch.from_numpy(self.state.mu[index]).to(dev, non_blocking=True),
            torch.from_numpy(self.state.log_alpha[index]).to(dev, non_blocking=True),
        )

    def _steer(
        self, logits: torch.Tensor, rows: np.ndarray, prepared: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        assert self.store is not None
        rows_t, used, row_slot, mu, log_alpha = prepared
        table = self.store.table
        if (
            rows.shape[0] == logits.shape[0]
            and logits.dtype == torch.float32
            and logits.is_contiguous()
        ):
            steer_table_rows_(logits, table, used, row_slot, mu, log_alpha)  # all rows, in order
            return logits
        sub = logits.index_select(0, rows_t).float()
        steer_table_rows_(sub, table, used, row_slot, mu, log_alpha)
        logits.index_copy_(0, rows_t, sub.to(logits.dtype))
        return logits

    def apply(self, logits: torch.Tensor, ctx: LogitsContext | None = None) -> torch.Tensor:
        if self.state.count == 0:
            return logits
        if ctx is not None:
            return self._apply_v2(logits, ctx)
        if self._dirty:
            n = min(self._batch_size or logits.shape[0], logits.shape[0])
            rows = np.flatnonzero(self.state.table_slot[:n] >= 0)
            self._prepared_rows = rows
            self._prepared = self._prepare(rows, rows) if rows.size else None
            self._dirty = False
        if self._prepared is None or self._prepared_rows is None:
            return logits
        return self._steer(logits, self._prepared_rows, self._prepared)

    # -- V2 runner ---------------------------------------------------------------------------
    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        return self._set(req_idx, sampling_params)

    def apply_staged_writes(self) -> None:
        return None

    def _apply_v2(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        if logits.shape[0] == len(ctx.idx_mapping_np):
            row_slots = np.asarray(ctx.idx_mapping_np, dtype=np.int64)
        else:  # speculative decoding: several rows per request; the mapping lives on device
            row_slots = ctx.expanded_idx_mapping.cpu().numpy().astype(np.int64)
        self.state.ensure(int(row_slots.max()) + 1 if row_slots.size else 0)
        steered = self.state.table_slot[row_slots] >= 0
        if not steered.any():
            return logits
        rows = np.flatnonzero(steered)
        prepared = self._prepare(rows, row_slots[rows])
        return self._steer(logits, rows, prepared)

    def __del__(self) -> None:
        store = getattr(self, "store", None)
        if store is not None:
            store.close()
