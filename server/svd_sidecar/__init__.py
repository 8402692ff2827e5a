"""svd-sidecar: manage steering vectors and front vLLM's OpenAI API with a steering toggle.

The sidecar is the registry's single writer in a deployment; the vLLM processor only reads.
Run it with ``svd-sidecar`` (or ``uvicorn svd_sidecar.app:create_app --factory``).
"""

from .app import create_app
from .settings import SidecarSettings

__all__ = ["SidecarSettings", "create_app"]
