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

from typing import Any

from .core.artifact import ArtifactError, ArtifactMeta, CalibrationStats, SteeringArtifact
from .core.artifact import load as load_artifact
from .core.artifact import save as save_artifact
from .core.artifact import validate as validate_artifact
from .core.steering import (
    aggregate_mu,
    confidence_mask,
    exact_delta,
    gauss_newton_mu,
    gauss_newton_terms,
    log_ratio,
    pooled_mu,
    precomputed_delta,
    steer,
    svd_logits,
)

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "ArtifactMeta",
    "CalibrationItem",
    "CalibrationStats",
    "ReferenceDecoder",
    "SteeringArtifact",
    "__version__",
    "aggregate_mu",
    "confidence_mask",
    "exact_delta",
    "extract_vector",
    "gauss_newton_mu",
    "gauss_newton_terms",
    "load_artifact",
    "log_ratio",
    "pooled_mu",
    "precomputed_delta",
    "save_artifact",
    "steer",
    "svd_logits",
    "validate_artifact",
]


def __getattr__(
    name: str,
) -> Any:  # lazy: transformers/peft are heavy and the plugin does not need them
    if name == "ReferenceDecoder":
        from .offline.reference import ReferenceDecoder

        return ReferenceDecoder
    if name in ("extract_vector", "CalibrationItem"):
        from .offline import extraction

        return getattr(extraction, name)
    raise AttributeError(f"module 'svd_vllm' has no attribute {name!r}")
