"""kill -9 the sidecar during uploads: the registry stays consistent and the old version serves."""

from __future__ import annotations

import random
import threading
import time

import httpx
import pytest
import torch

from svd_vllm import artifact
from svd_vllm.artifact import SteeringArtifact
from svd_vllm.registry import Registry
from tests.support.sidecar_proc import SidecarProcess

KEY = "d" * 32
VOCAB = 1_000_000  # a 4 MB artifact: uploads take long enough to be interrupted


def art_bytes(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return artifact.to_bytes(
        SteeringArtifact.create(
            torch.randn(VOCAB, generator=g),
            name="big",
            base_model="b",
            adapter="a",
            tokenizer_fingerprint="t",
            mu_bar=-1.0 - seed,
        )
    )


def slow_body(data: bytes, boundary: str, delay: float):  # type: ignore[no-untyped-def]
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.safetensors\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()  # fmt: skip
    yield head
    for i in range(0, len(data), 256 * 1024):
        yield data[i : i + 256 * 1024]
        time.sleep(delay)
    yield f"\r\n--{boundary}--\r\n".encode()


@pytest.mark.parametrize("round_", range(5))
def test_kill_during_upload_keeps_registry_consistent(
    tmp_path_factory: pytest.TempPathFactory, round_: int
) -> None:
    root = tmp_path_factory.getbasetemp() / "durability"
    root.mkdir(exist_ok=True)
    reg_dir = root / "registry"
    env = {"SVD_SIDECAR_API_KEY": KEY, "SVD_SIDECAR_REGISTRY": str(reg_dir), "SVD_SIDECAR_VOCAB_SIZE": str(VOCAB),
           "SVD_SIDECAR_VLLM_URL": "http://127.0.0.1:9"}  # fmt: skip
    sc = SidecarProcess(env, root / "sidecar.log").start()
    registry = Registry(reg_dir)
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        if round_ == 0:
            r = httpx.post(
                f"{sc.url}/v1/steering/vectors",
                files={"file": ("b", art_bytes(0))},
                headers=auth,
                timeout=60,
            )
            assert r.status_code == 201, r.text
        before = registry.get("big")
        rng = random.Random(round_)
        boundary = "svdboundary"
        # Even rounds: kill mid-body. Odd rounds: send it all, kill while it is being processed.
        delay = 0.05 if round_ % 2 == 0 else 0.0
        kill_after = rng.uniform(0.1, 0.5) if round_ % 2 == 0 else rng.uniform(0.0, 0.15)
        outcome: dict = {}

        def send() -> None:
            try:
                outcome["r"] = httpx.post(
                    f"{sc.url}/v1/steering/vectors?replace=true",
                    content=slow_body(art_bytes(round_ + 1), boundary, delay),
                    headers={**auth, "content-type": f"multipart/form-data; boundary={boundary}"},
                    timeout=60,
                )
            except httpx.HTTPError as e:
                outcome["error"] = e

        t = threading.Thread(target=send)
        t.start()
        time.sleep(kill_after)
        sc.kill()
        t.join(30)
        # The registry is consistent: the manifest's entry is loadable and matches its hash;
        # it is the old version or (if the write completed before the kill) the new one.
        after = registry.get("big")
        loaded = registry.load(after)
        assert loaded.meta.content_hash == after.content_hash
        assert after.version in (before.version, before.version + 1)
        if after.version == before.version:
            assert after == before
        # A restarted sidecar serves the same state and cleans the aborted upload.
        sc.start()
        listed = httpx.get(f"{sc.url}/v1/steering/vectors", timeout=10).json()
        assert [(v["name"], v["version"]) for v in listed] == [("big", after.version)]
        assert not list((reg_dir / ".uploads").glob("upload-*"))
        assert not list(reg_dir.glob("*.tmp")) and not list(reg_dir.glob(".manifest.json.*"))
    finally:
        sc.stop()
