"""The engine tests' runner: on ``make test-mrv2`` it is vLLM's V2 model runner (MRV2, what GPU
users run), with the steering done by the Triton kernel under Triton's interpreter. This file
checks that the lane really runs what it says, so a silent fallback to the V1 runner or to the
torch kernel fails here instead of passing the lane's other tests on the wrong path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.vllm_server import run_offline_llm

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(os.environ.get("SVD_TEST_MRV2") != "1", reason="the MRV2 lane only"),
]


def test_the_lane_runs_mrv2_with_the_interpreted_triton_kernel(
    serving_assets: dict, tmp_path: Path
) -> None:
    a = serving_assets
    spec = {
        "model": str(a["base"]),
        "loras": {k: str(v) for k, v in a["loras"].items()},
        "max_tokens": 4,
        "modes": ["batch"],
        "requests": [{"prompt": "the color of sky is", "lora": "lora1", "extra_args": {"svd": 1}}],
    }
    log, out = run_offline_llm(spec, tmp_path, a["registry"].root)
    assert out is not None, log[-5000:]
    assert "Using V2 Model Runner" in log, log[-5000:]
    assert "steering processor active (v2 runner, triton (interpreted) kernel" in log, log[-5000:]
    print("MRV2 lane: vLLM's V2 model runner, the Triton steering kernel (interpreted)")
