"""Rootful podman for the container lane (``make test-containers``): builds, sizes, timings.

Every container the lane starts is named with ``PREFIX`` so one call removes what a run (or an
interrupted earlier run) left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = [
    "PREFIX",
    "Build",
    "build",
    "image_size",
    "podman",
    "remove_everything",
    "timed_stop",
    "wait_http",
]

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "svdct"
#: The stand-in base that ../shared/tools/podman-setup.sh imports (no registry is reachable).
PYTHON_IMAGE = os.environ.get("SVD_PYTHON_IMAGE", "localhost/python-base:3.11")
#: pip's find-links on these machines (torch's CPU wheel is there): mounted into every build.
WHEELS = Path(os.environ.get("SVD_WHEELS_DIR", "/opt/wheels"))


def podman(
    *args: str, check: bool = True, timeout: float = 900, capture: bool = True
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["podman", *args], capture_output=capture, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} exited {res.returncode}:\n"
            f"{(res.stdout or '')[-3000:]}\n{(res.stderr or '')[-3000:]}"
        )
    return res


@dataclass(frozen=True)
class Build:
    target: str
    tag: str
    seconds: float
    cached_steps: int  # steps podman took from its layer cache
    steps: int


def build(target: str, tag: str, *, log: Path) -> Build:
    """``podman build --target TARGET`` of the repository's Dockerfile, as CI builds it: the
    stand-in Python base, pip's wheel directory mounted, only pip's configured index (an empty
    ``TORCH_INDEX_URL``), Docker format (HEALTHCHECK kept)."""
    volume = [f"--volume={WHEELS}:{WHEELS}:ro"] if WHEELS.is_dir() else []
    t0 = time.monotonic()
    res = podman(
        "build",
        "--format",
        "docker",
        "--network",
        "host",
        *volume,
        "--build-arg",
        f"PYTHON_IMAGE={PYTHON_IMAGE}",
        "--build-arg",
        "TORCH_INDEX_URL=",
        "--target",
        target,
        "--tag",
        tag,
        str(ROOT),
        timeout=3600,
    )
    seconds = time.monotonic() - t0
    out = res.stdout + res.stderr
    log.write_text(out)
    steps = sum(1 for line in out.splitlines() if " STEP " in line)
    return Build(target, tag, seconds, out.count("Using cache"), steps)


def image_size(tag: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())


def image_config(tag: str) -> dict:
    return json.loads(podman("image", "inspect", tag).stdout)[0]["Config"]


def wait_http(url: str, timeout: float, container: str | None = None) -> float:
    """Seconds until ``url`` answers 200; fails with the container's log tail otherwise."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        if container is not None:
            state = podman("inspect", "--format", "{{.State.Status}}", container, check=False)
            if state.stdout.strip() in ("exited", "stopped"):
                break
        time.sleep(0.5)
    tail = podman("logs", "--tail", "60", container, check=False) if container else None
    raise AssertionError(
        f"{url} did not answer 200 in {timeout:.0f} s"
        + (f"; {container} logs:\n{tail.stdout}{tail.stderr}" if tail else "")
    )


def timed_stop(container: str, grace: int = 10) -> float:
    """Seconds ``podman stop`` takes (SIGTERM, then SIGKILL after ``grace``)."""
    t0 = time.monotonic()
    podman("stop", "--time", str(grace), container)
    return time.monotonic() - t0


def remove_everything(
    extra_pods: Sequence[str] = (), extra_volumes: Sequence[str] = (), secrets: Sequence[str] = ()
) -> None:
    """Remove the lane's pods, containers, volumes and secrets (images stay: the layer cache)."""
    pods = podman("pod", "ls", "--format", "{{.Name}}", check=False).stdout.split()
    for pod in [p for p in pods if p.startswith(PREFIX) or p in extra_pods]:
        podman("pod", "rm", "--force", "--time", "0", pod, check=False)
    names = podman("ps", "--all", "--format", "{{.Names}}", check=False).stdout.split()
    for c in [n for n in names if n.startswith(PREFIX)]:
        podman("rm", "--force", "--time", "0", c, check=False)
    vols = podman("volume", "ls", "--format", "{{.Name}}", check=False).stdout.split()
    for v in [v for v in vols if v.startswith(PREFIX) or v in extra_volumes]:
        podman("volume", "rm", "--force", v, check=False)
    for s in secrets:
        podman("secret", "rm", s, check=False)
