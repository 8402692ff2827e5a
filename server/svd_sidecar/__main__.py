"""svd-sidecar: the steering registry's management API and an OpenAI-compatible front for vLLM,
served by uvicorn. Settings come from SVD_SIDECAR_* environment variables (listed below, and in
the docs' configuration page); --host and --port override the first two."""

from __future__ import annotations

import argparse
import sys


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
    import uvicorn
    from pydantic import ValidationError

    from svd_vllm.core.validation import pydantic_message

    from .app import create_app
    from .settings import SidecarSettings

    try:
        settings = SidecarSettings()
    except ValidationError as e:
        print(f"svd-sidecar: {pydantic_message(e, root='settings')}", file=sys.stderr)
        return 2
    host = settings.host if args.host is None else args.host
    port = settings.port if args.port is None else args.port
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level=args.log_level,
        timeout_graceful_shutdown=settings.shutdown_grace,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
