"""Run the sidecar as a real process for tests; stopped (or killed) by its PID."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from svd_vllm.tools.serve import ChildProcess, free_port


class SidecarProcess:
    """The sidecar on 127.0.0.1; ``start`` again after ``stop``/``kill`` restarts it (same port)."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.child: ChildProcess | None = None

    def start(self, timeout: float = 60) -> SidecarProcess:
        cmd = [
            sys.executable,
            "-m",
            "svd_sidecar",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        self.child = ChildProcess("sidecar", cmd, self.env, self.log_path)
        self.child.wait_http(f"{self.url}/healthz", timeout, interval=0.1)
        return self

    def kill(self) -> None:
        """SIGKILL: no chance to clean up (the durability tests want exactly that)."""
        if self.child is not None and self.child.poll() is None:
            self.child.kill()

    def stop(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.stop(grace=15)
