"""The tests' vLLM server: the package's, plus the MRV2 lane's guard against a silent fallback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.child_servers import VLLMServer as _VLLMServer
from tests.support.child_servers import free_port, vllm_env

__all__ = ["VLLMServer", "free_port", "run_offline_llm", "vllm_env"]


class VLLMServer(_VLLMServer):
    """Ready means the lane runs what it claims: on the MRV2 lane, the V2 runner and the
    interpreted Triton kernel (never the V1 runner or the torch kernel)."""

    def wait_ready(self, timeout: float = 240.0) -> None:
        super().wait_ready(timeout)
        if os.environ.get("SVD_TEST_MRV2") == "1":
            log = self.child.log_tail(1 << 22)
            assert "Using V2 Model Runner" in log, "the MRV2 lane's server runs the V1 runner"
            assert "v2 runner, triton (interpreted) kernel" in log, "no interpreted Triton kernel"


def run_offline_llm(
    spec: dict[str, Any], workdir: Path, registry: Path, timeout: float = 900
) -> tuple[str, dict[str, Any] | None]:
    """``spec`` through vLLM's offline ``LLM`` in a child process (``offline_llm.py``): its
    log, and its output (None if it failed)."""
    spec_path, out_path = workdir / "spec.json", workdir / "out.json"
    spec_path.write_text(json.dumps(spec))
    script = Path(__file__).with_name("offline_llm.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(spec_path), str(out_path)],
        env=vllm_env(registry),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    log = proc.stdout + proc.stderr
    return log, json.loads(out_path.read_text()) if proc.returncode == 0 else None
