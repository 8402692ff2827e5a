"""svd-vllm: Steering Vector Decoding (Hu et al., NeurIPS 2025) served on vLLM.

Public API (stable names):

* math:        ``exact_delta``, ``precomputed_delta``, ``confidence_mask``, ``steer``,
               ``gauss_newton_mu``, ``gauss_newton_terms``, ``aggregate_mu``, ``pooled_mu``,
               ``log_ratio``, ``svd_logits``
* artifact:    ``SteeringArtifact``, ``ArtifactMeta``, ``ArtifactError``, ``save_artifact``,
               ``load_artifact``, ``validate_artifact``
* reference:   ``ReferenceDecoder`` (transformers + peft; exact and precomputed SVD)
* calibration: ``extract_vector``, ``CalibrationItem``
"""

from importlib import import_module
from typing import Any

from .core import MATH_API

__version__ = "0.1.0"

#: Public name -> (module, attribute). Imported on first use (PEP 562): the sidecar imports
#: ``svd_vllm.registry`` without torch, and the plugin without transformers or peft.
_LAZY: dict[str, tuple[str, str]] = {
    **{
        n: ("svd_vllm.core.artifact", n)
        for n in ("ArtifactError", "ArtifactMeta", "CalibrationStats", "SteeringArtifact")
    },
    "load_artifact": ("svd_vllm.core.artifact", "load"),
    "save_artifact": ("svd_vllm.core.artifact", "save"),
    "validate_artifact": ("svd_vllm.core.artifact", "validate"),
    **{n: ("svd_vllm.core.steering", n) for n in MATH_API},
    "ReferenceDecoder": ("svd_vllm.offline.reference", "ReferenceDecoder"),
    "extract_vector": ("svd_vllm.offline.extraction", "extract_vector"),
    "CalibrationItem": ("svd_vllm.offline.extraction", "CalibrationItem"),
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'svd_vllm' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
