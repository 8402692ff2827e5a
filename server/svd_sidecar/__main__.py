"""``svd-sidecar``: run the sidecar with uvicorn (settings from ``SVD_SIDECAR_*``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="svd-sidecar", description=__doc__)
    ap.add_argument("--host", help="address to listen on (default: SVD_SIDECAR_HOST, or 127.0.0.1)")
    ap.add_argument("--port", type=int, help="port (default: SVD_SIDECAR_PORT, or 8100)")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
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
    uvicorn.run(create_app(settings), host=host, port=port, log_level=args.log_level,
                timeout_graceful_shutdown=settings.shutdown_grace)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
