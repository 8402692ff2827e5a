"""Hostile and faulty conditions against the sidecar: a clear 4xx (or 503/507 for a registry the
server cannot use), never a 500, and the registry left byte for byte as it was.

Covers: NUL bytes in paths, names with a trailing newline, unbounded
strengths at upload, JSON nested past the recursion limit, a corrupt manifest, a full disk,
readiness that must not lie, the grace period of superseded files, body size caps and a
corrupt artifact file.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from svd_vllm.registry import Registry
from tests.support.artifacts import random_vector
from tests.support.sidecar_app import (
    AUTH,
    KEY,
    VOCAB,
    sidecar_env,
    sidecar_process_env,
    snapshot,
    vec_bytes,
)


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


def _upload_form(env: dict, data: bytes, **form: str) -> httpx.Response:
    """An upload with these multipart form fields."""
    files = {"file": ("v", data)}
    return env["client"].post("/v1/steering/vectors", files=files, data=form, headers=AUTH)


@pytest.mark.parametrize("name", ["ok\n", "ok\r\n", "\nok", "a/b", ""])
def test_bad_multipart_names_leave_no_file(env: dict, name: str) -> None:
    before = snapshot(env["root"])
    r = _upload_form(env, vec_bytes("n"), name=name)
    if name == "":
        assert r.status_code == 201  # an empty field means "the artifact's own name"
        return
    assert r.status_code == 400 and r.json()["error"]["code"] == "name", r.text
    assert snapshot(env["root"]) == before


@pytest.mark.parametrize("scale", ["-1e300", "1e300", "101", "inf", "nan", "x"])
def test_unbounded_strength_at_upload(env: dict, scale: str) -> None:
    before = snapshot(env["root"])
    r = _upload_form(env, vec_bytes("s"), default_scale=scale)
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
    reg.add(random_vector("a", vocab=VOCAB))
    before = snapshot(tmp_path)
    real = directory.atomic_write_bytes

    def manifest_fails(path: os.PathLike[str], data: bytes) -> None:
        if Path(path).name == "manifest.json":
            _disk_full()
        real(path, data)

    monkeypatch.setattr(directory, "atomic_write_bytes", manifest_fails)
    with pytest.raises(OSError):
        reg.add(random_vector("a", vocab=VOCAB, seed=3), replace=True)
    assert snapshot(tmp_path) == before  # the new version's file was removed again


def test_readiness_reports_a_disk_about_to_fill(env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from svd_sidecar.routers import health

    assert env["client"].get("/readyz").status_code == 200
    monkeypatch.setattr(health.shutil, "disk_usage", lambda p: SimpleNamespace(free=100))
    r = env["client"].get("/readyz")
    assert r.status_code == 503 and "disk almost full" in r.json()["checks"]["registry"]


def test_grace_period_counts_from_replacement_not_registration(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    old = reg.add(random_vector("v", vocab=VOCAB))
    old_file = tmp_path / old.file
    long_ago = time.time() - 3600  # registered an hour ago: older than the 600 s grace
    os.utime(old_file, (long_ago, long_ago))
    reg.add(random_vector("v", vocab=VOCAB, seed=1), replace=True)
    assert old_file.exists()  # readers that still load version 1 get 10 more minutes
    os.utime(old_file, (long_ago, long_ago))  # ... once they have passed
    reg.remove("v")
    assert not old_file.exists()


# -- body size caps ---------------------------------------------------------------
@pytest.fixture
def capped(tmp_path: Path) -> Iterator[dict]:
    with sidecar_env(tmp_path, raise_server_exceptions=False, max_body_bytes=4096) as e:
        yield e


def _chunks(total: int, size: int = 1024) -> Iterator[bytes]:
    for _ in range(total // size):
        yield b"x" * size


@pytest.mark.parametrize("chunked", [False, True])
def test_oversized_bodies_on_the_open_front_get_413(capped: dict, chunked: bool) -> None:
    body = b'{"model": "m", "prompt": "' + b"a" * 8192 + b'"}'
    content = _chunks(len(body)) if chunked else body
    r = capped["client"].post(
        "/v1/completions", content=content, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "size"
    assert capped["upstream"].seen == []  # nothing reached vLLM
    ok = capped["client"].post("/v1/completions", json={"model": "m", "prompt": "hi"})
    assert ok.status_code == 200  # under the cap: proxied as before


def test_oversized_chunked_upload_gets_413_and_leaves_nothing(env: dict) -> None:
    before = snapshot(env["root"])
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="v"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()

    def body() -> Iterator[bytes]:
        yield head
        yield from _chunks(4 * 64 * 1024, 4096)  # 4x the upload cap, no Content-Length
        yield f"\r\n--{boundary}--\r\n".encode()

    r = env["client"].post(
        "/v1/steering/vectors",
        content=body(),
        headers={**AUTH, "content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "size"
    assert snapshot(env["root"]) == before
    assert not list((env["root"] / ".uploads").glob("*"))


def _stream_until_answered(
    url: str, path: str, headers: dict[str, str], cap: int, prefix: bytes = b""
) -> tuple[int, int]:
    """Send a chunked body of 1 MiB chunks (up to 256x ``cap``) until the server answers;
    returns (HTTP status, bytes sent by then)."""
    import select
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {u.hostname}:{u.port}",
        "Transfer-Encoding: chunked",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    if prefix:
        sock.sendall(b"%x\r\n" % len(prefix) + prefix + b"\r\n")
    chunk = b"%x\r\n" % (1 << 20) + b"x" * (1 << 20) + b"\r\n"
    sent = 0
    try:
        while sent < 256 * cap:
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered
            try:
                sock.sendall(chunk)
            except OSError:
                break  # the server closed the connection after answering
            sent += 1 << 20
        sock.settimeout(30)
        status = int(sock.recv(4096).split(b" ", 2)[1])
    finally:
        sock.close()
    return status, sent


def test_a_real_sidecar_refuses_a_chunked_stream_as_it_arrives(tmp_path: Path) -> None:
    """Against a real uvicorn sidecar: no Content-Length, 1 MiB chunks. The 413 comes after
    about the cap, not after the whole stream, and nothing is left spooled."""
    from tests.support.child_servers import SidecarProcess

    cap = 2 << 20
    reg = tmp_path / "reg"
    env = sidecar_process_env(reg, max_body_bytes=cap, max_upload_bytes=cap)
    sc = SidecarProcess(env, tmp_path / "sidecar.log").start()
    try:
        status, sent = _stream_until_answered(
            sc.url, "/v1/completions", {"Content-Type": "application/json"}, cap
        )
        assert status == 413 and sent <= 8 * cap, (status, sent)
        status, sent = _stream_until_answered(
            sc.url,
            "/v1/steering/vectors",
            {"Content-Type": "multipart/form-data; boundary=b", "Authorization": f"Bearer {KEY}"},
            cap,
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="v"\r\n\r\n',
        )
        assert status == 413 and sent <= 8 * cap, (status, sent)
        assert not list((reg / ".uploads").glob("*"))
    finally:
        sc.stop()


# -- a corrupt artifact file ----------------------------------------------------
def test_a_corrupt_file_is_shown_and_refused_never_a_500(env: dict) -> None:
    client, root = env["client"], env["root"]
    path = root / Registry(root).get("keep").file
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # one flipped bit in the tensor data
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    before = snapshot(root)
    listed = {v["name"]: v for v in client.get("/v1/steering/vectors").json()}
    assert listed["keep"]["status"] == "unloadable" and "hash" in listed["keep"]["problem"]
    detail = client.get("/v1/steering/vectors/keep")
    assert detail.status_code == 200 and detail.json()["status"] == "unloadable"
    assert detail.json()["calibration"] is None
    r = client.post(
        "/v1/completions", json={"model": "keep", "prompt": "hi", "steering": {"enabled": True}}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "unloadable_vector"
    assert "'keep'" in r.json()["error"]["message"] and env["upstream"].seen == []
    off = client.post(
        "/v1/completions", json={"model": "keep", "prompt": "hi", "steering": {"enabled": False}}
    )
    assert off.status_code == 200  # not asking for it: proxied
    assert snapshot(root) == before
    # A good replacement: ready again.
    r = client.post(
        "/v1/steering/vectors?replace=true", files={"file": ("v", vec_bytes("keep"))}, headers=AUTH
    )
    assert r.status_code == 201 and r.json()["status"] == "ready"
