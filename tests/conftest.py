"""Shared fixtures: the tiny model and LoRA the tests build themselves (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base model dir, non-zero LoRA dir) for the tiny Llama."""
    from svd_vllm.tiny import build_tiny_lora, build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    base = build_tiny_model(root / "base", seed=0)
    lora = build_tiny_lora(base, root / "lora", seed=1)
    return base, lora
