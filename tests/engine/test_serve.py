"""``svd-vllm serve`` / the demo's LocalStack: vLLM + sidecar up, one steered request, all stopped."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from svd_vllm.core import artifact
from svd_vllm.offline.reference import ReferenceDecoder
from svd_vllm.tools.serve import CPU_BIND_ENV, LocalStack, StackConfig, cpu_rank_binding
from tests.support.sidecar_app import upload_over_http

pytestmark = pytest.mark.vllm


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_local_stack_serves_and_stops(serving_assets: dict, tmp_path: Path) -> None:
    a = serving_assets
    cfg = StackConfig(
        model=a["base"],
        loras={"lora1": a["loras"]["lora1"]},
        registry=tmp_path / "registry",
        max_model_len=512,
        dtype="float32",
        log_dir=tmp_path / "logs",
        kv_cache_gib=1,
    )
    stack = LocalStack(cfg)
    with stack:
        stack.wait_ready(timeout=300)
        data = artifact.to_bytes(a["vectors"]["lora1"])
        r = upload_over_http(stack.sidecar_url, data, cfg.api_key)
        assert r.status_code == 201, r.text
        body = {
            "model": "lora1",
            "prompt": "the color of sky is",
            "max_tokens": 6,
            "temperature": 0,
            "return_token_ids": True,
            "steering": {"enabled": True},
        }
        r = httpx.post(f"{stack.sidecar_url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        dec = ReferenceDecoder(a["base"], a["loras"]["lora1"], vector=a["vectors"]["lora1"])
        assert (
            r.json()["choices"][0]["token_ids"]
            == dec.generate("the color of sky is", max_new_tokens=6).token_ids
        )
        pids = [p.pid for p in stack.procs.values()]
    assert not any(_alive(pid) for pid in pids)


def test_serve_stops_its_children_on_sigterm(serving_assets: dict, tmp_path: Path) -> None:
    """docker stop / systemd / k8s send SIGTERM: vLLM and the sidecar must go with ``serve``.

    No ``--max-model-len``: the tiny model has 512 positions, so the old forced 2048 made vLLM
    refuse to start; vLLM now derives it from the model.
    """
    import re
    import signal
    import subprocess
    import sys
    import time

    a = serving_assets
    cmd = [
        sys.executable,
        "-m",
        "svd_vllm.tools.cli",
        "serve",
        "--model",
        str(a["base"]),
        "--lora",
        f"lora1={a['loras']['lora1']}",
        "--registry",
        str(tmp_path / "registry"),
        "--port",
        "0",
        "--sidecar-port",
        "0",
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 300
        out = []
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out.append(line)
            if line.startswith("children:"):
                pids = [int(p) for p in re.findall(r"pid (\d+)", line)]
                break
        assert len(pids) == 2, "".join(out)[-3000:]
        assert all(_alive(p) for p in pids)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in pids:
            if _alive(p):
                os.killpg(p, signal.SIGKILL)


@pytest.mark.parametrize(
    ("ranks", "cores", "binding"),
    [
        (2, [0, 1], "0|1"),
        (2, range(8), "0-3|4-7"),
        (3, range(7), "0-1|2-3|4-5"),
        (2, [6, 0, 4, 2], "0,2|4,6"),
        (1, [5], "5"),
    ],
)
def test_cpu_rank_binding_gives_each_rank_its_own_cores(
    ranks: int, cores: list[int], binding: str
) -> None:
    assert cpu_rank_binding(ranks, cores) == binding


def test_serve_sets_the_binding_only_where_vllm_cpu_needs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(CPU_BIND_ENV, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    monkeypatch.setattr("svd_vllm.tools.serve._has_gpu", lambda: False)
    cfg = StackConfig(model=tmp_path, loras={}, registry=tmp_path / "r")
    assert cfg.cpu_binding() is None  # one rank
    cfg.tensor_parallel_size = 2
    assert cfg.cpu_binding() == "0|1"
    assert LocalStack(cfg)._env()[CPU_BIND_ENV] == "0|1"
    cfg.pipeline_parallel_size = 2
    with pytest.raises(ValueError, match="4 ranks need at least 4 cores; this process may use 2"):
        cfg.cpu_binding()
    monkeypatch.setenv(CPU_BIND_ENV, "0-1|0-1|0-1|0-1")  # the user's own choice wins
    assert cfg.cpu_binding() is None
    assert LocalStack(cfg)._env()[CPU_BIND_ENV] == "0-1|0-1|0-1|0-1"


def test_serve_refuses_more_cpu_ranks_than_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from svd_vllm.tools.cli import main

    monkeypatch.delenv(CPU_BIND_ENV, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    monkeypatch.setattr("svd_vllm.tools.serve._has_gpu", lambda: False)
    code = main(
        [
            "serve",
            "--model",
            str(tmp_path),
            "--registry",
            str(tmp_path / "r"),
            "--tensor-parallel-size",
            "4",
        ]
    )
    assert code != 0
    assert "4 ranks need at least 4 cores" in capsys.readouterr().err
