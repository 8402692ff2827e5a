"""The steering-vector registry: the shared store that the sidecar and CLI write and engines read.

* ``manifest`` -- the manifest's schema: vector, composition and preset entries, their rules.
* ``directory`` -- the store: the on-disk registry (immutable artifact files, one atomic manifest).
* ``manifest_watcher`` -- the current manifest as a long-lived process sees it (admission, sidecar).
* ``writer`` -- the lease that makes one long-lived process (the management API) the writer.
* ``variants`` -- steered model names (``ADAPTER:svd``), the rule vLLM's plugin and the sidecar
  share.
* ``request`` -- the steering-request contract: what a request asks for (``resolve``) and whether
  this registry can serve it (``check_request``), the same rule in vLLM and in the sidecar.

The engine's host cache and device table of vectors live with the engine code:
``svd_vllm.vllm.vector_store``.
"""

from . import directory as _directory
from . import manifest as _manifest
from .directory import *  # noqa: F403  (the store's public names)
from .manifest import *  # noqa: F403  (the schema's)

__all__ = [*_manifest.__all__, *_directory.__all__]
