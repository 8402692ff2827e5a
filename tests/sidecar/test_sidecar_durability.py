"""kill -9 the sidecar during uploads: the registry stays consistent and the old version serves."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from svd_vllm.registry import Registry
from tests.support.artifacts import random_vector_bytes
from tests.support.child_servers import SidecarProcess
from tests.support.sidecar_app import sidecar_process_env

KEY = "d" * 32
VOCAB = 1_000_000  # a 4 MB artifact: uploads take long enough to be interrupted


def art_bytes(seed: int) -> bytes:
    return random_vector_bytes("big", vocab=VOCAB, seed=seed, mu=-1.0 - seed)


def slow_body(data: bytes, boundary: str, delay: float, half_sent: threading.Event | None = None):  # type: ignore[no-untyped-def]
    """A multipart body sent in 256 KiB pieces; ``half_sent`` is set once half the file is out."""
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.safetensors"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    yield head
    for i in range(0, len(data), 256 * 1024):
        yield data[i : i + 256 * 1024]
        if half_sent is not None and i + 256 * 1024 >= len(data) // 2:
            half_sent.set()
        time.sleep(delay)
    yield f"\r\n--{boundary}--\r\n".encode()


def _spooled(reg_dir: Path) -> list[Path]:
    return list((reg_dir / ".uploads").glob("upload-*"))


def _kill_when(sc: SidecarProcess, reg_dir: Path, ready: Callable[[int], bool]) -> bool:
    """SIGKILL the sidecar as soon as its spooled upload's size satisfies ``ready``."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for f in _spooled(reg_dir):
            with contextlib.suppress(OSError):
                if ready(f.stat().st_size):
                    sc.kill()
                    return True
        time.sleep(0.001)
    sc.kill()
    return False


# Each round has its own registry. "body": killed when half the body has been sent (so the
# server cannot have all of it); "processing": killed once the whole upload is spooled, while it
# is verified and registered (a short window: retried until the kill lands in it).
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("phase", ["body", "processing"])
def test_kill_during_upload_keeps_registry_consistent(
    tmp_path: Path, phase: str, seed: int
) -> None:
    reg_dir = tmp_path / "registry"
    sc = SidecarProcess(
        sidecar_process_env(reg_dir, vocab_size=VOCAB, api_key=KEY), tmp_path / "sidecar.log"
    ).start()
    registry = Registry(reg_dir)
    auth = {"Authorization": f"Bearer {KEY}"}
    boundary = "svdboundary"
    new = art_bytes(seed)
    try:
        r = httpx.post(
            f"{sc.url}/v1/steering/vectors",
            files={"file": ("b", art_bytes(0))},
            headers=auth,
            timeout=60,
        )
        assert r.status_code == 201, r.text
        landed = False
        for _ in range(5):
            before = registry.get("big")  # an attempt that missed may have registered it
            outcome: dict = {}
            half_sent = threading.Event()

            def send(outcome: dict = outcome, half_sent: threading.Event = half_sent) -> None:
                try:
                    outcome["r"] = httpx.post(
                        f"{sc.url}/v1/steering/vectors?replace=true",
                        content=slow_body(
                            new, boundary, 0.05 if phase == "body" else 0.0, half_sent
                        ),
                        headers={
                            **auth,
                            "content-type": f"multipart/form-data; boundary={boundary}",
                        },
                        timeout=60,
                    )
                except httpx.HTTPError as e:
                    outcome["error"] = e

            t = threading.Thread(target=send)
            t.start()
            if phase == "body":
                seen = half_sent.wait(30)
                sc.kill()
                t.join(30)
                landed = seen and "r" not in outcome  # killed mid-body, before any answer
            else:
                seen = _kill_when(sc, reg_dir, lambda size: size >= len(new))
                t.join(30)
                # Landed mid-write: the client got no answer and the upload is still spooled.
                landed = seen and "r" not in outcome and bool(_spooled(reg_dir))
            if landed:
                break
            sc.start()
        assert landed, "the kill never landed during the upload"
        # The registry is consistent: the manifest's entry is loadable and matches its hash;
        # it is the old version or (if the write completed before the kill) the new one.
        after = registry.get("big")
        loaded = registry.load(after)
        assert loaded.meta.content_hash == after.content_hash
        if phase == "body":
            assert after == before  # the body never arrived: nothing may have changed
        else:
            assert after.version in (before.version, before.version + 1)
            if after.version == before.version:
                assert after == before
        # A restarted sidecar serves the same state and cleans the aborted upload.
        sc.start()
        listed = httpx.get(f"{sc.url}/v1/steering/vectors", timeout=10).json()
        assert [(v["name"], v["version"]) for v in listed] == [("big", after.version)]
        assert not _spooled(reg_dir)
        assert not list(reg_dir.glob("*.tmp")) and not list(reg_dir.glob(".manifest.json.*"))
    finally:
        sc.stop()
