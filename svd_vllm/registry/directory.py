"""The steering-vector registry: a directory of immutable artifact files and one manifest.

Layout (``$SVD_VLLM_REGISTRY``, default ``~/.local/share/svd-vllm/registry``)::

    manifest.json                       # the only mutable file; replaced atomically
    registry.lock                       # flock: serialises writers
    vectors/<name>/v<version>-<hash12>.safetensors   # immutable once written

Every write takes the lock, writes the artifact (temp file, fsync, rename), then replaces
the manifest the same way, last. A writer killed at any point leaves the previous manifest,
which only names complete files: readers never see a torn entry. Each vector name has a
version that only grows, even across delete and re-register. Readers (the vLLM processor,
the sidecar, the CLI) need no lock: they read ``manifest.json`` and the files it names.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import (
    ValidationError,
)

from ..core import artifact as _artifact
from ..core.artifact import ArtifactError, SteeringArtifact, atomic_write_bytes
from ..core.settings import EngineSettings, engine_settings
from ..core.validation import check_scale, pydantic_message
from .manifest import (
    _PRESET_RE,
    MANIFEST_FORMAT,
    CompositionEntry,
    Manifest,
    Member,
    PresetEntry,
    RegistryError,
    SettingsPatch,
    VectorEntry,
    _now,
    check_name,
)

_Named = TypeVar("_Named", CompositionEntry, PresetEntry)

__all__ = ["DEFAULT_REGISTRY", "GC_GRACE_SECONDS", "Registry", "default_registry_path"]

#: The default registry directory, as ``EngineSettings`` defines it (one source).
DEFAULT_REGISTRY = str(EngineSettings.model_fields["registry"].default)
#: Files of superseded versions are kept this long for readers that still load them.
GC_GRACE_SECONDS = 600.0


def default_registry_path() -> Path:
    """``SVD_VLLM_REGISTRY`` (``svd_vllm.core.settings``), ``~/.local/share/svd-vllm/registry``
    unless set."""
    return engine_settings().registry


class Registry:
    """Library API over one registry directory: add / replace / update / remove / list."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_registry_path()

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    # -- reading (lock-free) -------------------------------------------------------------
    def manifest(self) -> Manifest:
        try:
            raw = self.manifest_path.read_bytes()
        except FileNotFoundError:
            return Manifest()
        try:
            m = Manifest.model_validate_json(raw)
        except ValueError as e:
            raise RegistryError(
                f"{self.manifest_path}: unreadable manifest ({e})", code="unreadable"
            ) from e
        if m.format != MANIFEST_FORMAT:
            raise RegistryError(
                f"{self.manifest_path}: unsupported manifest format {m.format}", code="unreadable"
            )
        return m

    def list(self) -> list[VectorEntry]:
        return sorted(self.manifest().vectors.values(), key=lambda e: e.name)

    def get(self, name: str) -> VectorEntry:
        entry = self.manifest().vectors.get(name)
        if entry is None:
            raise RegistryError(f"no vector named {name!r}", code="not_found")
        return entry

    def load(
        self, entry: VectorEntry | str, *, expected_vocab_size: int | None = None
    ) -> SteeringArtifact:
        """The artifact of an entry, verified against the manifest's content hash."""
        if isinstance(entry, str):
            entry = self.get(entry)
        art = _artifact.load(self.root / entry.file, expected_vocab_size=expected_vocab_size)
        if art.meta.content_hash != entry.content_hash:
            raise ArtifactError(
                self.root / entry.file, "content hash differs from the manifest", code="hash"
            )
        return art

    # -- writing (locked) ----------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[Manifest]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "registry.lock", "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield self.manifest()
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _commit(self, m: Manifest) -> None:
        m.generation += 1
        omit = None if m.presets else {"presets"}
        atomic_write_bytes(self.manifest_path, m.model_dump_json(indent=2, exclude=omit).encode())

    def add(
        self,
        art: SteeringArtifact,
        *,
        name: str | None = None,
        replace: bool = False,
        expected_vocab_size: int | None = None,
        default_scale: float | None = None,
    ) -> VectorEntry:
        """Register ``art`` under ``name`` (default: the artifact's name).

        An existing name is replaced only with ``replace=True`` (its settings are kept and its
        version bumped); without it the call fails with code ``conflict``.
        """
        name = check_name(art.meta.name if name is None else name)
        if expected_vocab_size is not None and art.meta.vocab_size != expected_vocab_size:
            raise RegistryError(
                f"vector vocab_size {art.meta.vocab_size} does not match the served model's "
                f"{expected_vocab_size}"
            )
        if default_scale is not None:
            try:
                check_scale(default_scale, "default_scale")
            except ValueError as e:
                raise RegistryError(str(e)) from e
        data = _artifact.to_bytes(art)
        with self._locked() as m:
            if name in m.compositions:
                raise RegistryError(
                    f"{name!r} is a composition; a vector needs its own name", code="conflict"
                )
            old = m.vectors.get(name)
            if old is not None and not replace:
                raise RegistryError(
                    f"a vector named {name!r} exists (version {old.version}); pass replace",
                    code="conflict",
                )
            version = max(m.last_version.get(name, 0), old.version if old else 0) + 1
            rel = (
                f"vectors/{name}/v{version}-{art.meta.content_hash.split(':')[-1][:12]}.safetensors"
            )
            atomic_write_bytes(self.root / rel, data)
            written = self.root / rel
            keep: dict[str, Any] = {}
            if old is not None:
                keep = old.model_dump(
                    include={
                        "mu_bar_override",
                        "alpha_override",
                        "default_scale",
                        "enabled",
                        "created",
                    }
                )
            if default_scale is not None:
                keep["default_scale"] = default_scale
            entry = VectorEntry(
                name=name,
                version=version,
                content_hash=art.meta.content_hash,
                file=rel,
                vocab_size=art.meta.vocab_size,
                base_model=art.meta.base_model,
                adapter=art.meta.adapter,
                mu_bar=art.meta.mu_bar,
                alpha=art.meta.alpha,
                **keep,
            )
            m.vectors[name] = entry
            m.last_version[name] = version
            try:
                self._commit(m)
            except BaseException:
                written.unlink(missing_ok=True)  # never left behind unnamed (e.g. disk full)
                raise
            if old is not None and old.file != rel:
                self._retire(old)
            self._gc(m)
        return entry

    def add_file(self, path: str | os.PathLike[str], **kwargs: Any) -> VectorEntry:
        """Validate an artifact file and register it (see ``add``)."""
        return self.add(_artifact.load(path), **kwargs)

    _SETTINGS = ("mu_bar_override", "alpha_override", "default_scale", "enabled")

    def update(self, name: str, patch: SettingsPatch | None = None, **changes: Any) -> VectorEntry:
        """Change serving settings, from a ``SettingsPatch`` or as entry fields
        (``mu_bar_override``, ``alpha_override``, ``default_scale``, ``enabled``); bumps the
        version so new requests pick the change up."""
        if patch is not None:
            changes = {**patch.changes(), **changes}
        unknown = set(changes) - set(self._SETTINGS)
        if unknown:
            raise RegistryError(f"unknown settings {sorted(unknown)}; use {list(self._SETTINGS)}")
        if changes.get("default_scale") is not None:
            try:
                check_scale(changes["default_scale"], "default_scale")
            except ValueError as e:
                raise RegistryError(f"invalid settings for {name!r}: {e}") from e
        with self._locked() as m:
            old = m.vectors.get(name)
            if old is None:
                raise RegistryError(f"no vector named {name!r}", code="not_found")
            version = max(m.last_version.get(name, 0), old.version) + 1
            try:
                entry = VectorEntry.model_validate(
                    {**old.model_dump(), **changes, "version": version, "updated": _now()}
                )
            except ValueError as e:
                raise RegistryError(f"invalid settings for {name!r}: {e}") from e
            m.vectors[name] = entry
            m.last_version[name] = version
            self._commit(m)
        return entry

    def remove(self, name: str) -> VectorEntry:
        with self._locked() as m:
            users = sorted(
                c.name for c in m.compositions.values() if any(x.vector == name for x in c.members)
            )
            if users and name in m.vectors:
                raise RegistryError(
                    f"vector {name!r} is a member of composition(s) {users}; change or remove "
                    "them first",
                    code="conflict",
                )
            old = m.vectors.pop(name, None)
            if old is None:
                raise RegistryError(f"no vector named {name!r}", code="not_found")
            m.last_version[name] = max(m.last_version.get(name, 0), old.version)
            self._commit(m)
            self._retire(old)
            self._gc(m)
        return old

    # -- compositions ----------------------------------------------------------------------
    def compositions(self) -> builtins.list[CompositionEntry]:
        return sorted(self.manifest().compositions.values(), key=lambda c: c.name)

    def compose(
        self,
        name: str,
        members: Sequence[Member | tuple[str, float | None]],
        *,
        alpha: float | None = None,
        enabled: bool = True,
        replace: bool = False,
    ) -> CompositionEntry:
        """Register (or with ``replace``, change) the composition ``name`` of registered
        vectors; a name is a vector or a composition, never both."""
        check_name(name)
        parts = [m if isinstance(m, Member) else Member(vector=m[0], scale=m[1]) for m in members]
        with self._locked() as m:
            if name in m.vectors:
                raise RegistryError(
                    f"{name!r} is a vector; a composition needs its own name", code="conflict"
                )
            for i, part in enumerate(parts):
                if part.vector not in m.vectors:
                    raise RegistryError(
                        f"members[{i}]: no vector named {part.vector!r}", code="unknown_vector"
                    )
            old = m.compositions.get(name)
            if old is not None and not replace:
                raise RegistryError(f"composition {name!r} exists (replace it)", code="conflict")
            # Versions only grow, across delete and re-create too (the counter is shared with
            # vectors: a name is one or the other), so a version never names two contents.
            version = max(m.last_version.get(name, 0), old.version if old else 0) + 1
            try:
                entry = CompositionEntry(
                    name=name,
                    members=tuple(parts),
                    alpha=alpha,
                    enabled=enabled,
                    version=version,
                    created=old.created if old is not None else _now(),
                )
            except ValueError as e:
                raise RegistryError(f"invalid composition {name!r}: {e}", code="validation") from e
            m.compositions[name] = entry
            m.last_version[name] = version
            self._commit(m)
        return entry

    def remove_composition(self, name: str) -> CompositionEntry:
        return self._remove(name, "composition", name, lambda m: m.compositions)

    # -- presets --------------------------------------------------------------------------
    def presets(self) -> builtins.list[PresetEntry]:
        return sorted(self.manifest().presets.values(), key=lambda p: p.name)

    def set_preset(self, name: str, scale: float, *, alpha: float | None = None) -> PresetEntry:
        """Create or change the preset ``name``; its version only grows (across removal too)."""
        if not isinstance(name, str) or not _PRESET_RE.fullmatch(name):
            raise RegistryError(
                f"invalid preset name {name!r}: use 1-32 lowercase letters, digits, '_' or '-', "
                "starting with a letter or digit",
                code="invalid",
            )
        key = f"preset:{name}"
        with self._locked() as m:
            old = m.presets.get(name)
            version = max(m.last_version.get(key, 0), old.version if old else 0) + 1
            try:
                entry = PresetEntry(
                    name=name,
                    scale=scale,
                    alpha=alpha,
                    version=version,
                    created=old.created if old is not None else _now(),
                )
            except ValidationError as e:
                raise RegistryError(
                    f"invalid preset {name!r}: {pydantic_message(e)}", code="validation"
                ) from e
            m.presets[name] = entry
            m.last_version[key] = version
            self._commit(m)
        return entry

    def remove_preset(self, name: str) -> PresetEntry:
        return self._remove(name, "preset", f"preset:{name}", lambda m: m.presets)

    def _remove(
        self, name: str, what: str, key: str, table: Callable[[Manifest], dict[str, _Named]]
    ) -> _Named:
        """Remove ``name`` from a manifest table; its version counter (``key``) is kept, so a
        re-created entry never reuses a version."""
        with self._locked() as m:
            old = table(m).pop(name, None)
            if old is None:
                raise RegistryError(f"no {what} named {name!r}", code="not_found")
            m.last_version[key] = max(m.last_version.get(key, 0), old.version)
            self._commit(m)
        return old

    def _retire(self, entry: VectorEntry) -> None:
        """Start the grace period of a superseded file now (it counts from its mtime)."""
        with contextlib.suppress(OSError):
            os.utime(self.root / entry.file)

    def _gc(self, m: Manifest, grace: float = GC_GRACE_SECONDS) -> None:
        """Delete artifact files no manifest entry names, once older than ``grace`` seconds."""
        live = {e.file for e in m.vectors.values()}
        vec_dir = self.root / "vectors"
        if not vec_dir.is_dir():
            return
        cutoff = time.time() - grace
        for p in vec_dir.glob("*/*.safetensors"):
            rel = p.relative_to(self.root).as_posix()
            with contextlib.suppress(OSError):
                if rel not in live and p.stat().st_mtime < cutoff:
                    p.unlink()
        for p in vec_dir.glob("*/.*.tmp"):  # temp files of killed writers
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < cutoff:
                    p.unlink()

    def cleanup(self) -> int:
        """Remove temp files of killed writers (safe under the lock: no write is in flight)."""
        if not self.root.is_dir():
            return 0
        removed = 0
        with self._locked():
            for p in [*self.root.glob(".*.tmp"), *self.root.glob("vectors/*/.*.tmp")]:
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed += 1
        return removed
