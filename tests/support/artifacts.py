"""The steering-artifact factories the tests share: a given shift, or a seeded random one,
with valid metadata."""

from __future__ import annotations

from typing import Any

import torch

from svd_vllm.core import artifact
from svd_vllm.core.artifact import SteeringArtifact

__all__ = ["random_vector", "random_vector_bytes", "vector_from_shift"]


def vector_from_shift(
    shift: torch.Tensor, name: str = "v", *, mu: float = -1.0, alpha: float = 0.1, **meta: Any
) -> SteeringArtifact:
    """A valid artifact around ``shift`` (``meta`` overrides or adds metadata fields)."""
    fields: dict[str, Any] = {
        "name": name,
        "base_model": "b",
        "adapter": "a",
        "tokenizer_fingerprint": "t",
        "mu_bar": mu,
        "alpha": alpha,
    }
    fields.update(meta)
    return SteeringArtifact.create(shift, **fields)


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
    shift = torch.randn(vocab, generator=g) * spread
    return vector_from_shift(shift, name, mu=mu, alpha=alpha, **meta)


def random_vector_bytes(name: str = "v", **kwargs: Any) -> bytes:
    """``random_vector``'s file content (for uploads)."""
    return artifact.to_bytes(random_vector(name, **kwargs))
