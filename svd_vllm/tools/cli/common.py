"""Helpers every command group shares: argument types, common options, user-facing errors."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ...core.choices import DEVICES, DTYPE_NAMES


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def _existing_dir(value: str) -> Path:
    p = Path(value).expanduser()
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: not a directory")
    return p


def _existing_file(value: str) -> Path:
    p = Path(value).expanduser()
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{value}: no such file")
    return p


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _placement_args(p: argparse.ArgumentParser) -> None:
    """``--device``/``--dtype``: one rule for every offline verb (``offline.precision``)."""
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where the model runs (auto: cuda when available)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default="auto",
        help="weights' dtype (auto: bf16 on CUDA and on CPUs with AMX, "
        "else float32); softmax and sums stay float32/float64",
    )


def _batch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--batch-size", type=_positive, default=64, help="items per forward pass (length-bucketed)"
    )
    p.add_argument(
        "--max-length",
        type=_positive,
        help="refuse items longer than this many tokens (default: the model's context length)",
    )
    _placement_args(p)


def _task_files(values: list[str], split: str) -> list[Path]:
    """``--task`` values: a JSONL path, or a task name resolved in the task cache."""
    from ...offline.tasks import tasks_dir

    out = []
    for v in values:
        p = Path(v).expanduser()
        if not p.suffix:
            p = tasks_dir() / v / f"{split}.jsonl"
        if not p.is_file():
            raise CLIError(f"{p}: no such task file (run `svd-vllm assets tasks`)")
        out.append(p)
    return out


def _decoder(args: argparse.Namespace, adapter: Path | None, vector=None):  # type: ignore[no-untyped-def]
    """Load the reference decoder on ``--device`` in ``--dtype``; a mismatched adapter or an
    unavailable device becomes a clear error."""
    from ...offline.reference import ReferenceDecoder

    base = args.base
    try:
        return ReferenceDecoder(base, adapter, vector=vector, device=args.device, dtype=args.dtype)
    except (RuntimeError, ValueError, OSError) as e:
        what = f"adapter {adapter} on base {base}" if adapter else f"base model {base}"
        raise CLIError(f"cannot load {what}: {str(e).splitlines()[0][:300]}") from e


def _check_adapter_tokenizer(base: Path, adapter: Path) -> None:
    """An adapter saved with its own tokenizer must match the base's vocabulary."""
    if (
        not (adapter / "tokenizer.json").exists()
        and not (adapter / "tokenizer_config.json").exists()
    ):
        return
    from transformers import AutoTokenizer

    from ...core.identity import tokenizer_fingerprint

    fb = tokenizer_fingerprint(AutoTokenizer.from_pretrained(base))
    fa = tokenizer_fingerprint(AutoTokenizer.from_pretrained(adapter))
    if fa != fb:
        raise CLIError(f"{adapter}: its tokenizer differs from the base model's ({base})")


def _model_dirs(p: argparse.ArgumentParser, *, adapter: bool | None) -> None:
    """``--base`` and ``--adapter`` (``adapter``: True required, False optional, None absent)."""
    p.add_argument(
        "--base",
        type=_existing_dir,
        required=True,
        help="base model directory (Hugging Face layout)",
    )
    if adapter is not None:
        p.add_argument(
            "--adapter",
            type=_existing_dir,
            required=adapter,
            help="PEFT adapter directory (the warm-started model)",
        )


def _task_args(p: argparse.ArgumentParser, split: str) -> None:
    """``--task``, repeatable: the data a verb reads."""
    p.add_argument(
        "--task",
        action="append",
        required=True,
        help=f"task name or JSONL file ({split}; repeatable)",
    )


def _steering_args(p: argparse.ArgumentParser) -> None:
    """The reference decoder's model, vector and strength (``generate``, ``score``)."""
    _model_dirs(p, adapter=False)
    p.add_argument("--vector", type=_existing_file, help="steering artifact (.safetensors)")
    p.add_argument("--mu", type=float, help="strength (default: from the vector)")
    p.add_argument(
        "--alpha", type=float, help="confidence-mask threshold (default: the vector's, else 0.1)"
    )
    _placement_args(p)


if TYPE_CHECKING:
    _Sub = argparse._SubParsersAction[argparse.ArgumentParser]


def _loras(specs: Sequence[str] | None) -> dict[str, Path]:
    loras = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path).is_dir():
            raise CLIError(f"--lora {spec!r}: use NAME=DIR with an existing adapter directory")
        loras[name] = Path(path)
    return loras


def _floats(value: str) -> list[float]:
    """``-0.5,0,1`` as numbers (argparse type for comma-separated lists)."""
    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: use comma-separated numbers") from None
    if not out:
        raise argparse.ArgumentTypeError("give at least one number")
    return out


def _member_arg(value: str) -> tuple[str, float | None]:
    """``NAME`` or ``NAME=SCALE`` of ``registry compose --vector``."""
    name, sep, scale = value.partition("=")
    if not sep:
        return name, None
    try:
        return name, float(scale)
    except ValueError:
        raise CLIError(f"--vector {value!r}: the scale after '=' must be a number") from None
