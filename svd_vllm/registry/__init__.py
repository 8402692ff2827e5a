"""The steering-vector registry: the shared store that the sidecar and CLI write and engines read.

* ``directory`` -- the on-disk registry (immutable artifact files and one atomic manifest).
* ``vector_store`` -- what an engine holds of it: a watched manifest, a host cache, a device table.
"""

from . import directory as _directory
from .directory import *  # noqa: F403  (the registry's public names)

__all__ = _directory.__all__
