"""``svd-vllm serve``: vLLM (with the plugin and your LoRA adapters) plus the sidecar, locally.

Both run as child processes in their own sessions, share one registry, listen on
127.0.0.1 by default, and are stopped by their PIDs when the stack closes (Ctrl-C too).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

__all__ = ["LocalStack", "StackConfig"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _has_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


@dataclass
class StackConfig:
    model: Path
    loras: Mapping[str, Path]
    registry: Path
    host: str = "127.0.0.1"
    vllm_port: int = 0  # 0: pick a free port
    sidecar_port: int = 0
    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    max_lora_rank: int = 8
    max_model_len: int = 2048
    dtype: str = "auto"
    extra_vllm_args: list[str] = field(default_factory=list)
    log_dir: Path | None = None
    kv_cache_gib: int = 2


class LocalStack:
    """Start / wait / stop vLLM and the sidecar."""

    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg
        self.vllm_port = cfg.vllm_port or _free_port()
        self.sidecar_port = cfg.sidecar_port or _free_port()
        self.vllm_url = f"http://{cfg.host}:{self.vllm_port}"
        self.sidecar_url = f"http://{cfg.host}:{self.sidecar_port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.log_dir = cfg.log_dir or (cfg.registry.parent / "logs")

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env["SVD_VLLM_REGISTRY"] = str(self.cfg.registry)
        if not _has_gpu():
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cfg.kv_cache_gib))
        env.update(
            SVD_SIDECAR_API_KEY=self.cfg.api_key,
            SVD_SIDECAR_REGISTRY=str(self.cfg.registry),
            SVD_SIDECAR_VLLM_URL=self.vllm_url,
            SVD_SIDECAR_MODEL_DIR=str(self.cfg.model),
        )
        return env

    def _spawn(self, name: str, cmd: list[str]) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # owned by the child
        self.procs[name] = subprocess.Popen(
            cmd, env=self._env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def start(self) -> LocalStack:
        c = self.cfg
        c.registry.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(c.model),
            "--host", c.host, "--port", str(self.vllm_port),
            "--max-model-len", str(c.max_model_len),
            "--dtype", c.dtype,
        ]  # fmt: skip
        if c.loras:
            cmd += [
                "--enable-lora",
                "--max-lora-rank",
                str(c.max_lora_rank),
                "--max-loras",
                str(len(c.loras)),
            ]
            cmd += ["--lora-modules", *[f"{k}={v}" for k, v in c.loras.items()]]
        cmd += c.extra_vllm_args
        self._spawn("vllm", cmd)
        self._spawn(
            "sidecar",
            [sys.executable, "-m", "svd_sidecar", "--host", c.host,
             "--port", str(self.sidecar_port),
             "--log-level", "warning"],
        )  # fmt: skip
        return self

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        for name, url in (
            ("sidecar", self.sidecar_url + "/healthz"),
            ("vllm", self.vllm_url + "/health"),
        ):
            while True:
                proc = self.procs[name]
                if proc.poll() is not None:
                    tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")
                try:
                    if httpx.get(url, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} was not ready after {timeout:.0f}s")
                time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM each child's process group (led by its PID), then SIGKILL stragglers."""
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
