"""Fuzz the sidecar's management API from its own OpenAPI schema (bounded): never a 5xx."""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from svd_sidecar import SidecarSettings, create_app

from svd_vllm.core import artifact
from svd_vllm.core.artifact import SteeringArtifact

KEY = "f" * 32
_root = Path(tempfile.mkdtemp(prefix="svd-fuzz-"))
_allowed = _root / "allowed"
_allowed.mkdir()


def _seed() -> None:
    import torch

    art = SteeringArtifact.create(
        torch.linspace(-1, 1, 16),
        name="seed",
        base_model="b",
        adapter="a",
        tokenizer_fingerprint="t",
        mu_bar=-1.0,
    )
    artifact.save(art, _allowed / "seed.safetensors")


_seed()
app = create_app(
    SidecarSettings(
        api_key=KEY,
        registry=_root / "reg",
        vocab_size=16,
        allowed_roots=[_allowed],
        max_upload_bytes=1 << 20,
        vllm_url="http://127.0.0.1:9",
    )
)
schema = schemathesis.openapi.from_asgi("/openapi.json", app).include(path_regex="^/v1/steering")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_management_api_never_errors(case) -> None:  # type: ignore[no-untyped-def]
    response = case.call(headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
