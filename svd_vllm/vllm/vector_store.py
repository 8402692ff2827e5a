"""The engine's vectors: a host cache kept fresh from the registry, and the device table.

``VectorStore`` -- a daemon thread polls the manifest (default every 0.2 s, through a
``ManifestWatcher``) and reads new or changed vectors OFF the decode path, verifying each file's
content hash. A bad file is refused with a log line and its name serves nothing until the file or
the manifest changes (never an older version the manifest no longer names: admission refuses an
explicit request for it, and in-flight requests keep the version they pinned). Host memory holds
at most ``SVD_VLLM_HOST_CACHE`` (default 64) versions, LRU.

Each steered request holds a *table row*: a row of the device table ``table`` ([rows, vocab],
float32) with its shift, one per vector version (or composition) in use, reference counted and
kept a while after its last user as a small cache. The kernel gathers ``table[table_row]`` with
no per-request Python work, and memory grows with the vectors in use, not the vectors registered.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.artifact import ArtifactError
from ..core.settings import engine_settings
from ..registry import CompositionEntry, Manifest, Registry, RegistryError, VectorEntry
from ..registry.manifest_watcher import ManifestWatcher, file_signature

__all__ = ["LoadedVector", "VectorStore"]

logger = logging.getLogger("vllm.svd_vllm")


@dataclass(frozen=True)
class LoadedVector:
    """One version of a vector, in host memory, with its serving settings."""

    entry: VectorEntry
    shift: torch.Tensor  # float32 [V], CPU (pinned when the device is a GPU)

    @property
    def key(self) -> str:
        return self.entry.key


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Verifying many new files at once allocates and frees one tensor per file; the vectors the
    host cache keeps were allocated last, so without a trim the process would keep the whole
    verification pass's peak as resident memory.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def default_host_capacity() -> int:
    """``SVD_VLLM_HOST_CACHE``: how many vector versions the engine keeps in host memory."""
    return engine_settings().host_cache


class VectorStore:
    """Registry entries kept fresh by a background thread, a bounded host cache, a device table.

    Memory does not grow with the number of registered vectors: the store keeps every current
    entry (metadata only), at most ``host_capacity`` tensors in host memory (LRU; a vector that
    was evicted is read again, hash-verified, the next time a request asks for it), and in the
    device table only the vectors requests use (plus a few idle rows).
    """

    def __init__(
        self,
        registry: Registry,
        device: torch.device | str,
        vocab_size: int,
        *,
        poll_interval: float = 0.2,
        host_capacity: int | None = None,
        start_thread: bool = True,
    ) -> None:
        self.registry = registry
        self.device = torch.device(device)
        self.vocab_size = vocab_size
        self.poll_interval = poll_interval
        self.host_capacity = default_host_capacity() if host_capacity is None else host_capacity
        if self.host_capacity < 1:
            raise ValueError("host_capacity must be >= 1")
        self.watcher = ManifestWatcher(registry)
        self._pin = self.device.type == "cuda"
        # name -> newest good entry; key -> entry of an older version still pinnable (bounded);
        # key -> host tensor (LRU, at most host_capacity).
        self._current: dict[str, VectorEntry] = {}
        self._old: OrderedDict[str, VectorEntry] = OrderedDict()
        self._host: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bad: dict[str, str] = {}  # file -> content hash we refused (log once)
        self._broken: dict[str, tuple[VectorEntry, object]] = {}  # name -> (entry, file stat)
        self._compositions: dict[str, CompositionEntry] = {}
        self.loads = 0  # files read (verification and re-reads after eviction)
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        # Device table: table row -> key, refcounts, LRU of free-but-cached rows.
        self.table = torch.zeros((4, vocab_size), dtype=torch.float32, device=self.device)
        self._row_of: dict[str, int] = {}
        self._key_of: dict[int, str] = {}
        self._refs: dict[int, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()
        self._free: list[int] = list(range(3, -1, -1))
        self.refresh()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if start_thread:
            self._thread = threading.Thread(target=self._run, name="svd-vllm-registry", daemon=True)
            self._thread.start()

    # -- host side: loading ----------------------------------------------------------------
    def _read(self, entry: VectorEntry) -> torch.Tensor | None:
        """The entry's shift read from disk and verified, or None (logged once per file)."""
        if entry.vocab_size != self.vocab_size:
            if self._bad.get(entry.file) != entry.content_hash:
                logger.error(
                    "svd-vllm: refusing vector %s: vocab_size %d does not match the model's %d",
                    entry.key,
                    entry.vocab_size,
                    self.vocab_size,
                )
                self._bad[entry.file] = entry.content_hash
            return None
        try:
            art = self.registry.load(entry, expected_vocab_size=self.vocab_size)
        except (ArtifactError, RegistryError, OSError) as e:
            if self._bad.get(entry.file) != entry.content_hash:
                logger.error("svd-vllm: refusing vector %s: %s", entry.key, e)
                self._bad[entry.file] = entry.content_hash
            return None
        self.loads += 1
        shift: torch.Tensor = art.shift.pin_memory() if self._pin else art.shift
        return shift

    def _cache(self, key: str, shift: torch.Tensor) -> None:
        """Put a tensor in the host LRU (caller holds ``_lock``)."""
        self._host[key] = shift
        self._host.move_to_end(key)
        while len(self._host) > self.host_capacity:
            self._host.popitem(last=False)

    def refresh(self) -> bool:
        """Load what changed in the manifest. Returns True if the current set changed.

        Serialised: a caller that finds a refresh in progress waits for it to finish, so
        after ``refresh()`` returns the store reflects the manifest as of the call.
        """
        with self._refresh_lock:
            return self._refresh_locked()

    def _refresh_locked(self) -> bool:
        manifest, changed = self.watcher.current()
        # A refused file that has changed since (repaired in place) is tried again.
        retry = any(
            file_signature(self.registry.root / e.file) != sig for e, sig in self._broken.values()
        )
        if not changed and not retry:
            return False
        self._broken = {n: b for n, b in self._broken.items() if manifest.vectors.get(n) == b[0]}
        if retry:
            for name, (entry, sig) in list(self._broken.items()):
                if file_signature(self.registry.root / entry.file) != sig:
                    self._bad.pop(entry.file, None)  # log it again if still bad
                    del self._broken[name]
        new_current: dict[str, VectorEntry] = {}
        fresh: list[tuple[VectorEntry, torch.Tensor | None]] = []
        reads = 0
        for name, entry in manifest.vectors.items():
            have = self._current.get(name)
            if name in self._broken:
                continue  # refused, and neither the file nor the entry has changed
            if have is not None and have == entry:
                new_current[name] = have
                continue
            if have is not None and have.content_hash == entry.content_hash:
                # Settings changed, same file content: no need to read it again.
                with self._lock:
                    shift = self._host.get(have.key)
                new_current[name] = entry
                fresh.append((entry, shift))
                continue
            shift = self._read(entry)  # verify every new file once, off the decode path
            reads += 1
            if shift is None:  # serve nothing under this name, not an older version
                self._broken[name] = (entry, file_signature(self.registry.root / entry.file))
                continue
            self._broken.pop(name, None)
            new_current[name] = entry
            fresh.append((entry, shift))
        with self._lock:
            for name, entry in self._current.items():
                if new_current.get(name) != entry:
                    self._old[entry.key] = entry  # still pinnable by in-flight requests
            for entry, shift in fresh:
                self._old.pop(entry.key, None)
                if shift is not None:
                    self._cache(entry.key, shift)
            while len(self._old) > 4 * self.host_capacity:
                self._old.popitem(last=False)
            self._current = new_current
            self._compositions = dict(manifest.compositions)
        if reads > self.host_capacity:
            release_free_memory()  # the verification pass freed more than the cache keeps
        if fresh:
            keys = [e.key for e, _ in fresh]
            shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
            logger.info("svd-vllm: loaded %s", shown)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.refresh()
            except Exception:  # never let the watcher die
                logger.exception("svd-vllm: registry refresh failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def resolve(self, name: str, pinned: str | None = None) -> LoadedVector | None:
        """The version a new row should use: the pinned one if still known, else the newest.

        A version in the host cache costs a dict lookup; one evicted from it (more vectors in
        use than ``host_capacity``) is read again and verified here.
        """
        with self._lock:
            entry = None
            if pinned is not None:
                entry = self._old.get(pinned)
                cur = self._current.get(name)
                if entry is None and cur is not None and cur.key == pinned:
                    entry = cur
                if entry is not None and entry.name != name:
                    entry = None
            if entry is None:
                entry = self._current.get(name)
            if entry is None:
                return None
            shift = self._host.get(entry.key)
            if shift is not None:
                self._host.move_to_end(entry.key)
                return LoadedVector(entry=entry, shift=shift)
        shift = self._read(entry)
        if shift is None:
            return None
        with self._lock:
            self._cache(entry.key, shift)
        return LoadedVector(entry=entry, shift=shift)

    def registered(self) -> Manifest:
        """The vectors and compositions requests resolve against, as of the last refresh (a
        ``Manifest`` view built without validation: its entries were validated when read)."""
        with self._lock:
            return Manifest.model_construct(vectors=self._current, compositions=self._compositions)

    def host_cached(self) -> int:
        """Vector versions held in host memory (bounded by ``host_capacity``)."""
        with self._lock:
            return len(self._host)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._current)

    # -- device side: the table ---------------------------------------------------------
    def acquire(self, lv: LoadedVector) -> int:
        """A table row holding ``lv`` (copied to the device once), with one more reference."""
        return self.acquire_shift(lv.key, lambda: lv.shift)

    def acquire_shift(self, key: str, make: Callable[[], torch.Tensor]) -> int:
        """A table row holding the shift under ``key`` (a vector version, or a composition of
        versions and strengths) with one more reference; ``make`` builds the shift only when no
        row holds it yet, and it is copied to the device once."""
        row = self._row_of.get(key)
        if row is None:
            shift = make()
            row = self._take_row()
            self.table[row].copy_(shift, non_blocking=self._pin and shift.is_pinned())
            self._row_of[key] = row
            self._key_of[row] = key
            self._refs[row] = 0
        self._idle.pop(row, None)
        self._refs[row] += 1
        return row

    def release(self, row: int) -> None:
        refs = self._refs.get(row)
        if refs is None:
            return
        self._refs[row] = refs - 1
        if refs - 1 <= 0:
            self._refs[row] = 0
            self._idle[row] = None  # keep the data: the next request likely wants it again

    def _take_row(self) -> int:
        if self._free:
            return self._free.pop()
        if self._idle:
            row, _ = self._idle.popitem(last=False)
            key = self._key_of.pop(row)
            del self._row_of[key]
            del self._refs[row]
            return row
        old = self.table.shape[0]
        grown = torch.zeros((old * 2, self.vocab_size), dtype=torch.float32, device=self.device)
        grown[:old].copy_(self.table)
        self.table = grown
        self._free.extend(range(old * 2 - 1, old, -1))
        return old

    def rows_in_use(self) -> int:
        return sum(1 for r in self._refs.values() if r > 0)
