"""The sidecar with FastAPI's TestClient: every endpoint, every rejection, the front's translation."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file
from svd_sidecar import SidecarSettings, create_app

from tests.support.sidecar_app import AUTH, KEY, VOCAB, sidecar_env, upload, vec_bytes


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict]:
    with sidecar_env(tmp_path) as e:
        yield e


def manifest_bytes(env: dict) -> bytes | None:
    p = env["settings"].registry / "manifest.json"
    return p.read_bytes() if p.exists() else None


def test_settings_refuse_keyless_start_unless_dev(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="refusing to start"):
        SidecarSettings(registry=tmp_path)
    with pytest.raises(ValueError, match="at least 16"):
        SidecarSettings(api_key="short", registry=tmp_path)
    assert SidecarSettings(dev=True, registry=tmp_path).api_key is None


def test_management_api_registers_lists_patches_and_deletes(env: dict) -> None:
    c = env["client"]
    assert c.get("/v1/steering/vectors").json() == []
    r = upload(c, vec_bytes("v1"))
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1 and r.json()["effective_mu"] == pytest.approx(-2.0)
    assert upload(c, vec_bytes("v1", seed=1)).status_code == 409
    r = upload(c, vec_bytes("v1", seed=1), replace=True)
    assert r.status_code == 201 and r.json()["version"] == 2
    r = upload(c, vec_bytes("v1"), name="renamed")
    assert r.status_code == 201 and r.json()["name"] == "renamed"
    assert [v["name"] for v in c.get("/v1/steering/vectors").json()] == ["renamed", "v1"]
    d = c.get("/v1/steering/vectors/v1").json()
    assert (
        d["version"] == 2 and d["calibration"]["items"] == 0 and d["tokenizer_fingerprint"] == "t"
    )
    r = c.patch(
        "/v1/steering/vectors/v1",
        json={"default_scale": 0.5, "mu_bar": -4.0, "alpha": 0.3},
        headers=AUTH,
    )
    assert r.status_code == 200 and r.json()["version"] == 3
    assert r.json()["effective_mu"] == pytest.approx(-2.0) and r.json()["effective_alpha"] == 0.3
    r = c.patch("/v1/steering/vectors/v1", json={"mu_bar": None, "enabled": False}, headers=AUTH)
    assert (
        r.json()["mu_bar_override"] is None
        and r.json()["enabled"] is False
        and r.json()["version"] == 4
    )
    assert c.delete("/v1/steering/vectors/v1", headers=AUTH).status_code == 204
    assert c.get("/v1/steering/vectors/v1").status_code == 404
    # Versions keep growing after delete + re-register.
    assert upload(c, vec_bytes("v1")).json()["version"] == 5


def test_register_by_path_inside_allowed_roots_only(env: dict) -> None:
    c = env["client"]
    good = env["allowed"] / "a.safetensors"
    good.write_bytes(vec_bytes("pathvec"))
    r = c.post("/v1/steering/vectors", json={"path": str(good), "default_scale": 2}, headers=AUTH)
    assert r.status_code == 201 and r.json()["default_scale"] == 2
    outside = env["tmp"] / "outside.safetensors"
    outside.write_bytes(vec_bytes("x"))
    before = manifest_bytes(env)
    r = c.post("/v1/steering/vectors", json={"path": str(outside)}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "path_not_allowed"
    link = env["allowed"] / "link.safetensors"
    link.symlink_to(outside)
    r = c.post("/v1/steering/vectors", json={"path": str(link)}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "path_not_allowed"
    r = c.post("/v1/steering/vectors", json={"path": str(env["allowed"] / "missing")}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "path"
    assert manifest_bytes(env) == before


def _bad_artifacts(tmp: Path) -> dict[str, bytes]:
    out = {}
    good = vec_bytes("bad")
    out["parse"] = b"this is not safetensors"
    out["vocab"] = vec_bytes("bad", vocab=VOCAB * 2)
    meta = json.loads(
        json.loads(good[8 : 8 + int.from_bytes(good[:8], "little")])["__metadata__"]["svd_vllm"]
    )
    header = {"format": "svd-vllm-steering", "format_version": "1"}

    def file(shift: torch.Tensor, metadata: dict[str, str]) -> bytes:
        p = tmp / "x.safetensors"
        save_file({"shift": shift}, str(p), metadata=metadata)
        return p.read_bytes()

    full = {**header, "svd_vllm": json.dumps(meta)}
    out["dtype"] = file(torch.zeros(VOCAB, dtype=torch.float64), full)
    nan = torch.zeros(VOCAB)
    nan[3] = float("nan")
    out["non_finite"] = file(nan, full)
    out["metadata"] = file(torch.zeros(VOCAB), header)
    # valid structure, content does not match its hash
    out["hash"] = file(torch.zeros(VOCAB), full)
    return out


def test_every_rejection_reason_writes_nothing(env: dict) -> None:
    c = env["client"]
    assert upload(c, vec_bytes("keep")).status_code == 201
    before = manifest_bytes(env)
    files_before = sorted(p.name for p in (env["settings"].registry / "vectors").rglob("*"))
    for reason, data in _bad_artifacts(env["tmp"]).items():
        r = upload(c, data)
        assert r.status_code == 400, (reason, r.text)
        assert r.json()["error"]["code"] == reason, (reason, r.json())
    r = upload(c, b"x" * (70 * 1024))
    assert r.status_code == 413 and r.json()["error"]["code"] == "size"
    r = upload(c, vec_bytes("ok"), name="../etc")
    assert r.status_code == 400 and r.json()["error"]["code"] == "name"
    r = c.post(
        "/v1/steering/vectors", content=b"hello", headers={**AUTH, "content-type": "text/plain"}
    )
    assert r.status_code == 415
    r = c.post("/v1/steering/vectors", files={"other": ("a", b"b")}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_file"
    r = c.post("/v1/steering/vectors", json={"path": "/x", "bogus": 1}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "validation"
    assert manifest_bytes(env) == before
    assert sorted(p.name for p in (env["settings"].registry / "vectors").rglob("*")) == files_before
    assert not list((env["settings"].registry / ".uploads").glob("*"))
    # PATCH / DELETE rejections.
    assert c.patch("/v1/steering/vectors/keep", json={}, headers=AUTH).status_code == 400
    assert c.patch("/v1/steering/vectors/keep", json={"alpha": 0}, headers=AUTH).status_code == 422
    assert (
        c.patch("/v1/steering/vectors/keep", json={"default_scale": 1e9}, headers=AUTH).status_code
        == 422
    )
    assert (
        c.patch("/v1/steering/vectors/keep", json={"colour": "red"}, headers=AUTH).status_code
        == 422
    )
    assert (
        c.patch("/v1/steering/vectors/keep", json={"enabled": None}, headers=AUTH).status_code
        == 400
    )
    assert (
        c.patch("/v1/steering/vectors/nope", json={"enabled": True}, headers=AUTH).status_code
        == 404
    )
    assert c.delete("/v1/steering/vectors/nope", headers=AUTH).status_code == 404
    assert c.get("/v1/steering/vectors/bad%2Fname").status_code == 404  # no such route
    assert c.get("/v1/steering/vectors/-bad").status_code == 400  # not a vector name
    assert manifest_bytes(env) == before
    text = c.get("/metrics").text
    for reason in ("parse", "vocab", "dtype", "non_finite", "metadata", "hash", "size", "name"):
        assert f'svd_sidecar_rejections_total{{reason="{reason}"}}' in text


def test_writes_need_the_key_and_reads_are_open_unless_configured(
    env: dict, tmp_path: Path
) -> None:
    c = env["client"]
    assert upload(c, vec_bytes(), headers={}).status_code == 401
    assert (
        upload(c, vec_bytes(), headers={"Authorization": "Bearer wrong-key-wrong-key"}).status_code
        == 401
    )
    assert upload(c, vec_bytes(), headers={"Authorization": KEY}).status_code == 401
    assert c.delete("/v1/steering/vectors/x").status_code == 401
    assert c.patch("/v1/steering/vectors/x", json={"enabled": True}).status_code == 401
    assert c.get("/v1/steering/vectors").status_code == 200  # reads open by default
    closed = create_app(
        SidecarSettings(
            api_key=KEY, registry=tmp_path / "r2", vocab_size=VOCAB, reads_require_key=True
        )
    )
    with TestClient(closed) as c2:
        assert c2.get("/v1/steering/vectors").status_code == 401
        assert c2.get("/v1/steering/vectors", headers=AUTH).status_code == 200


def test_health_and_readiness_report_each_dependency(env: dict, tmp_path: Path) -> None:
    c = env["client"]
    assert c.get("/healthz").json() == {"status": "ok"}
    r = c.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {
        "registry": "writable",
        "manifest": "readable",
        "vllm": "reachable",
    }
    down = create_app(
        SidecarSettings(
            dev=True, registry=tmp_path / "r3", vocab_size=VOCAB, vllm_url="http://127.0.0.1:9"
        )
    )
    with TestClient(down) as c3:
        r = c3.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["vllm"].startswith("unreachable")
        assert c3.post("/v1/completions", json={"model": "m", "prompt": "x"}).status_code == 502
    upload(c, vec_bytes("m1"))
    assert 'svd_sidecar_registrations_total{op="add"} 1.0' in c.get("/metrics").text


def test_front_translates_steering_and_validates(env: dict) -> None:
    c, up = env["client"], env["upstream"]
    upload(c, vec_bytes("lora-a"))
    r = c.post(
        "/v1/completions",
        json={
            "model": "lora-a",
            "prompt": "hi",
            "vllm_xargs": {"other": 3},
            "steering": {"enabled": True, "scale": 0.5, "alpha": 0.2},
        },
    )
    assert r.status_code == 200, r.text
    sent = up.seen[-1]
    assert "steering" not in sent
    assert sent["vllm_xargs"] == {"other": 3, "svd": 1, "svd_scale": 0.5, "svd_alpha": 0.2}
    c.post(
        "/v1/chat/completions",
        json={"model": "base", "messages": [], "steering": {"enabled": True, "vector": "lora-a"}},
    )
    assert up.seen[-1]["vllm_xargs"] == {"svd": 1, "svd_vector": "lora-a"}
    c.post(
        "/v1/completions", json={"model": "lora-a", "prompt": "x", "steering": {"enabled": False}}
    )
    assert up.seen[-1]["vllm_xargs"] == {"svd": 0}
    c.post("/v1/completions", json={"model": "lora-a", "prompt": "x"})
    assert "vllm_xargs" not in up.seen[-1]  # the server default applies
    n = len(up.seen)
    r = c.post(
        "/v1/completions", json={"model": "lora-b", "prompt": "x", "steering": {"enabled": True}}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_vector"
    c.patch("/v1/steering/vectors/lora-a", json={"enabled": False}, headers=AUTH)
    r = c.post(
        "/v1/completions", json={"model": "lora-a", "prompt": "x", "steering": {"enabled": True}}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "disabled_vector"
    for bad in (
        {"enabled": "maybe"},
        {"scale": 1e9},
        {"alpha": 0},
        {"vector": "../x"},
        {"colour": 1},
    ):
        r = c.post("/v1/completions", json={"model": "lora-a", "prompt": "x", "steering": bad})
        assert r.status_code == 400 and r.json()["error"]["code"] == "steering", bad
    assert (
        c.post(
            "/v1/completions", content=b"{nope", headers={"content-type": "application/json"}
        ).status_code
        == 400
    )
    assert len(up.seen) == n  # nothing invalid reached vLLM
    # Upstream errors pass through with their status; streams pass through unchanged.
    r = c.post("/v1/completions", json={"model": "explode", "prompt": "x"})
    assert r.status_code == 404 and "does not exist" in r.text
    with c.stream(
        "POST", "/v1/completions", json={"model": "m", "prompt": "x", "stream": True}
    ) as s:
        body = b"".join(s.iter_raw())
        assert s.headers["content-type"].startswith("text/event-stream")
    assert body.count(b"data:") == 4 and body.endswith(b"data: [DONE]\n\n")
    assert c.get("/v1/models").json()["data"][0]["id"] == "m"
    text = c.get("/metrics").text
    assert 'svd_sidecar_proxied_requests_total{endpoint="completions",steering="on"}' in text


def test_openapi_schema_is_published(env: dict) -> None:
    schema = env["client"].get("/openapi.json").json()
    post = schema["paths"]["/v1/steering/vectors"]["post"]
    assert set(post["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert {"/v1/steering/vectors/{name}", "/healthz", "/readyz", "/v1/completions"} <= set(
        schema["paths"]
    )


# -- composition and every generation endpoint -------------------------------------------
@pytest.mark.parametrize(
    "path", ["/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages"]
)
def test_every_generation_endpoint_folds_in_steering(env: dict, path: str) -> None:
    c, up = env["client"], env["upstream"]
    upload(c, vec_bytes("tone", seed=1))
    upload(c, vec_bytes("task", seed=2))
    body = {
        "model": "base",
        "steering": {
            "enabled": True,
            "vectors": [{"name": "tone", "scale": 0.5}, {"name": "task"}],
        },
        "vllm_xargs": {"keep": 1},
    }
    r = c.post(path, json=body)
    assert r.status_code == 200, r.text
    sent = up.seen[-1]
    assert "steering" not in sent
    # A missing scale is the vector's default scale (1.0 here), so the lists stay aligned.
    assert sent["vllm_xargs"] == {
        "keep": 1,
        "svd": 1,
        "svd_vector": ["tone", "task"],
        "svd_scale": [0.5, 1.0],
    }
    r = c.post(path, json={"model": "base", "steering": {"vectors": [{"name": "tone"}]}})
    assert r.status_code == 200 and up.seen[-1]["vllm_xargs"] == {"svd_vector": ["tone"]}
    with c.stream("POST", path, json={**body, "stream": True}) as s:
        raw = b"".join(s.iter_raw())
        assert s.headers["content-type"].startswith("text/event-stream")
    assert raw.endswith(b"data: [DONE]\n\n") and up.seen[-1]["stream"] is True
    from svd_sidecar.routers.openai import GENERATION_ENDPOINTS

    metric = f'endpoint="{GENERATION_ENDPOINTS[path]}",steering="composed"'
    assert "svd_sidecar_proxied_requests_total{" + metric + "} 2.0" in c.get("/metrics").text


@pytest.mark.parametrize(
    ("steering", "code", "message"),
    [
        ({"enabled": True, "vectors": []}, "steering", "at least 1"),
        (
            {"enabled": True, "vectors": [{"name": f"v{i}"} for i in range(9)]},
            "steering",
            "at most 8",
        ),
        (
            {"enabled": True, "vectors": [{"name": "tone"}, {"name": "tone"}]},
            "steering",
            r"vectors\[1\]: 'tone' is listed twice",
        ),
        (
            {"enabled": True, "vector": "tone", "vectors": [{"name": "tone"}]},
            "steering",
            "not both",
        ),
        (
            {"enabled": True, "vectors": [{"name": "tone", "scale": float("inf")}]},
            "json",
            r"steering.vectors\[0\].scale: Infinity is not a JSON number",
        ),
        (
            {"enabled": True, "vectors": [{"name": "tone"}, {"name": "nope"}]},
            "unknown_vector",
            r"steering.vectors\[1\]: no steering vector named 'nope'",
        ),
    ],
)
def test_composition_errors_are_400s_naming_the_field(
    env: dict, steering: dict, code: str, message: str
) -> None:
    c, up = env["client"], env["upstream"]
    upload(c, vec_bytes("tone", seed=1))
    n = len(up.seen)
    r = c.post(
        "/v1/responses",
        content=json.dumps({"model": "base", "input": "hi", "steering": steering}, allow_nan=True),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
    assert re.search(message, r.json()["error"]["message"])
    assert len(up.seen) == n


def test_other_vllm_paths_are_not_proxied(env: dict) -> None:
    c, up = env["client"], env["upstream"]
    for method, path in (
        ("POST", "/v1/load_lora_adapter"),
        ("GET", "/v1/nothing"),
        ("POST", "/reset_prefix_cache"),
        ("DELETE", "/v1/models"),
    ):
        r = c.request(method, path, json={})
        assert r.status_code in (404, 405), (method, path)
        if r.status_code == 404:
            assert r.json()["error"]["code"] == "not_proxied" and "call vLLM directly" in r.text
    assert up.seen == []
    assert c.post("/tokenize", json={"model": "m", "prompt": "hi"}).status_code == 200
    assert c.get("/v1/steering/vectors/none").status_code == 404  # the API's own 404 still


def test_models_say_which_vector_each_model_steers_with(env: dict) -> None:
    c = env["client"]
    listing = c.get("/v1/models").json()
    assert listing["data"][0]["id"] == "m" and listing["data"][0]["svd_steering"] is None
    upload(c, vec_bytes("m", seed=3))
    info = c.get("/v1/models").json()["data"][0]["svd_steering"]
    assert info["vector"] == "m" and info["status"] == "ready" and info["version"] == 1


def test_compositions_are_managed_and_steer_their_adapter(env: dict) -> None:
    c, up = env["client"], env["upstream"]
    upload(c, vec_bytes("tone", seed=1))
    upload(c, vec_bytes("task", seed=2))
    body = {"members": [{"vector": "tone", "scale": 0.5}, {"vector": "task"}], "alpha": 0.3}
    assert c.put("/v1/steering/compositions/m", json=body).status_code == 401  # needs the key
    r = c.put("/v1/steering/compositions/m", json=body, headers=AUTH)
    assert r.status_code == 200 and r.json()["version"] == 1 and r.json()["alpha"] == 0.3
    assert [x["name"] for x in c.get("/v1/steering/compositions").json()] == ["m"]
    # The adapter "m" steers with it: the front checks the members, vLLM expands it.
    r = c.post("/v1/completions", json={"model": "m", "prompt": "x", "steering": {"enabled": True}})
    assert r.status_code == 200 and up.seen[-1]["vllm_xargs"] == {"svd": 1}
    info = c.get("/v1/models").json()["data"][0]["svd_steering"]
    assert info["composition"] == "m" and [v["vector"] for v in info["vectors"]] == ["tone", "task"]
    for bad, code, status in (
        ({"members": [{"vector": "nope"}]}, "unknown_vector", 400),
        ({"members": [{"vector": "tone"}, {"vector": "tone"}]}, "validation", 400),
        ({"members": []}, "validation", 422),
        ({"members": [{"vector": "tone", "scale": 1e9}]}, "validation", 422),
    ):
        r = c.put("/v1/steering/compositions/x", json=bad, headers=AUTH)
        assert r.status_code == status and r.json()["error"]["code"] == code, (bad, r.text)
    r = c.put("/v1/steering/compositions/tone", json=body, headers=AUTH)
    assert r.status_code == 409  # a vector's name
    r = c.delete("/v1/steering/vectors/task", headers=AUTH)
    assert r.status_code == 409 and "member of composition" in r.text
    r = c.put("/v1/steering/compositions/m", json={**body, "enabled": False}, headers=AUTH)
    assert r.json()["version"] == 2
    r = c.post("/v1/completions", json={"model": "m", "prompt": "x", "steering": {"enabled": True}})
    assert r.status_code == 400 and "composition 'm' is disabled" in r.text
    assert c.delete("/v1/steering/compositions/m", headers=AUTH).status_code == 204
    assert c.get("/v1/steering/compositions/m").status_code == 404
    assert c.delete("/v1/steering/vectors/task", headers=AUTH).status_code == 204


_WITHOUT_TORCH = r"""
import sys
sys.modules["torch"] = None  # `import torch` now raises ImportError, as in the sidecar image
import httpx, numpy as np
from fastapi.testclient import TestClient
from safetensors.numpy import save
from svd_sidecar import SidecarSettings, create_app
from svd_vllm.core import artifact

