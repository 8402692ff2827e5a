"""``svd-sidecar``: run the sidecar with uvicorn (settings from ``SVD_SIDECAR_*``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="svd-sidecar", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
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
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
