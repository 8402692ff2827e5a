"""The registry's current manifest as a long-lived process sees it (torch-free).

``ManifestWatcher`` re-reads the manifest only when ``os.stat`` says it changed, and verifies
each vector file once per state of it, so vLLM's admission and the sidecar can consult it on
every request for the cost of a ``stat``.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from ..core.artifact import ArtifactError
from .directory import Registry
from .manifest import Manifest, RegistryError, VectorEntry

__all__ = ["ManifestWatcher", "file_signature"]

# A child of vLLM's logger, so lines show up in vLLM's log format when served.
logger = logging.getLogger("vllm.svd_vllm")


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime ns, size) of a file, or None if it cannot be stat'ed: what "this file
    changed" means for every cache here (a replaced or rewritten file changes it)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class ManifestWatcher:
    """The current manifest of a registry, cached by the manifest file's stat signature."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._sig: object = object()  # never equal to a real signature: first call loads
        self._manifest = Manifest()
        self._lock = threading.Lock()
        # (file, content hash) -> (stat signature when checked, problem or None)
        self._checked: dict[tuple[str, str], tuple[object, str | None]] = {}

    def current(self) -> tuple[Manifest, bool]:
        """(manifest, changed since the last call). A broken manifest keeps the last good one."""
        sig = file_signature(self.registry.manifest_path)
        with self._lock:
            if sig == self._sig:
                return self._manifest, False
            try:
                m = self.registry.manifest() if sig is not None else Manifest()
            except RegistryError as e:
                logger.error("svd-vllm: %s; keeping the previous manifest", e)
                self._sig = sig
                return self._manifest, False
            self._sig, self._manifest = sig, m
            return m, True

    def entry(self, name: str) -> VectorEntry | None:
        return self.current()[0].vectors.get(name)

    def problem(self, entry: VectorEntry, vocab_size: int | None = None) -> str | None:
        """Why ``entry``'s file cannot serve (missing, corrupt, content hash or vocab size
        mismatch), or None. The file is read and verified once per state of it (its stat
        signature), so a per-request check costs one ``stat``; an edited file is read again."""
        path = self.registry.root / entry.file
        stat = file_signature(path)
        if stat is None:
            return f"its file cannot be read ({path} is missing or inaccessible)"
        sig: object = (stat, vocab_size)
        key = (entry.file, entry.content_hash)
        with self._lock:
            hit = self._checked.get(key)
        if hit is not None and hit[0] == sig:
            return hit[1]
        try:
            self.registry.load(entry, expected_vocab_size=vocab_size)
            found = None
        except (ArtifactError, RegistryError, OSError) as e:
            found = str(e)
        with self._lock:
            self._checked[key] = (sig, found)
            while len(self._checked) > 1024:
                self._checked.pop(next(iter(self._checked)))
        return found
