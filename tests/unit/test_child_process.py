"""``ChildProcess``: the one way the stack, tests and benchmarks start and stop servers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from svd_vllm.tools.serve import ChildProcess, free_port, vllm_command


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_child_waits_for_http_and_stops_by_its_process_group(tmp_path: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    child = ChildProcess("http", cmd, dict(os.environ), tmp_path / "logs" / "http.log")
    try:
        child.wait_http(f"http://127.0.0.1:{port}/", timeout=30, interval=0.05)
        assert child.poll() is None and _group_alive(child.pid)
    finally:
        child.stop(grace=10)
    assert child.poll() is not None and not _group_alive(child.pid)


def test_child_that_exits_before_ready_raises_with_its_log(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"]
    child = ChildProcess("engine", cmd, dict(os.environ), tmp_path / "engine.log")
    with pytest.raises(RuntimeError, match=r"engine exited with 3:\n.*no model here"):
        child.wait_http(f"http://127.0.0.1:{free_port()}/", timeout=30)


def test_vllm_command_adds_lora_flags_only_with_adapters() -> None:
    plain = vllm_command(Path("/m"), host="127.0.0.1", port=8000, loras={})
    assert "--enable-lora" not in plain and plain[-2:] == ["--dtype", "auto"]
    cmd = vllm_command(
        Path("/m"),
        host="127.0.0.1",
        port=8000,
        loras={"a": Path("/a"), "b": Path("/b")},
        extra=["--enforce-eager"],
    )
    # one spare (docs/known-vllm-issues.md#lora-slot)
    assert cmd[cmd.index("--max-loras") + 1] == "3"
    assert cmd[cmd.index("--lora-modules") + 1 :] == ["a=/a", "b=/b", "--enforce-eager"]
