"""Steered model names (``lora1:svd``) served by vLLM itself, with two API-server processes.

Each request by a variant name must equal the adapter's own request with the variant's
``vllm_xargs``, token for token, streamed or not; the listing and the refusals are the
sidecar's. vLLM runs with ``--api-server-count 2``, so every check that could depend on the
process a request lands on is repeated until both have answered.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from svd_vllm.registry import Registry
from tests.support.vllm_server import VLLMServer

pytestmark = pytest.mark.vllm

PROMPTS = ["the color of sky is", "one two three", "a b c d", "hello world", "red green blue"]
#: Enough requests that both API-server processes answer some (they share one port).
ROUNDS = 8


@pytest.fixture(scope="module")
def server(
    serving_assets: dict, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[VLLMServer, Registry]]:
    root = tmp_path_factory.mktemp("names")
    registry = Registry(root / "registry")
    registry.add(serving_assets["vectors"]["lora1"])
    registry.set_preset("strong", 2.0, alpha=0.2)
    template = root / "chat.jinja"  # the tiny tokenizer has none; chat needs one
    template.write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    srv = VLLMServer(
        serving_assets["base"],
        serving_assets["loras"],
        registry.root,
        root / "vllm.log",
        extra_args=["--api-server-count", "2", "--chat-template", str(template)],
    )
    try:
        srv.wait_ready()
        yield srv, registry
    finally:
        srv.stop()


def _post(srv: VLLMServer, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{srv.base_url}{path}", json=body, timeout=120)


def _completion(srv: VLLMServer, model: str, prompt: str, **more) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    r = _post(srv, "/v1/completions", body | {"return_token_ids": True} | more)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _ids(answer: dict) -> list[int]:
    return list(answer["choices"][0]["token_ids"])


def _listed(srv: VLLMServer) -> dict[str, dict]:
    r = httpx.get(f"{srv.base_url}/v1/models", timeout=30)
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["data"]}


def _every_process_lists(
    srv: VLLMServer, want: set[str], absent: frozenset[str] = frozenset()
) -> None:
    """``ROUNDS`` listings in a row (both processes) show ``want`` and none of ``absent``."""
    deadline, in_a_row = time.monotonic() + 30, 0
    while in_a_row < ROUNDS:
        names = set(_listed(srv))
        in_a_row = in_a_row + 1 if want <= names and not (absent & names) else 0
        assert time.monotonic() < deadline, f"listing {sorted(names)}; want {want}, not {absent}"


def test_the_listing_offers_variants_of_each_adapter_that_can_steer(server) -> None:
    srv, _ = server
    for _ in range(ROUNDS):
        models = _listed(srv)
        assert {"lora1:svd", "lora1:svd-strong"} <= set(models)
        # lora2 has no vector here; the base model is no adapter.
        assert not [m for m in models if m.startswith(("lora2:", "tiny")) and ":svd" in m]
        card = models["lora1:svd-strong"]
        assert card["parent"] == "lora1" and card["root"] == models["lora1"]["root"]
        assert card["svd_steering"]["vllm_xargs"] == {"svd": 1, "svd_scale": 2.0, "svd_alpha": 0.2}


def test_a_variant_equals_its_adapter_with_the_variants_xargs(server) -> None:
    srv, _ = server
    changed = 0
    for prompt in PROMPTS * 2:  # twice: both API-server processes
        got = _completion(srv, "lora1:svd", prompt)
        assert got["model"] == "lora1:svd"
        on = _completion(srv, "lora1", prompt, vllm_xargs={"svd": 1})
        assert _ids(got) == _ids(on), prompt
        strong = _completion(srv, "lora1:svd-strong", prompt)
        by_hand = {"svd": 1, "svd_scale": 2.0, "svd_alpha": 0.2}
        assert _ids(strong) == _ids(_completion(srv, "lora1", prompt, vllm_xargs=by_hand))
        changed += _ids(on) != _ids(_completion(srv, "lora1", prompt, vllm_xargs={"svd": 0}))
    assert changed >= 1, "steering changed no answer: the comparison could not fail"


def test_a_streamed_chat_by_variant_name_equals_the_adapters(server) -> None:
    srv, _ = server
    for prompt in PROMPTS[:3]:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 8}
        body |= {"temperature": 0, "stream": True}
        text, models = "", set()
        with httpx.stream(
            "POST", f"{srv.base_url}/v1/chat/completions", json=body | {"model": "lora1:svd"}
        ) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    models.add(event["model"])
                    text += event["choices"][0]["delta"].get("content") or ""
        on = _post(
            srv,
            "/v1/chat/completions",
            {**body, "stream": False, "model": "lora1", "vllm_xargs": {"svd": 1}},
        )
        assert on.status_code == 200, on.text
        assert models == {"lora1:svd"}
        assert text == on.json()["choices"][0]["message"]["content"], prompt


@pytest.mark.parametrize(
    ("model", "more", "status", "kind", "words"),
    [
        ("lora1:svd-nosuch", {}, 404, "model_not_found", "no steering preset named 'nosuch'"),
        ("lora2:svd", {}, 404, "model_not_found", "'lora2' cannot steer"),
        ("nosuch:svd", {}, 404, "model_not_found", "not a LoRA adapter this server serves"),
        ("lora1:svd", {"vllm_xargs": {"svd": 0}}, 400, "steering_conflict", "vllm_xargs.svd"),
    ],
)
def test_variant_refusals_are_the_sidecars(
    server, model: str, more: dict, status: int, kind: str, words: str
) -> None:
    srv, _ = server
    for _ in range(4):  # both processes
        r = _post(srv, "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2} | more)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["type"] == kind and words in error["message"], error


def test_presets_and_registrations_show_within_the_watchers_second(
    server, serving_assets: dict
) -> None:
    srv, registry = server
    registry.set_preset("gentle", 0.5)
    registry.add(serving_assets["vectors"]["lora2"])
    try:
        _every_process_lists(srv, {"lora1:svd-gentle", "lora2:svd", "lora2:svd-gentle"})
        for _ in range(4):
            got = _completion(srv, "lora2:svd-gentle", PROMPTS[1])
            by_hand = _completion(srv, "lora2", PROMPTS[1], vllm_xargs={"svd": 1, "svd_scale": 0.5})
            assert _ids(got) == _ids(by_hand)
    finally:
        registry.remove_preset("gentle")
        registry.remove("lora2")
    _every_process_lists(srv, {"lora1:svd"}, absent={"lora1:svd-gentle", "lora2:svd"})
