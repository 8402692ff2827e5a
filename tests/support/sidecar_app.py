"""The sidecar in-process for tests: a fresh registry, a fake vLLM, a TestClient; and the
helpers every sidecar test uses (a random vector's bytes, an upload, a registry snapshot)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient
from svd_sidecar import SidecarSettings, create_app

from tests.support.artifacts import random_vector_bytes

__all__ = ["AUTH", "KEY", "VOCAB", "Upstream", "sidecar_env", "snapshot", "upload", "vec_bytes"]

KEY = "k" * 24
AUTH = {"Authorization": f"Bearer {KEY}"}
VOCAB = 32


def vec_bytes(name: str = "v1", vocab: int = VOCAB, seed: int = 0, mu: float = -2.0) -> bytes:
    """An upload for this sidecar's vocab."""
    return random_vector_bytes(name, vocab=vocab, seed=seed, mu=mu)


class Upstream:
    """A fake vLLM: records what it receives, answers like the OpenAI API."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        if request.url.path == "/v1/models":
            return httpx.Response(
                200, json={"object": "list", "data": [{"id": "m", "root": "/nowhere"}]}
            )
        body = json.loads(request.content)
        self.seen.append(body)
        if body.get("model") == "explode":
            return httpx.Response(404, json={"error": {"message": "model explode does not exist"}})
        if body.get("stream"):
            chunks = (
                b"".join(f"data: {json.dumps({'i': i})}\n\n".encode() for i in range(3))
                + b"data: [DONE]\n\n"
            )
            return httpx.Response(
                200, stream=httpx.ByteStream(chunks), headers={"content-type": "text/event-stream"}
            )
        return httpx.Response(200, json={"choices": [{"text": "ok"}], "echo": body})


def sidecar_settings(tmp_path: Path, **overrides: Any) -> SidecarSettings:
    """The tests' settings: the test key and vocab, a fresh registry at ``tmp_path/reg`` and
    one allowed upload root, ``tmp_path/allowed``."""
    allowed = tmp_path / "allowed"
    allowed.mkdir(exist_ok=True)
    return SidecarSettings(
        api_key=KEY,
        registry=tmp_path / "reg",
        vocab_size=VOCAB,
        allowed_roots=[allowed],
        **overrides,
    )


def upload_over_http(
    url: str, data: bytes, api_key: str, *, replace: bool = False
) -> httpx.Response:
    """A vector upload to a running sidecar at ``url``."""
    return httpx.post(
        f"{url}/v1/steering/vectors?replace={'true' if replace else 'false'}",
        files={"file": ("v.safetensors", data)},
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=30,
    )


def sidecar_process_env(
    registry: Path,
    vllm_url: str = "http://127.0.0.1:9",
    vocab_size: int | None = VOCAB,
    api_key: str = KEY,
    **settings: object,
) -> dict[str, str]:
    """A sidecar child process's environment: the key, ``registry``, the upstream (port 9 by
    default: nothing answers), the vocab (None: vLLM's), and ``settings`` as
    ``SVD_SIDECAR_<NAME>``."""
    env = {"SVD_SIDECAR_API_KEY": api_key, "SVD_SIDECAR_REGISTRY": str(registry)}
    env["SVD_SIDECAR_VLLM_URL"] = vllm_url
    if vocab_size is not None:
        env["SVD_SIDECAR_VOCAB_SIZE"] = str(vocab_size)
    return env | {f"SVD_SIDECAR_{k.upper()}": str(v) for k, v in settings.items()}


@contextlib.contextmanager
def sidecar_env(
    tmp_path: Path, raise_server_exceptions: bool = True, **overrides: Any
) -> Iterator[dict]:
    """A sidecar app on a fresh registry with a fake vLLM, and a client for it."""
    upstream = Upstream()
    settings = sidecar_settings(tmp_path, **{"max_upload_bytes": 64 * 1024, **overrides})
    allowed = settings.allowed_roots[0]
    app = create_app(settings, transport=httpx.MockTransport(upstream))
    with TestClient(app, raise_server_exceptions=raise_server_exceptions) as client:
        yield {
            "client": client,
            "upstream": upstream,
            "allowed": allowed,
            "settings": settings,
            "tmp": tmp_path,
            "root": tmp_path / "reg",
        }


def upload(
    client: TestClient, data: bytes, *, name: str | None = None, replace: bool = False, headers=AUTH
):
    files = {"file": ("v.safetensors", data, "application/octet-stream")}
    form = {"name": name} if name else {}
    return client.post(
        f"/v1/steering/vectors?replace={'true' if replace else 'false'}",
        files=files,
        data=form,
        headers=headers,
    )


def snapshot(root: Path) -> dict[str, str]:
    """Every file under the registry (uploads excluded) and its content hash."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".uploads" not in p.parts and p.name != "registry.lock"
    }
