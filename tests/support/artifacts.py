"""The one steering-artifact factory the tests share: a seeded random shift with metadata."""

from __future__ import annotations

from typing import Any

import torch

from svd_vllm.core import artifact
from svd_vllm.core.artifact import SteeringArtifact

__all__ = ["random_vector", "random_vector_bytes"]


def random_vector(
    name: str = "v",
    *,
    vocab: int = 16,
    seed: int = 0,
    mu: float = -1.0,
    alpha: float = 0.1,
    spread: float = 1.0,
    **meta: Any,
) -> SteeringArtifact:
    """A valid artifact whose shift is ``spread * N(0, 1)`` from ``seed`` (``meta`` overrides
    or adds metadata fields)."""
    g = torch.Generator().manual_seed(seed)
    fields: dict[str, Any] = {
        "name": name,
        "base_model": "b",
        "adapter": "a",
        "tokenizer_fingerprint": "t",
        "mu_bar": mu,
        "alpha": alpha,
    }
    fields.update(meta)
    return SteeringArtifact.create(torch.randn(vocab, generator=g) * spread, **fields)


def random_vector_bytes(name: str = "v", **kwargs: Any) -> bytes:
    """``random_vector``'s file content (for uploads)."""
    return artifact.to_bytes(random_vector(name, **kwargs))