def upload(c, data, name):
    files = {"file": ("v.safetensors", data, "application/octet-stream")}
    return c.post("/v1/steering/vectors", files=files, data={"name": name},
                  headers={"Authorization": "Bearer " + "k" * 24})

meta = dict(base_model="b", adapter="a", tokenizer_fingerprint="t", mu_bar=-2.0, alpha=0.1)
good = artifact.to_bytes(artifact.SteeringArtifact.create(
    np.linspace(-1, 1, 32, dtype=np.float32), name="v1", **meta))
wrong_vocab = artifact.to_bytes(artifact.SteeringArtifact.create(
    np.zeros(16, dtype=np.float32), name="v2", **meta))
nan = np.zeros(32, np.float32); nan[7] = np.nan
meta_json = artifact.ArtifactMeta(name="v3", vocab_size=32, **meta).model_dump_json()
bad = save({"shift": nan}, metadata={"format": "svd-vllm-steering", "format_version": "1",
                                     "svd_vllm": meta_json})
settings = SidecarSettings(api_key="k" * 24, registry=sys.argv[1], vocab_size=32)
upstream = httpx.MockTransport(lambda r: httpx.Response(200, json={"object": "list", "data": []}))
with TestClient(create_app(settings, transport=upstream)) as c:
    r = upload(c, good, "v1")
    assert r.status_code == 201, r.text
    r = upload(c, wrong_vocab, "v2")
    assert r.status_code == 400 and r.json()["error"]["code"] == "vocab", r.text
    r = upload(c, bad, "v3")
    assert r.status_code == 400 and r.json()["error"]["code"] == "non_finite", r.text
    assert [v["name"] for v in c.get("/v1/steering/vectors").json()] == ["v1"]
    assert c.get("/readyz").status_code in (200, 503)
assert sys.modules["torch"] is None
print("ok")
"""


def test_the_management_api_runs_without_torch(tmp_path: Path) -> None:
    """The sidecar image carries no torch: registering a vector, and each check that refuses one
    (vocab, finiteness), must work with torch unimportable."""
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, str(tmp_path / "reg")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr


def test_the_sidecar_imports_nothing_of_the_engine_package() -> None:
    """The sidecar applies the request contract of the registry layer, never the plugin's code:
    the whole app imports without ``svd_vllm.vllm``."""
    import subprocess
    import sys

    probe = (
        "import sys, svd_sidecar.app\n"
        "print(sorted(m for m in sys.modules if m.startswith('svd_vllm.vllm')))\n"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
