"""vLLM features that change how rows reach the processor, on both model runners (``make test``
runs the V1 runner, ``make test-mrv2`` the V2 one): steered greedy output with a feature on must
equal the output of a plain server, and ``n > 1`` must steer every sample.

* speculative decoding (vLLM's ngram method): under MRV2 a request gets one logits row per draft
  token (``expanded_idx_mapping``); the V1 runner refuses custom processors with it.
* async scheduling (``--async-scheduling``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from svd_vllm.registry import Registry
from tests.support.vllm_server import VLLMServer

pytestmark = pytest.mark.vllm
MRV2 = os.environ.get("SVD_TEST_MRV2") == "1"
REPEATS = "one two three one two three one two three one two"
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
        "prompt_lookup_min": 1}  # fmt: skip


def base_requests(base: str) -> list[dict[str, Any]]:
    """Base-model rows: a named vector, a composition, and the same prompts unsteered."""
    named = {"svd": 1, "svd_vector": "other", "svd_scale": 4.0}
    composed = {"svd": 1, "svd_vector": ["other", "lora1"], "svd_scale": [4.0, 1.0]}
    return [
        {"model": base, "prompt": REPEATS, "vllm_xargs": named},
        {"model": base, "prompt": REPEATS, "vllm_xargs": composed},
        {"model": base, "prompt": REPEATS, "vllm_xargs": {"svd": 0}},
        {"model": base, "prompt": "the sun is red the sun is", "vllm_xargs": named},
        {"model": base, "prompt": "the sun is red the sun is", "vllm_xargs": {"svd": 0}},
    ]


LORA_REQUESTS = [
    {"model": "lora1", "prompt": "the color of sky is", "vllm_xargs": {"svd": 1}},
    {"model": "lora1", "prompt": "the color of sky is", "vllm_xargs": {"svd": 0}},
    {"model": "lora2", "prompt": "one two three", "vllm_xargs": {"svd": 1}},
]


def run(srv: VLLMServer, requests: list[dict[str, Any]], **extra: Any) -> list[list[list[int]]]:
    """Every request at once (one batch), greedy; each request's token ids per sample."""

    def one(body: dict[str, Any]) -> list[list[int]]:
        body = {"max_tokens": 12, "temperature": 0, "return_token_ids": True, **body, **extra}
        r = httpx.post(f"{srv.base_url}/v1/completions", json=body, timeout=600)
        assert r.status_code == 200, r.text
        return [list(c["token_ids"]) for c in r.json()["choices"]]

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


@pytest.fixture(scope="module")
def assets(serving_assets: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("features")
    registry = Registry(root / "registry")
    for name in ("lora1", "lora2", "other"):
        registry.add(serving_assets["vectors"][name])
    return {**serving_assets, "root": root, "reg": registry}


def start(assets: dict, name: str, loras: bool, args: list[str]) -> VLLMServer:
    srv = VLLMServer(assets["base"], assets["loras"] if loras else {}, assets["reg"].root,
                     assets["root"] / f"{name}.log", extra_args=args)  # fmt: skip
    try:
        srv.wait_ready()
    except BaseException:
        srv.stop()
        raise
    return srv


@pytest.fixture(scope="module")
def plain(assets: dict) -> Iterator[dict[str, Any]]:
    """The reference outputs: a server with no feature on."""
    srv = start(assets, "plain", True, [])
    try:
        base = str(assets["base"])
        out = {"base": run(srv, base_requests(base)), "lora": run(srv, LORA_REQUESTS)}
        if not MRV2:  # n > 1 needs sampling; top_k 1 keeps it deterministic (the argmax)
            out["n2"] = run(srv, LORA_REQUESTS[:2], n=2, temperature=1.0, top_k=1)
        yield out
    finally:
        srv.stop()


def test_steering_changed_the_reference_outputs(plain: dict) -> None:
    """The comparisons below can fail: steered rows differ from the same prompts unsteered."""
    base = plain["base"]
    assert base[0] != base[2] and base[1] != base[2] and base[3] != base[4]
    assert plain["lora"][0] != plain["lora"][1]


@pytest.mark.skipif(
    MRV2,
    reason="vLLM's top-k Triton kernel fails under Triton's interpreter "
    "(AttributeError: 'int' object has no attribute 'to'); MRV2 n > 1 not tested",
)
def test_n_2_steers_every_sample(plain: dict) -> None:
    """``n = 2`` (parallel sampling: a child request per sample): both samples steered, and
    both unsteered ones not."""
    steered, unsteered = plain["n2"]
    assert steered == [plain["lora"][0][0]] * 2
    assert unsteered == [plain["lora"][1][0]] * 2


def test_async_scheduling_changes_nothing(assets: dict, plain: dict) -> None:
    srv = start(assets, "async", True, ["--async-scheduling"])
    try:
        assert run(srv, base_requests(str(assets["base"]))) == plain["base"]
        assert run(srv, LORA_REQUESTS) == plain["lora"]
    finally:
        srv.stop()


def test_speculative_decoding_steers_on_mrv2_and_is_refused_on_v1(
    assets: dict, plain: dict
) -> None:
    """MRV2: steered greedy output with ngram speculative decoding equals the plain server's.
    V1: vLLM skips installed logits processors with speculative decoding, so a request that asks
    for steering is a 400 that says why (it used to run unsteered, silently); unsteered ones
    are served."""
    srv = start(assets, "spec", False, ["--speculative-config", json.dumps(SPEC)])
    base = str(assets["base"])
    try:
        assert "ngram" in srv.log_tail(1 << 22)
        if MRV2:
            assert run(srv, base_requests(base)) == plain["base"]
            return
        for body in base_requests(base):
            body = {**body, "max_tokens": 12, "temperature": 0, "return_token_ids": True}
            r = httpx.post(f"{srv.base_url}/v1/completions", json=body, timeout=600)
            if body["vllm_xargs"]["svd"] == 0:
                assert r.status_code == 200, r.text
            else:
                assert r.status_code == 400 and "skips logits processors" in r.text, r.text
        unsteered = [b for b in base_requests(base) if b["vllm_xargs"]["svd"] == 0]
        assert run(srv, unsteered) == [plain["base"][2], plain["base"][4]]
    finally:
        srv.stop()
