"""Steered models by name (``ADAPTER:svd``, ``ADAPTER:svd-PRESET``) and steering presets, at the
sidecar's front, against a fake vLLM that answers with the model it was asked for."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from svd_sidecar import SidecarSettings, create_app

from svd_vllm.registry import Registry, RegistryError
from tests.support.sidecar_app import AUTH, KEY, VOCAB, upload, vec_bytes

GENERATION = ["/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages"]


class ModelEcho:
    """A fake vLLM serving ``base`` and the LoRA adapters ``lora-a``, ``lora-b``, ``lora-c``;
    every answer (and every stream event) names the model it was asked for."""

    def __init__(self, with_plugin_variants: bool = False) -> None:
        self.seen: list[dict[str, Any]] = []
        self.with_plugin_variants = with_plugin_variants

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            data = [{"id": "base", "object": "model", "root": "/m", "parent": None}] + [
                {"id": n, "object": "model", "root": f"/l/{n}", "parent": "base"}
                for n in ("lora-a", "lora-b", "lora-c")
            ]
            if self.with_plugin_variants:  # what vLLM's plugin adds (stale on purpose)
                info = {"variant_of": "lora-c", "preset": None, "vllm_xargs": {"svd": 1}}
                data.append({"id": "lora-c:svd", "parent": "lora-c", "svd_steering": info})
            return httpx.Response(200, json={"object": "list", "data": data})
        body = json.loads(request.content)
        self.seen.append(body)
        model = body["model"]
        if body.get("stream"):
            events = [
                {"model": model, "i": 0},
                {"type": "message_start", "message": {"model": model}},
                {"type": "response.created", "response": {"model": model}},
            ]
            raw = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
            return httpx.Response(
                200,
                stream=httpx.ByteStream(raw + b"data: [DONE]\n\n"),
                headers={"content-type": "text/event-stream"},
            )
        return httpx.Response(200, json={"model": model, "choices": [{"text": "ok"}]})


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, Any]]:
    upstream = ModelEcho()
    settings = SidecarSettings(api_key=KEY, registry=tmp_path / "reg", vocab_size=VOCAB)
    app = create_app(settings, transport=httpx.MockTransport(upstream))
    with TestClient(app) as client:
        assert upload(client, vec_bytes("lora-a", seed=1)).status_code == 201
        assert upload(client, vec_bytes("tone", seed=2)).status_code == 201
        yield {"client": client, "upstream": upstream, "root": tmp_path / "reg"}


def ids(client: TestClient) -> list[str]:
    return [m["id"] for m in client.get("/v1/models").json()["data"]]


def test_variants_vllm_lists_itself_are_listed_once_by_the_sidecars_rule(tmp_path: Path) -> None:
    settings = SidecarSettings(api_key=KEY, registry=tmp_path / "reg", vocab_size=VOCAB)
    app = create_app(settings, transport=httpx.MockTransport(ModelEcho(with_plugin_variants=True)))
    with TestClient(app) as c:
        assert upload(c, vec_bytes("lora-a", seed=1)).status_code == 201
        assert ids(c) == ["base", "lora-a", "lora-a:svd", "lora-b", "lora-c"]


def test_models_list_a_variant_per_adapter_that_can_steer_and_per_preset(env: dict) -> None:
    c = env["client"]
    assert ids(c) == ["base", "lora-a", "lora-a:svd", "lora-b", "lora-c"]
    # A composition named like an adapter is its default steering: it gets variants too.
    r = c.put(
        "/v1/steering/compositions/lora-b", json={"members": [{"vector": "tone"}]}, headers=AUTH
    )
    assert r.status_code == 200
    assert c.put("/v1/steering/presets/strong", json={"scale": 2}, headers=AUTH).status_code == 200
    assert (
        c.put(
            "/v1/steering/presets/back", json={"scale": -0.5, "alpha": 0.3}, headers=AUTH
        ).status_code
        == 200
    )
    assert ids(c) == [
        "base",
        "lora-a",
        "lora-a:svd",
        "lora-a:svd-back",
        "lora-a:svd-strong",
        "lora-b",
        "lora-b:svd",
        "lora-b:svd-back",
        "lora-b:svd-strong",
        "lora-c",
    ]
    listed = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    back = listed["lora-a:svd-back"]
    assert back["parent"] == "lora-a" and back["root"] == "/l/lora-a"
    assert back["svd_steering"] == {
        "variant_of": "lora-a",
        "preset": "back",
        "vllm_xargs": {"svd": 1, "svd_scale": -0.5, "svd_alpha": 0.3},
    }
    # A base model never gets variants (the engine steers LoRA requests), even with a vector.
    assert upload(c, vec_bytes("base", seed=3)).status_code == 201
    assert "base:svd" not in ids(c)
    # An adapter that can no longer steer loses its variants.
    c.patch("/v1/steering/vectors/lora-a", json={"enabled": False}, headers=AUTH)
    assert "lora-a:svd" not in ids(c) and "lora-b:svd" in ids(c)


@pytest.mark.parametrize("path", GENERATION)
@pytest.mark.parametrize("stream", [False, True])
def test_a_variant_is_the_adapter_with_steering_on(env: dict, path: str, stream: bool) -> None:
    c, up = env["client"], env["upstream"]
    c.put("/v1/steering/presets/strong", json={"scale": 2}, headers=AUTH)
    for requested, xargs in (
        ("lora-a:svd", {"svd": 1}),
        ("lora-a:svd-strong", {"svd": 1, "svd_scale": 2.0}),
    ):
        body = {"model": requested, "prompt": "x", "vllm_xargs": {"other": 1}, "stream": stream}
        if stream:
            with c.stream("POST", path, json=body) as s:
                raw = b"".join(s.iter_raw())
            events = [json.loads(b[6:]) for b in raw.split(b"\n\n") if b.startswith(b"data: {")]
            assert events[0]["model"] == requested
            assert events[1]["message"]["model"] == requested
            assert events[2]["response"]["model"] == requested
            assert raw.endswith(b"data: [DONE]\n\n")
        else:
            r = c.post(path, json=body)
            assert r.status_code == 200 and r.json()["model"] == requested, r.text
        sent = up.seen[-1]
        assert sent["model"] == "lora-a" and sent["vllm_xargs"] == {"other": 1, **xargs}
    assert 'steering="variant"' in c.get("/metrics").text


@pytest.mark.parametrize(
    ("model", "why"),
    [
        ("lora-c:svd", "no steering vector named 'lora-c'"),
        ("lora-a:svd-nope", "no steering preset named 'nope'"),
        ("tone:svd-", None),  # not a variant name: vLLM's own answer
    ],
)
def test_unknown_or_unservable_variants_are_404s_in_openai_shape(
    env: dict, model: str, why: str | None
) -> None:
    c, up = env["client"], env["upstream"]
    r = c.post("/v1/chat/completions", json={"model": model, "messages": []})
    if why is None:
        assert r.status_code == 200 and up.seen[-1]["model"] == model
        return
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and f"`{model}`" in error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == "model"  # OpenAI's shape
    assert why in error["message"] and up.seen == []


@pytest.mark.parametrize(
    "extra",
    [
        {"steering": {"enabled": False}},
        {"steering": {"scale": 3.0}},
        {"vllm_xargs": {"svd_scale": 3.0}},
        {"vllm_xargs": {"svd": 0}},
    ],
)
def test_a_variant_with_its_own_steering_is_a_400(env: dict, extra: dict) -> None:
    r = env["client"].post("/v1/completions", json={"model": "lora-a:svd", "prompt": "x", **extra})
    assert r.status_code == 400 and r.json()["error"]["code"] == "steering_conflict", r.text
    assert env["upstream"].seen == []


def test_presets_are_managed_and_validated_like_compositions(env: dict) -> None:
    c = env["client"]
    assert c.put("/v1/steering/presets/strong", json={"scale": 2}).status_code == 401
    r = c.put("/v1/steering/presets/strong", json={"scale": 2}, headers=AUTH)
    assert r.status_code == 200 and r.json()["version"] == 1 and r.json()["scale"] == 2.0
    r = c.put("/v1/steering/presets/strong", json={"scale": 3}, headers=AUTH)
    assert r.json()["version"] == 2
    for name, body, status in (
        ("Bad", {"scale": 1}, 400),
        ("a:b", {"scale": 1}, 400),
        ("ok", {"scale": 1e9}, 422),
        ("ok", {"scale": True}, 422),
        ("ok", {"scale": "2"}, 422),
        ("ok", {"scale": 1, "alpha": 0}, 422),
        ("ok", {}, 422),
        ("ok", {"scale": 1, "colour": 2}, 422),
    ):
        r = c.put(f"/v1/steering/presets/{name}", json=body, headers=AUTH)
        assert r.status_code == status, (name, body, r.text)
    assert [p["name"] for p in c.get("/v1/steering/presets").json()] == ["strong"]
    assert c.delete("/v1/steering/presets/strong", headers=AUTH).status_code == 204
    assert c.get("/v1/steering/presets/strong").status_code == 404
    assert c.delete("/v1/steering/presets/strong", headers=AUTH).status_code == 404
    r = c.put("/v1/steering/presets/strong", json={"scale": 1}, headers=AUTH)
    assert r.json()["version"] == 3  # versions only grow


def test_registry_presets_and_older_readers(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    with pytest.raises(RegistryError, match="invalid preset name"):
        reg.set_preset("UPPER", 1.0)
    with pytest.raises(RegistryError, match=r"invalid preset .x.: scale: .*finite number"):
        reg.set_preset("x", float("nan"))
    reg.set_preset("x", 1.5)
    assert [p.name for p in reg.presets()] == ["x"]
    reg.remove_preset("x")
    # With no presets the manifest has no "presets" key: engines of earlier releases, whose
    # manifest model forbids unknown keys, still read it.
    assert "presets" not in json.loads((tmp_path / "manifest.json").read_text())
