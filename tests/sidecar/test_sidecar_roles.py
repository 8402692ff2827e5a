"""The sidecar split in two: a stateless front (any number of workers) and the management API,
the registry's one writer. Real processes on 127.0.0.1, stopped by their PIDs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from svd_vllm.registry import Registry
from svd_vllm.registry.writer import WriterLease
from tests.support.child_servers import SidecarProcess
from tests.support.sidecar_app import AUTH, sidecar_process_env, upload_over_http, vec_bytes


def test_a_second_writer_on_one_registry_refuses_to_start(tmp_path: Path) -> None:
    env = sidecar_process_env(tmp_path / "reg")
    first = SidecarProcess(env, tmp_path / "first.log", args=["--role", "management"])
    first.start()
    try:
        for role in ("management", "all"):
            second = subprocess.run(
                [sys.executable, "-m", "svd_sidecar", "--role", role, "--port", "9"],
                env={**first.env},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert second.returncode == 2, second.stderr
            assert "already has a writer (pid " in second.stderr, second.stderr
        # The first still writes; the registry has exactly its commits.
        r = upload_over_http(first.url, vec_bytes("v1"), env["SVD_SIDECAR_API_KEY"])
        assert r.status_code == 201, r.text
        assert [e.name for e in Registry(tmp_path / "reg").list()] == ["v1"]
    finally:
        first.stop()
    # Its lease ends with it: the next writer starts.
    assert WriterLease(tmp_path / "reg").acquire() is not None


def test_fronts_with_workers_serve_next_to_the_writer_and_never_write(tmp_path: Path) -> None:
    env = sidecar_process_env(tmp_path / "reg")
    writer = SidecarProcess(env, tmp_path / "w.log", args=["--role", "management"])
    front = SidecarProcess(
        {k: v for k, v in env.items() if k != "SVD_SIDECAR_API_KEY"},  # a front needs no key
        tmp_path / "f.log",
        args=["--role", "front", "--workers", "2"],
    )
    writer.start()
    try:
        front.start()
        r = upload_over_http(writer.url, vec_bytes("v1"), env["SVD_SIDECAR_API_KEY"])
        assert r.status_code == 201, r.text
        # The front has no management API (its catch-all says what it serves instead)...
        for _ in range(6):  # both workers
            r = httpx.get(f"{front.url}/v1/steering/vectors", headers=AUTH, timeout=10)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_proxied"
        # ...and the writer no OpenAI front.
        r = httpx.post(f"{writer.url}/v1/completions", json={"model": "m"}, timeout=10)
        assert r.status_code == 404
    finally:
        front.stop()
        writer.stop()


def test_workers_are_for_fronts_only(tmp_path: Path) -> None:
    env = sidecar_process_env(tmp_path / "reg")
    r = subprocess.run(
        [sys.executable, "-m", "svd_sidecar", "--role", "management", "--workers", "2"],
        env={**SidecarProcess(env, tmp_path / "x.log").env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "only a front (--role front) runs several" in r.stderr


def test_a_scrape_of_a_front_with_workers_counts_every_worker(tmp_path: Path) -> None:
    """N workers share one port and a scrape reaches one of them: each scrape must still
    answer the whole front's counts, not one worker's share."""
    from tests.support.faulty_upstream import FaultyUpstream

    with FaultyUpstream() as upstream:
        env = sidecar_process_env(tmp_path / "reg", vllm_url=upstream.url)
        front = SidecarProcess(env, tmp_path / "f.log", args=["--role", "front", "--workers", "2"])
        front.start()
        try:
            for _ in range(24):  # a new connection each: the kernel spreads them over workers
                r = httpx.post(f"{front.url}/v1/completions", json={"model": "ok"}, timeout=10)
                assert r.status_code == 200, r.text
            line = 'svd_sidecar_proxied_requests_total{endpoint="completions",steering="default"}'
            for _ in range(8):
                text = httpx.get(f"{front.url}/metrics", timeout=10).text
                counts = [ln.split()[-1] for ln in text.splitlines() if ln.startswith(line)]
                assert counts == ["24.0"], counts
        finally:
            front.stop()
