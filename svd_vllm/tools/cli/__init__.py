"""The ``svd-vllm`` command line: one module per group of commands (serving: ``serve``,
``tune``, ``registry``, ``demo``; research: the reference decoder and the offline pipeline).
Building the parser imports no torch, vLLM or peft: ``--help`` answers at once."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ...core.settings import set_default
from .common import CLIError
from .offline import _add_offline
from .reference import _add_reference
from .registry import _add_registry
from .serving import _add_serving, _add_tune

__all__ = ["GROUPS", "CLIError", "build_parser", "main"]


#: How ``--help`` lists the commands: what serves, then what builds and measures.
GROUPS = {
    "serving": ("serve", "tune", "registry", "demo"),
    "research (the reference decoder and the offline pipeline)": (
        "warmstart",
        "extract",
        "eval",
        "generate",
        "score",
        "assets",
        "vector",
        "tiny",
    ),
}


def _grouped(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> str:
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    width = max(map(len, helps)) + 2
    blocks = []
    for title, names in GROUPS.items():
        rows = [f"  {n:<{width}}{helps[n]}" for n in names]
        blocks.append("\n".join([f"{title}:", *rows]))
    return "\n\n".join(blocks) + "\n\n`svd-vllm COMMAND --help` for each command's options."


def build_parser() -> argparse.ArgumentParser:
    from ... import __version__

    parser = argparse.ArgumentParser(
        prog="svd-vllm",
        usage="%(prog)s [-h] [--version] COMMAND ...",
        description="Steering Vector Decoding (Hu et al., NeurIPS 2025) for vLLM LoRA serving.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS
    )
    for add in (_add_serving, _add_tune, _add_registry, _add_offline, _add_reference):
        add(sub)
    parser.epilog = _grouped(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    set_default("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    from ...core.artifact import ArtifactError

    try:
        return int(args.func(args) or 0)
    except (CLIError, ArtifactError) as e:
        print(f"svd-vllm: error: {e}", file=sys.stderr)
        return 2
