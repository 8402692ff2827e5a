"""Admission (vLLM frontend process): per-request steering arguments, their checks, the pin.

Steering arguments arrive in ``SamplingParams.extra_args``.

Clients send them in the OpenAI request body as ``vllm_xargs`` (flat scalars; JSON ``true``
arrives as ``1``):

* ``svd``        -- 1 on / 0 off; absent = the server default (``SVD_VLLM_DEFAULT=off|on``).
                    An explicit 0 always wins.
* ``svd_vector`` -- vector name; default = the request's LoRA adapter name. A list of up to
                    ``MAX_MEMBERS`` distinct names composes them (``vllm_xargs`` takes lists).
* ``svd_scale``  -- multiplier on the vector's strength (default: the vector's default scale);
                    with a list of vectors, a list of as many scales.
* ``svd_alpha``  -- confidence-mask threshold override in (0, 1]; for a composition the default
                    is the smallest alpha among its vectors.

The LoRA name is stamped by the ``vllm.general_plugins`` hook under ``LORA_KEY``, and the
vector version current at admission under ``PIN_KEY``. This module owns the frontend's view of
the registry (a watched manifest) and the served model's vocab size that admission checks
against; it does not import vLLM, so the sidecar shares its keys and rules.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..core.validation import MAX_ABS_SCALE, check_alpha, check_scale, finite
from ..registry import (
    MAX_MEMBERS,
    CompositionEntry,
    Manifest,
    Registry,
    RegistryError,
    VectorEntry,
    servable,
)
from ..registry.manifest_watcher import ManifestWatcher

__all__ = [
    "ALPHA_KEY",
    "ENABLE_KEY",
    "INTERNAL_KEYS",
    "LORA_KEY",
    "MAX_ABS_SCALE",
    "PIN_KEY",
    "SCALE_KEY",
    "STEERING_KEYS",
    "VECTOR_KEY",
    "XARGS_NAMES",
    "ArgNames",
    "SteeringError",
    "SteeringRequest",
    "admission_pin",
    "check_request",
    "default_on",
    "parse_request_args",
    "reset_state",
    "served_vocab_size",
    "set_processors_skipped",
    "set_served_vocab_size",
    "set_stamping",
    "validate_steering_params",
]

ENABLE_KEY = "svd"
VECTOR_KEY = "svd_vector"
SCALE_KEY = "svd_scale"
ALPHA_KEY = "svd_alpha"
#: Stamped by the adapter-identity hook: the request's LoRA adapter name.
LORA_KEY = "svd_lora_name"
#: Stamped by the engine on first admission: the exact vector version the request uses.
PIN_KEY = "svd_pinned"
#: The keys only the plugin may write; client-sent values are dropped at admission.
INTERNAL_KEYS = (LORA_KEY, PIN_KEY)
#: The keys a client steers with.
STEERING_KEYS = (ENABLE_KEY, VECTOR_KEY, SCALE_KEY, ALPHA_KEY)
#: The most vectors one request may compose (the registry's rule for compositions, too).

_TRUE = {"1", "true", "on", "yes"}
_FALSE = {"0", "false", "off", "no"}


def default_on() -> bool:
    """The server-wide default from ``SVD_VLLM_DEFAULT`` (``off`` unless set to ``on``)."""
    value = os.environ.get("SVD_VLLM_DEFAULT", "off").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE or value == "":
        return False
    raise ValueError(f"SVD_VLLM_DEFAULT must be 'on' or 'off', got {value!r}")


@dataclass(frozen=True)
class SteeringRequest:
    """What one request asks for, before the registry is consulted."""

    enabled: bool  # steer if a vector resolves
    explicit: bool  # the client set ``svd`` itself
    vector: str | None  # the vector to use (explicit name, else the LoRA name)
    vector_explicit: bool  # the client named the vector
    scale: float | None
    alpha: float | None
    pinned: str | None  # "name@version#hash" fixed at first admission
    #: A composition: the vectors' names and scales (empty for a single vector). The request
    #: steers with one combined shift ``sum_i strength_i(scale_i) * shift_i`` at strength 1.
    members: tuple[str, ...] = ()
    scales: tuple[float | None, ...] = ()
    pins: tuple[str, ...] = ()  # each member's pinned key, in order
    composition: str | None = None  # the registered composition it came from, if any

    @property
    def composed(self) -> bool:
        return bool(self.members)

    @property
    def disabled_composition(self) -> bool:
        """The name resolved to a registered composition that is switched off."""
        return self.composition is not None and not self.members


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"vllm_xargs.{ENABLE_KEY} must be 1 or 0 (or true/false), got {value!r}")


def _as_float(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"vllm_xargs.{key} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"vllm_xargs.{key} must be a number, got {value!r}") from None
    return finite(out, f"vllm_xargs.{key}")


def parse_request_args(
    extra_args: Mapping[str, Any] | None, *, server_default: bool | None = None
) -> SteeringRequest:
    """Parse and check the steering arguments; ``ValueError`` names the offending field."""
    args = extra_args or {}
    on = default_on() if server_default is None else server_default
    explicit = ENABLE_KEY in args and args[ENABLE_KEY] is not None
    enabled = _as_bool(args[ENABLE_KEY]) if explicit else on
    alpha = args.get(ALPHA_KEY)
    if alpha is not None:
        alpha = check_alpha(_as_float(alpha, ALPHA_KEY), f"vllm_xargs.{ALPHA_KEY}")
    vector = args.get(VECTOR_KEY)
    if isinstance(vector, list | tuple):
        members, scales = _composition(vector, args.get(SCALE_KEY))
        return SteeringRequest(
            enabled=enabled, explicit=explicit, vector=None, vector_explicit=True, scale=None,
            alpha=alpha, pinned=None, members=members, scales=scales,
            pins=_member_pins(args, len(members)),
        )  # fmt: skip
    vector_explicit = vector is not None
    if vector_explicit and (not isinstance(vector, str) or not vector):
        raise ValueError(f"vllm_xargs.{VECTOR_KEY} must be a vector name, got {vector!r}")
    if vector is None:
        lora = args.get(LORA_KEY)
        vector = lora if isinstance(lora, str) and lora else None
    scale = args.get(SCALE_KEY)
    if isinstance(scale, list | tuple):
        raise ValueError(
            f"vllm_xargs.{SCALE_KEY} is a list, but {VECTOR_KEY} names one vector: send "
            f"{VECTOR_KEY} as a list of as many names to compose vectors"
        )
    if scale is not None:
        scale = check_scale(_as_float(scale, SCALE_KEY), f"vllm_xargs.{SCALE_KEY}")
    pinned = args.get(PIN_KEY)
    return SteeringRequest(
        enabled=enabled,
        explicit=explicit,
        vector=vector,
        vector_explicit=vector_explicit,
        scale=scale,
        alpha=alpha,
        pinned=pinned if isinstance(pinned, str) else None,
    )


def expand_composition(
    req: SteeringRequest,
    compositions: Mapping[str, CompositionEntry],
    vectors: Mapping[str, VectorEntry],
    extra_args: Mapping[str, Any] | None,
) -> SteeringRequest:
    """The one rule for how a requested name resolves to a composition (admission, the engine
    and the sidecar all call it). A request whose vector name is a registered composition
    becomes that composition: each member at its scale (else its vector's default scale) times
    the request's ``svd_scale``; alpha = the request's, else the composition's, else the
    members' smallest. A disabled composition comes back with ``composition`` set and no
    members (nothing to steer with). Anything else is returned unchanged."""
    if req.composed or req.vector is None or req.vector in vectors:
        return req
    comp = compositions.get(req.vector)
    if comp is None:
        return req
    if not comp.enabled:
        return replace(req, composition=comp.name)
    factor = 1.0 if req.scale is None else req.scale
    scales: list[float | None] = []
    for m in comp.members:
        base = (
            m.scale
            if m.scale is not None
            else getattr(vectors.get(m.vector), "default_scale", None)
        )
        scales.append(None if base is None else base * factor)
    members = tuple(m.vector for m in comp.members)
    pinned = _member_pins(extra_args or {}, len(members))
    return replace(
        req, vector=None, scale=None, alpha=req.alpha if req.alpha is not None else comp.alpha,
        pinned=None, members=members, scales=tuple(scales), pins=pinned, composition=comp.name,
    )  # fmt: skip


def _member_pins(args: Mapping[str, Any], n: int) -> tuple[str, ...]:
    """The pinned member keys the plugin stamped for a composition of ``n`` (else none)."""
    pins = args.get(PIN_KEY)
    if isinstance(pins, list | tuple) and len(pins) == n and all(isinstance(k, str) for k in pins):
        return tuple(pins)
    return ()


def _composition(
    names: list[Any] | tuple[Any, ...], raw_scales: Any
) -> tuple[tuple[str, ...], tuple[float | None, ...]]:
    """The checked names and scales of a composed request (``ValueError`` names the field)."""
    if not names:
        raise ValueError(f"vllm_xargs.{VECTOR_KEY} is an empty list: name 1 to {MAX_MEMBERS}")
    if len(names) > MAX_MEMBERS:
        raise ValueError(
            f"vllm_xargs.{VECTOR_KEY} lists {len(names)} vectors; at most {MAX_MEMBERS} compose"
        )
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n:
            raise ValueError(f"vllm_xargs.{VECTOR_KEY}[{i}] must be a vector name, got {n!r}")
    seen: set[str] = set()
    for i, n in enumerate(names):
        if n in seen:
            raise ValueError(f"vllm_xargs.{VECTOR_KEY}[{i}]: {n!r} is listed twice")
        seen.add(n)
    if raw_scales is None:
        return tuple(names), (None,) * len(names)
    if not isinstance(raw_scales, list | tuple):
        raise ValueError(
            f"vllm_xargs.{SCALE_KEY} must be a list of {len(names)} numbers when "
            f"{VECTOR_KEY} lists {len(names)} vectors, got {raw_scales!r}"
        )
    if len(raw_scales) != len(names):
        raise ValueError(
            f"vllm_xargs.{SCALE_KEY} has {len(raw_scales)} values but {VECTOR_KEY} lists "
            f"{len(names)} vectors"
        )
    scales = tuple(
        check_scale(_as_float(v, f"{SCALE_KEY}[{i}]"), f"vllm_xargs.{SCALE_KEY}[{i}]")
        for i, v in enumerate(raw_scales)
    )
    return tuple(names), scales


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


class SteeringError(ValueError):
    """A request vLLM (and the sidecar) refuses with a 400; ``code`` says why, for the sidecar:
    ``steering`` (bad arguments), ``unknown_vector``, ``disabled_vector``, ``vocab_size`` or
    ``unloadable_vector``. A ``ValueError``, so vLLM's admission answers it with a 400."""

    def __init__(self, message: str, code: str = "steering") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ArgNames:
    """How errors name the fields a client sent: ``vllm_xargs`` keys for the engine, the
    ``steering`` object's fields for the sidecar's front."""

    enable: str = f"vllm_xargs.{ENABLE_KEY}"
    vector: str = f"vllm_xargs.{VECTOR_KEY}"


XARGS_NAMES = ArgNames()


def check_request(
    extra_args: Mapping[str, Any] | None,
    manifest: Manifest,
    problem: Callable[[VectorEntry], str | None],
    served_vocab: int | None,
    *,
    stamping: bool = True,
    server_default: bool | None = None,
    names: ArgNames = XARGS_NAMES,
    unservable_default: Callable[[str, str], None] | None = None,
) -> SteeringRequest:
    """The one rule for "can this request steer as it asks": its arguments parse, and every
    vector it asks for by name (or with ``svd=1``) exists, is enabled, has the served vocab size
    and loads (``problem(entry)`` is None). Used by vLLM's admission and by the sidecar's front,
    so the front never forwards a request the engine refuses. ``SteeringError`` otherwise.

    A request steered only by the server default is never refused: ``unservable_default(name,
    reason)`` hears about an enabled vector of its adapter that cannot serve.
    """
    if not stamping:
        sent = sorted(k for k in INTERNAL_KEYS if k in (extra_args or {}))
        if sent:
            raise SteeringError(
                f"vllm_xargs.{sent[0]} is written by svd-vllm's vLLM plugin only (it is not "
                "active in this server: see VLLM_PLUGINS); clients may not send it"
            )
    try:
        req = parse_request_args(extra_args, server_default=server_default)
    except ValueError as e:
        raise SteeringError(str(e)) from None
    req = expand_composition(req, manifest.compositions, manifest.vectors, extra_args)
    wants = req.vector_explicit or (req.explicit and req.enabled)
    check = _Checker(manifest, problem, served_vocab, req.enabled)
    if req.composed:
        for i, name in enumerate(req.members):
            field = (
                f"{names.vector}[{i}]"
                if req.composition is None
                else f"composition {req.composition!r}, vector {i}"
            )
            if wants:
                check.servable(name, field)
            elif req.enabled and unservable_default is not None:
                check.report_default(name, unservable_default)
        return req
    field = names.vector if req.vector_explicit else names.enable
    if wants and req.disabled_composition:
        raise SteeringError(
            f"{field}: composition {req.composition!r} is disabled", "disabled_vector"
        )
    if not wants:
        if req.enabled and req.vector is not None and unservable_default is not None:
            check.report_default(req.vector, unservable_default)
        return req
    if req.vector is None:
        why = "uses no LoRA adapter"
        if not stamping:
            why = "its LoRA adapter is unknown (svd-vllm's vLLM plugin is not active: VLLM_PLUGINS)"
        raise SteeringError(f"{names.enable}=1 but the request names no {VECTOR_KEY} and {why}")
    suffix = "" if req.vector_explicit else " for this request's LoRA adapter"
    check.servable(req.vector, field, suffix)
    return req


@dataclass(frozen=True)
class _Checker:
    """``check_request``'s per-vector rule: exists; and when steering is on, enabled, the served
    vocab size, and a file that loads."""

    manifest: Manifest
    problem: Callable[[VectorEntry], str | None]
    served: int | None
    enabled: bool

    def unservable(self, entry: VectorEntry) -> SteeringError | None:
        """Why a registered vector cannot steer this server's requests (code: ``vocab_size``
        or ``unloadable_vector``), or None. The one place vocab and loadability are checked."""
        name = entry.name
        if self.served is not None and entry.vocab_size != self.served:
            return SteeringError(
                f"steering vector {name!r} has vocab_size {entry.vocab_size} but the served model "
                f"has {self.served}",
                "vocab_size",
            )
        problem = self.problem(entry)
        if problem is not None:
            return SteeringError(
                f"steering vector {name!r} ({entry.key}) cannot be loaded: {problem}",
                "unloadable_vector",
            )
        return None

    def servable(self, name: str, field: str, unknown_suffix: str = "") -> VectorEntry:
        """The entry a request asking for ``name`` steers with; ``SteeringError`` otherwise.
        With steering off (``svd=0``), naming a vector needs it to exist only."""
        entry = self.manifest.vectors.get(name)
        try:
            if entry is None or self.enabled:
                entry = servable(entry, name)
        except RegistryError as e:
            suffix = unknown_suffix if e.code == "unknown_vector" else ""
            raise SteeringError(f"{field}: {e}{suffix}", e.code) from None
        why = self.unservable(entry) if self.enabled else None
        if why is not None:  # asked for by name or by svd=1: never a quiet fallback
            raise SteeringError(f"{field}: {why}", why.code) from None
        return entry

    def report_default(self, name: str, report: Callable[[str, str], None]) -> None:
        """Tell ``report`` (name, reason label) about an enabled vector that the server default
        would steer with but that cannot serve."""
        entry = self.manifest.vectors.get(name)
        if entry is None or not entry.enabled:
            return  # no vector for this adapter, or switched off on purpose: nothing is wrong
        why = self.unservable(entry)
        if why is not None:
            report(name, _DEFAULT_UNSERVABLE_LABELS[why.code])


#: ``svd_vllm_default_unsteered_total``'s ``reason`` label for each refusal code.
_DEFAULT_UNSERVABLE_LABELS = {"vocab_size": "vocab_size", "unloadable_vector": "unloadable"}


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
        req = parse_request_args(extra_args)
    except ValueError:
        return None  # validate_steering_params reports it
    if not req.enabled:
        return None
    watcher = _state.watcher()
    manifest = watcher.current()[0]
    req = expand_composition(req, manifest.compositions, manifest.vectors, extra_args)
    if req.composed:
        entries = [watcher.entry(n) for n in req.members]
        return [e.key for e in entries if e is not None] if all(entries) else None
    if req.vector is None:
        return None
    entry = watcher.entry(req.vector)
    return entry.key if entry is not None else None
