"""Shared fixtures: the tiny model and LoRA the tests build themselves (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """No test reads a user's registry, and none leaves admission state behind."""
    from svd_vllm.vllm import admission

    monkeypatch.setenv("SVD_VLLM_REGISTRY", str(tmp_path_factory.mktemp("registry")))
    yield
    admission.reset_state()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base model dir, non-zero LoRA dir) for the tiny Llama."""
    from svd_vllm.tools.tiny import build_tiny_lora, build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    base = build_tiny_model(root / "base", seed=0)
    lora = build_tiny_lora(base, root / "lora", seed=1)
    return base, lora


@pytest.fixture(scope="session")
def serving_assets(tmp_path_factory: pytest.TempPathFactory, tiny_dirs: tuple[Path, Path]) -> dict:
    """Tiny base, two LoRAs, three steering vectors (lora1, lora2, other) in a fresh registry."""
    from svd_vllm.core import artifact
    from svd_vllm.core.artifact import SteeringArtifact
    from svd_vllm.core.steering import log_ratio
    from svd_vllm.offline.reference import ReferenceDecoder
    from svd_vllm.registry import Registry
    from svd_vllm.tools.tiny import build_tiny_lora
    from tests.support.artifacts import random_vector, vector_from_shift

    root = tmp_path_factory.mktemp("serving")
    base, lora1 = tiny_dirs
    lora2 = build_tiny_lora(base, root / "lora2", seed=2)

    def make(name: str, adapter: Path, prompt: str, mu: float, alpha: float) -> SteeringArtifact:
        dec = ReferenceDecoder(base, adapter)
        za, zb = dec.logits(dec.encode(prompt))
        return vector_from_shift(
            log_ratio(za[-1], zb[-1]),
            name,
            mu=mu,
            alpha=alpha,
            base_model="tiny",
            adapter=adapter.name,
        )

    vectors = {
        "lora1": make("lora1", lora1, "the color of sky is", -20.0, 0.05),
        "lora2": make("lora2", lora2, "one two three", -15.0, 0.1),
        "other": random_vector(
            "other",
            vocab=256,
            seed=5,
            spread=2.0,
            mu=-3.0,
            alpha=0.2,
            base_model="tiny",
            adapter="none",
        ),
    }
    files = {
        k: artifact.save(v, root / "artifacts" / f"{k}.safetensors") for k, v in vectors.items()
    }
    registry = Registry(root / "registry")
    for v in vectors.values():
        registry.add(v)
    return {
        "root": root,
        "base": base,
        "loras": {"lora1": lora1, "lora2": lora2},
        "vectors": vectors,
        "files": files,
        "registry": registry,
    }
