"""Admission (vLLM frontend process): the process state behind each request's steering check.

The rule itself is the registry layer's request contract (``svd_vllm.registry.request``); this
module holds what one vLLM frontend process knows (its watched manifest, the served model's vocab
size, whether the plugin stamps requests) and applies the contract against it: vLLM's
``validate_params`` hook, the version pin the plugin stamps, and the counter of default-steered
requests that ran unsteered.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping
from typing import Any

from ..registry import Manifest, Registry
from ..registry.manifest_watcher import ManifestWatcher
from ..registry.request import (
    ENABLE_KEY,
    LORA_KEY,
    SteeringError,
    check_request,
    parse_request_args,
    resolve,
)

__all__ = [
    "admission_pin",
    "current_manifest",
    "reset_state",
    "served_vocab_size",
    "set_processors_skipped",
    "set_served_vocab_size",
    "set_stamping",
    "steering_refusal",
    "validate_steering_params",
]


# -- the frontend's view of the registry and the served model ---------------------------------
class _AdmissionState:
    """What admission checks against: one manifest watcher per registry, the served vocab."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.watchers: dict[str, ManifestWatcher] = {}
        self.vocab_size: int | None = None
        self.stamping = False  # the plugin's wrapper is installed in this process
        self.skipped: str | None = None  # why the engine runs no logits processor, if it doesn't

    def watcher(self) -> ManifestWatcher:
        registry = Registry()
        key = str(registry.root)
        with self.lock:
            w = self.watchers.get(key)
            if w is None:
                w = self.watchers[key] = ManifestWatcher(registry)
            return w


_state = _AdmissionState()


def served_vocab_size() -> int | None:
    """The served model's logits width, once the plugin has seen the engine's model config."""
    return _state.vocab_size


def set_served_vocab_size(vocab_size: int | None) -> None:
    """Record (or, with ``None``, forget) the served model's logits width."""
    _state.vocab_size = vocab_size


def set_stamping(active: bool) -> None:
    """Record whether the plugin stamps adapter names and pins in this process."""
    _state.stamping = active


def set_processors_skipped(reason: str | None) -> None:
    """Record that (and why) this server's engine applies no logits processor: requests that
    ask for steering are then refused instead of silently running unsteered."""
    _state.skipped = reason


def reset_state() -> None:
    """Forget the served vocab size, the stamping flag and every watcher (tests, restarts)."""
    with _state.lock:
        _state.vocab_size = None
        _state.stamping = False
        _state.skipped = None
        _state.watchers.clear()


def validate_steering_params(extra_args: Mapping[str, Any] | None) -> None:
    """vLLM's admission check (HTTP 400 on ``ValueError``): ``check_request`` against this
    process's view of the registry and the served vocab size.

    Without the plugin's stamping (``VLLM_PLUGINS`` may leave it out), values under the internal
    keys can only have come from the client: they are refused, never trusted.
    """
    watcher = _state.watcher()
    served = _state.vocab_size
    req = check_request(
        extra_args,
        watcher.current()[0],
        lambda entry: watcher.problem(entry, served),
        served,
        stamping=_state.stamping,
        unservable_default=_count_default_unservable,
    )
    if _state.skipped is not None and req.enabled:
        if req.vector_explicit or req.explicit:
            raise SteeringError(f"vllm_xargs.{ENABLE_KEY}: {_state.skipped}")
        if req.vector is not None or req.composed:
            _count_default_unservable(req.vector or "", "processors_skipped")


def current_manifest() -> Manifest:
    """This process's view of the registry (the watcher's, at most a second old)."""
    return _state.watcher().current()[0]


def steering_refusal(model: str) -> SteeringError | None:
    """Why a request for adapter ``model`` with steering on would be refused, or None: the
    rule that decides which adapters get steered variant names (``ADAPTER:svd``)."""
    try:
        validate_steering_params({ENABLE_KEY: 1, LORA_KEY: model})
    except SteeringError as e:
        return e
    return None


def _count_default_unservable(name: str, reason: str) -> None:
    """A request steered only by the server default whose registered, enabled vector cannot
    load proceeds unsteered; ``svd_vllm_default_unsteered_total`` counts it, by reason."""
    counter = _unsteered_counter()
    if counter is not None:
        counter.labels(reason).inc()


@functools.cache
def _unsteered_counter() -> Any:
    """The counter, in the default Prometheus registry that vLLM's ``/metrics`` serves."""
    try:
        from prometheus_client import Counter
    except ImportError:  # pragma: no cover - vLLM depends on prometheus-client
        return None
    return Counter(
        "svd_vllm_default_unsteered",
        "Requests steered by the server default (SVD_VLLM_DEFAULT=on) that ran unsteered "
        "because their adapter's registered vector cannot be served",
        ["reason"],
    )


def admission_pin(extra_args: Mapping[str, Any]) -> str | list[str] | None:
    """The key of the vector a request would use now, or of each vector of a composition
    (``None`` if none / invalid)."""
    try:
        if not parse_request_args(extra_args).enabled:
            return None  # an unsteered request never touches the manifest
        watcher = _state.watcher()
        manifest = watcher.current()[0]
        req = resolve(extra_args, manifest)
    except ValueError:
        return None  # validate_steering_params reports it
    if req.composed:
        entries = [watcher.entry(n) for n in req.members]
        return [e.key for e in entries if e is not None] if all(entries) else None
    if req.vector is None:
        return None
    entry = watcher.entry(req.vector)
    return entry.key if entry is not None else None
