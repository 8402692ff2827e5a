"""svd-sidecar: the steering registry's management API and an OpenAI-compatible front for vLLM,
served by uvicorn (uvloop and httptools). Settings come from SVD_SIDECAR_* environment variables
(listed below, and in the docs' configuration page); --role, --host and --port override theirs.

Roles: `front` is stateless (it reads the registry) and may run --workers N processes and any
number of replicas; `management` (and `all`, both in one process) is the registry's one writer:
it holds the registry's writer lease, and a second one on the same registry refuses to start."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .settings import SidecarSettings


def _settings_help() -> str:
    from svd_vllm.core.settings import describe

    from .settings import SidecarSettings

    lines = ["settings (environment variables):"]
    for s in describe(SidecarSettings):
        lines.append(f"  {s.variable} ({s.type}, default {s.default})\n      {s.meaning}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="svd-sidecar",
        description=__doc__,
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--role",
        choices=("all", "front", "management"),
        help="what to serve (default: SVD_SIDECAR_ROLE, or all)",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="front processes on one port (--role front only; default: %(default)s)",
    )
    ap.add_argument("--host", help="address to listen on (default: SVD_SIDECAR_HOST, or 127.0.0.1)")
    ap.add_argument("--port", type=int, help="port (default: SVD_SIDECAR_PORT, or 8100)")
    ap.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug", "trace"),
        help="uvicorn's log level (default: %(default)s)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import os
    import shutil
    import tempfile

    from pydantic import ValidationError

    from svd_vllm.core.validation import pydantic_message
    from svd_vllm.registry import RegistryError
    from svd_vllm.registry.writer import WriterLease

    from .metrics import MULTIPROCESS_DIR
    from .settings import SidecarSettings

    if args.role is not None:
        os.environ["SVD_SIDECAR_ROLE"] = args.role  # each worker reads its settings from here
    try:
        settings = SidecarSettings()
    except ValidationError as e:
        print(f"svd-sidecar: {pydantic_message(e, root='settings')}", file=sys.stderr)
        return 2
    if args.workers < 1 or (args.workers > 1 and settings.role != "front"):
        print(
            f"svd-sidecar: --workers {args.workers}: only a front (--role front) runs several "
            "workers; the management API is the registry's one writer",
            file=sys.stderr,
        )
        return 2
    lease = None  # the writer's lease, held (by this reference) until this process exits
    if settings.role != "front":
        try:
            lease = WriterLease(settings.registry).acquire()
        except RegistryError as e:
            print(f"svd-sidecar: refusing to start: {e}", file=sys.stderr)
            return 2
    metrics_dir = None
    if args.workers > 1:  # one scrape reaches one worker: they count in shared files instead
        metrics_dir = tempfile.mkdtemp(prefix="svd-sidecar-metrics-")
        os.environ[MULTIPROCESS_DIR] = metrics_dir
    try:
        _serve(args, settings)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        if lease is not None:
            lease.release()
    return 0


def _serve(args: argparse.Namespace, settings: SidecarSettings) -> None:
    import uvicorn

    uvicorn.run(
        "svd_sidecar.app:app_from_environment",
        factory=True,
        workers=args.workers,
        host=settings.host if args.host is None else args.host,
        port=settings.port if args.port is None else args.port,
        loop="uvloop",
        http="httptools",
        log_level=args.log_level,
        timeout_graceful_shutdown=settings.shutdown_grace,
    )


if __name__ == "__main__":
    sys.exit(main())
