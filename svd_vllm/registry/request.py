"""The steering-request contract: what a request may ask for, and whether it can be served.

One module, imported by vLLM's admission, the engine and the sidecar alike, so the three never
disagree. Steering arguments arrive in ``SamplingParams.extra_args``; clients send them in the
OpenAI body as ``vllm_xargs`` (flat scalars; JSON ``true`` arrives as ``1``):

* ``svd``        -- 1 on / 0 off; absent = the server default (``SVD_VLLM_DEFAULT=off|on``).
                    An explicit 0 always wins.
* ``svd_vector`` -- vector name; default = the request's LoRA adapter name. A list of up to
                    ``MAX_MEMBERS`` distinct names composes them (``vllm_xargs`` takes lists).
* ``svd_scale``  -- multiplier on the vector's strength (default: the vector's default scale);
                    with a list of vectors, a list of as many scales.
* ``svd_alpha``  -- confidence-mask threshold override in (0, 1]; for a composition the default
                    is the smallest alpha among its vectors.

The plugin stamps the LoRA name under ``LORA_KEY`` and the vector version current at admission
under ``PIN_KEY``. :func:`resolve` turns arguments into a :class:`SteeringRequest` (composition
names expanded); :func:`check_request` adds whether the registry can serve it. Pure: no vLLM,
no process state (``svd_vllm.vllm.admission`` keeps that).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from ..core.settings import engine_settings
from ..core.validation import check_alpha, check_scale, finite
from .manifest import (
    MAX_MEMBERS,
    CompositionEntry,
    Manifest,
    RegistryError,
    VectorEntry,
    servable,
)

__all__ = [
    "ALPHA_KEY",
    "ENABLE_KEY",
    "INTERNAL_KEYS",
    "LORA_KEY",
    "PIN_KEY",
    "SCALE_KEY",
    "STEERING_KEYS",
    "VECTOR_KEY",
    "XARGS_NAMES",
    "ArgNames",
    "SteeringError",
    "SteeringRequest",
    "check_request",
    "default_on",
    "parse_request_args",
    "resolve",
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
    return engine_settings().default


@dataclass(frozen=True)
class SteeringRequest:
    """What one request asks for, before the registry is consulted."""

    enabled: bool  # steer if a vector resolves
    explicit: bool  # the client set ``svd`` itself
    alpha: float | None
    vector: str | None = None  # the vector to use (explicit name, else the LoRA name)
    vector_explicit: bool = False  # the client named the vector
    scale: float | None = None
    pinned: str | None = None  # "name@version#hash" fixed at first admission
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
            enabled,
            explicit,
            alpha,
            vector_explicit=True,
            members=members,
            scales=scales,
            pins=_member_pins(args, len(members)),
        )
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
        enabled,
        explicit,
        alpha,
        vector=vector,
        vector_explicit=vector_explicit,
        scale=scale,
        pinned=pinned if isinstance(pinned, str) else None,
    )


class RegisteredNames(Protocol):
    """What the contract reads of a registry: its vectors and compositions by name (a
    ``Manifest``, or the snapshot an engine's vector store serves from)."""

    @property
    def vectors(self) -> Mapping[str, VectorEntry]: ...

    @property
    def compositions(self) -> Mapping[str, CompositionEntry]: ...


def resolve(
    extra_args: Mapping[str, Any] | None,
    registered: RegisteredNames,
    *,
    server_default: bool | None = None,
) -> SteeringRequest:
    """What a request asks for, against the registry's current names: its arguments parsed and
    checked (``ValueError`` names the offending field), and a name that is a registered
    composition expanded into its members (:func:`expand_composition`)."""
    req = parse_request_args(extra_args, server_default=server_default)
    return expand_composition(req, registered, extra_args)


def expand_composition(
    req: SteeringRequest, registered: RegisteredNames, extra_args: Mapping[str, Any] | None
) -> SteeringRequest:
    """The one rule for how a requested name resolves to a composition (admission, the engine
    and the sidecar all call it). A request whose vector name is a registered composition
    becomes that composition: each member at its scale (else its vector's default scale) times
    the request's ``svd_scale``; alpha = the request's, else the composition's, else the
    members' smallest. A disabled composition comes back with ``composition`` set and no
    members (nothing to steer with). Anything else is returned unchanged."""
    vectors = registered.vectors
    if req.composed or req.vector is None or req.vector in vectors:
        return req
    comp = registered.compositions.get(req.vector)
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
        req,
        vector=None,
        scale=None,
        alpha=req.alpha if req.alpha is not None else comp.alpha,
        pinned=None,
        members=members,
        scales=tuple(scales),
        pins=pinned,
        composition=comp.name,
    )


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
        req = resolve(extra_args, manifest, server_default=server_default)
    except ValueError as e:
        raise SteeringError(str(e)) from None
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
