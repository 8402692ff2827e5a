"""Hostile and faulty conditions against the sidecar: a clear 4xx (or 503/507 for a registry the
server cannot use), never a 500, and the registry left byte for byte as it was.

Covers the #16 cases fixed so far: NUL bytes in paths, names with a trailing newline, unbounded
strengths at upload, JSON nested past the recursion limit, a corrupt manifest, a full disk,
readiness that must not lie, and the grace period of superseded files.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from svd_vllm.core import artifact
from svd_vllm.registry import Registry
from tests.test_sidecar import AUTH, VOCAB, sidecar_env, vec_bytes


def snapshot(root: Path) -> dict[str, str]:
    """Every file under the registry (uploads excluded) and its content hash."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".uploads" not in p.parts and p.name != "registry.lock"
    }


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict]:
    """The sidecar as clients see it: a server error is a 500 response, not a raised exception."""
    with sidecar_env(tmp_path, raise_server_exceptions=False) as e:
        r = e["client"].post(
            "/v1/steering/vectors", files={"file": ("v", vec_bytes("keep"))}, headers=AUTH
        )
        assert r.status_code == 201, r.text
        yield e


def test_nul_byte_in_a_registration_path(env: dict) -> None:
    before = snapshot(env["root"])
    r = env["client"].post(
        "/v1/steering/vectors", json={"path": f"{env['allowed']}/a\x00b"}, headers=AUTH
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "path"
    assert snapshot(env["root"]) == before


@pytest.mark.parametrize("name", ["ok\n", "ok\r\n", "\nok", "a/b", ""])
def test_bad_multipart_names_leave_no_file(env: dict, name: str) -> None:
    before = snapshot(env["root"])
    r = env["client"].post("/v1/steering/vectors", files={"file": ("v", vec_bytes("n"))},
                           data={"name": name}, headers=AUTH)  # fmt: skip
    if name == "":
        assert r.status_code == 201  # an empty field means "the artifact's own name"
        return
    assert r.status_code == 400 and r.json()["error"]["code"] == "name", r.text
    assert snapshot(env["root"]) == before


@pytest.mark.parametrize("scale", ["-1e300", "1e300", "101", "inf", "nan", "x"])
def test_unbounded_strength_at_upload(env: dict, scale: str) -> None:
    before = snapshot(env["root"])
    r = env["client"].post("/v1/steering/vectors", files={"file": ("v", vec_bytes("s"))},
                           data={"default_scale": scale}, headers=AUTH)  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["code"] == "validation", r.text
    assert snapshot(env["root"]) == before


def test_json_nested_past_the_recursion_limit(env: dict) -> None:
    deep = b'{"model": "m", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = env["client"].post(
        "/v1/completions", content=deep, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "json"
    assert env["upstream"].seen == []
    assert env["client"].get("/healthz").status_code == 200  # the connection still serves


def test_corrupt_manifest_is_a_503_not_a_500(env: dict) -> None:
    c = env["client"]
    manifest = env["root"] / "manifest.json"
    manifest.write_bytes(b'{"format": 1, "vectors": {"keep": ')
    before = snapshot(env["root"])
    assert c.get("/v1/steering/vectors").status_code == 503
    r = c.post(
        "/v1/completions", json={"model": "keep", "prompt": "x", "steering": {"enabled": True}}
    )
    assert r.status_code == 503 and r.json()["error"]["code"] == "unreadable"
    r = c.post("/v1/completions", json={"model": "keep", "prompt": "x"})  # no steering asked
    assert r.status_code == 200
    ready = c.get("/readyz")
    assert ready.status_code == 503 and "unreadable manifest" in ready.json()["checks"]["manifest"]
    assert snapshot(env["root"]) == before


def _disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_on_patch_and_upload(env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from svd_vllm.registry import directory

    c = env["client"]
    before = snapshot(env["root"])
    monkeypatch.setattr(directory, "atomic_write_bytes", _disk_full)
    r = c.patch("/v1/steering/vectors/keep", json={"default_scale": 2.0}, headers=AUTH)
    assert r.status_code == 507 and r.json()["error"]["code"] == "storage_full"
    r = c.post("/v1/steering/vectors", files={"file": ("v", vec_bytes("new"))}, headers=AUTH)
    assert r.status_code == 507
    assert snapshot(env["root"]) == before
    assert c.get("/v1/steering/vectors/keep").status_code == 200  # and the next request works


def test_disk_full_between_file_and_manifest_leaves_no_orphan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from svd_vllm.registry import directory

    reg = Registry(tmp_path)
    reg.add(_art("a"))
    before = snapshot(tmp_path)
    real = directory.atomic_write_bytes

    def manifest_fails(path: os.PathLike[str], data: bytes) -> None:
        if Path(path).name == "manifest.json":
            _disk_full()
        real(path, data)

    monkeypatch.setattr(directory, "atomic_write_bytes", manifest_fails)
    with pytest.raises(OSError):
        reg.add(_art("a", seed=3), replace=True)
    assert snapshot(tmp_path) == before  # the new version's file was removed again


def test_readiness_reports_a_disk_about_to_fill(env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from svd_sidecar.routers import health

    assert env["client"].get("/readyz").status_code == 200
    monkeypatch.setattr(health.shutil, "disk_usage", lambda p: SimpleNamespace(free=100))
    r = env["client"].get("/readyz")
    assert r.status_code == 503 and "disk almost full" in r.json()["checks"]["registry"]


def _art(name: str, seed: int = 0) -> artifact.SteeringArtifact:
    import torch

    g = torch.Generator().manual_seed(seed)
    return artifact.SteeringArtifact.create(
        torch.randn(VOCAB, generator=g), name=name, base_model="b", adapter="a",
        tokenizer_fingerprint="t", mu_bar=-1.0, alpha=0.1,
    )  # fmt: skip


def test_grace_period_counts_from_replacement_not_registration(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    old = reg.add(_art("v"))
    old_file = tmp_path / old.file
    long_ago = time.time() - 3600  # registered an hour ago: older than the 600 s grace
    os.utime(old_file, (long_ago, long_ago))
    reg.add(_art("v", seed=1), replace=True)
    assert old_file.exists()  # readers that still load version 1 get 10 more minutes
    os.utime(old_file, (long_ago, long_ago))  # ... once they have passed
    reg.remove("v")
    assert not old_file.exists()
