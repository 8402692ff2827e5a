"""The registry's one long-lived writer: a lease that a second writer process cannot take.

Each write is already serialised by ``registry.lock``, so two writers never tear the manifest.
A management process does more than single writes, though: at start it removes the uploads an
earlier (killed) writer left half-done and collects superseded files; a second management
process on the same registry would delete the first's uploads in flight. So the process that
serves the management API holds this lease for its whole life: an exclusive, non-blocking
``flock`` on ``writer.lock`` (the kernel drops it when the process dies, however it dies), with
the holder's pid and host written in the file for the refusal to name. The CLI's one-off writes
do not take it; they only take ``registry.lock``.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import IO

from .manifest import RegistryError

__all__ = ["WriterLease"]


class WriterLease:
    """Hold with ``acquire()`` (``RegistryError`` with code ``conflict`` when another process
    holds it); ``release()`` or process exit gives it up."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.path = Path(root).expanduser() / "writer.lock"
        self._file: IO[str] | None = None

    def acquire(self) -> WriterLease:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RegistryError(
                f"the registry at {self.path.parent} already has a writer ({holder}): run one "
                "management process per registry (a front may run any number of workers)",
                code="conflict",
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None
