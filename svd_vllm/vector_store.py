"""What the serving side holds of the registry: a watched manifest, host vectors, a device table.

* ``ManifestWatcher`` -- the registry manifest, re-read only when ``os.stat`` says it changed.
  Cheap enough to consult on every request (the frontend validates against it).
* ``VectorStore`` -- the engine side. A daemon thread polls the manifest (default every
  0.2 s) and loads new or changed vectors into host memory OFF the decode path, verifying
  each file's content hash; a bad file is refused with a log line and the name keeps its
  previous good version. Rows acquire a slot in a device table (one copy per version,
  reference counted, kept as a small cache), so ``apply`` gathers ``table[slot]`` with no
  per-row Python work, and memory grows with the vectors in use, not the vectors registered.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .artifact import ArtifactError
from .registry import Manifest, Registry, RegistryError, VectorEntry

__all__ = ["LoadedVector", "ManifestWatcher", "VectorStore"]

# A child of vLLM's logger, so lines show up in vLLM's log format when served.
logger = logging.getLogger("vllm.svd_vllm")


class ManifestWatcher:
    """The current manifest of a registry, cached by the manifest file's stat signature."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._sig: object = object()  # never equal to a real signature: first call loads
        self._manifest = Manifest()
        self._lock = threading.Lock()

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.registry.manifest_path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def current(self) -> tuple[Manifest, bool]:
        """(manifest, changed since the last call). A broken manifest keeps the last good one."""
        sig = self._signature()
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


@dataclass(frozen=True)
class LoadedVector:
    """One version of a vector, in host memory, with its serving settings."""

    entry: VectorEntry
    shift: torch.Tensor  # float32 [V], CPU (pinned when the device is a GPU)

    @property
    def key(self) -> str:
        return self.entry.key


class VectorStore:
    """Host cache of registry vectors kept fresh by a background thread, plus a device table."""

    def __init__(
        self,
        registry: Registry,
        device: torch.device | str,
        vocab_size: int,
        *,
        poll_interval: float = 0.2,
        host_capacity: int = 256,
        start_thread: bool = True,
    ) -> None:
        self.registry = registry
        self.device = torch.device(device)
        self.vocab_size = vocab_size
        self.poll_interval = poll_interval
        self.host_capacity = host_capacity
        self.watcher = ManifestWatcher(registry)
        self._pin = self.device.type == "cuda"
        # name -> newest good version; key -> any recently loaded version (LRU).
        self._current: dict[str, LoadedVector] = {}
        self._by_key: OrderedDict[str, LoadedVector] = OrderedDict()
        self._bad: dict[str, str] = {}  # file -> content hash we refused (log once)
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        # Device table: slot -> key, refcounts, LRU of free-but-cached slots.
        self.table = torch.zeros((4, vocab_size), dtype=torch.float32, device=self.device)
        self._slot_of: dict[str, int] = {}
        self._key_of: dict[int, str] = {}
        self._refs: dict[int, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()
        self._free: list[int] = list(range(3, -1, -1))
        self.generation = 0  # bumps whenever the set of current versions changes
        self.refresh()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if start_thread:
            self._thread = threading.Thread(target=self._run, name="svd-vllm-registry", daemon=True)
            self._thread.start()

    # -- host side: loading ----------------------------------------------------------------
    def _load_entry(self, entry: VectorEntry) -> LoadedVector | None:
        if entry.vocab_size != self.vocab_size:
            if self._bad.get(entry.file) != entry.content_hash:
                logger.error(
                    "svd-vllm: refusing vector %s: vocab_size %d does not match the model's %d",
                    entry.key, entry.vocab_size, self.vocab_size,
                )  # fmt: skip
                self._bad[entry.file] = entry.content_hash
            return None
        try:
            art = self.registry.load(entry, expected_vocab_size=self.vocab_size)
        except (ArtifactError, RegistryError, OSError) as e:
            if self._bad.get(entry.file) != entry.content_hash:
                logger.error("svd-vllm: refusing vector %s: %s", entry.key, e)
                self._bad[entry.file] = entry.content_hash
            return None
        shift = art.shift.pin_memory() if self._pin else art.shift
        return LoadedVector(entry=entry, shift=shift)

    def refresh(self) -> bool:
        """Load what changed in the manifest. Returns True if the current set changed.

        Serialised: a caller that finds a refresh in progress waits for it to finish, so
        after ``refresh()`` returns the store reflects the manifest as of the call.
        """
        with self._refresh_lock:
            return self._refresh_locked()

    def _refresh_locked(self) -> bool:
        manifest, changed = self.watcher.current()
        if not changed:
            return False
        new_current: dict[str, LoadedVector] = {}
        loaded: list[LoadedVector] = []
        for name, entry in manifest.vectors.items():
            have = self._current.get(name)
            if have is not None and have.entry == entry:
                new_current[name] = have
                continue
            cached = self._by_key.get(entry.key)
            if cached is not None and cached.entry == entry:
                new_current[name] = cached
                continue
            if have is not None and have.entry.content_hash == entry.content_hash:
                # Settings changed, same file content: reuse the tensor.
                lv = LoadedVector(entry=entry, shift=have.shift)
            else:
                lv = self._load_entry(entry)
            if lv is None:
                if have is not None:
                    new_current[name] = have  # the previous good version keeps serving
                continue
            new_current[name] = lv
            loaded.append(lv)
        with self._lock:
            for lv in loaded:
                self._by_key[lv.key] = lv
            self._current = new_current
            while len(self._by_key) > max(self.host_capacity, len(new_current)):
                self._by_key.popitem(last=False)
            self.generation += 1
        if loaded:
            logger.info("svd-vllm: loaded %s", ", ".join(lv.key for lv in loaded))
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
        """The version a new row should use: the pinned one if still known, else the newest."""
        with self._lock:
            if pinned is not None:
                lv = self._by_key.get(pinned)
                if lv is not None and lv.entry.name == name:
                    return lv
            return self._current.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._current)

    # -- device side: the slot table ---------------------------------------------------------
    def acquire(self, lv: LoadedVector) -> int:
        """A table slot holding ``lv`` (copied to the device once), with one more reference."""
        slot = self._slot_of.get(lv.key)
        if slot is None:
            slot = self._take_slot()
            self.table[slot].copy_(lv.shift, non_blocking=self._pin)
            self._slot_of[lv.key] = slot
            self._key_of[slot] = lv.key
            self._refs[slot] = 0
        self._idle.pop(slot, None)
        self._refs[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        refs = self._refs.get(slot)
        if refs is None:
            return
        self._refs[slot] = refs - 1
        if refs - 1 <= 0:
            self._refs[slot] = 0
            self._idle[slot] = None  # keep the data: the next request likely wants it again

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        if self._idle:
            slot, _ = self._idle.popitem(last=False)
            key = self._key_of.pop(slot)
            del self._slot_of[key]
            del self._refs[slot]
            return slot
        old = self.table.shape[0]
        grown = torch.zeros((old * 2, self.vocab_size), dtype=torch.float32, device=self.device)
        grown[:old].copy_(self.table)
        self.table = grown
        self._free.extend(range(old * 2 - 1, old, -1))
        return old

    def slots_in_use(self) -> int:
        return sum(1 for r in self._refs.values() if r > 0)
