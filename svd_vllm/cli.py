"""The ``svd-vllm`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .steering import MODES

__all__ = ["main"]


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


def _cmd_generate(args: argparse.Namespace) -> int:
    from . import artifact
    from .reference import ReferenceDecoder

    vector = artifact.load(args.vector) if args.vector else None
    dec = ReferenceDecoder(args.base, args.adapter, vector=vector)
    modes = MODES[:4] if args.mode == "all" else (args.mode,)
    if args.mode == "all":
        modes = tuple(m for m in modes if m != "svd-precomputed" or vector is not None)
    prompts = args.prompt
    rows = []
    for prompt in prompts:
        for mode in modes:
            try:
                res = dec.generate(
                    prompt,
                    mode,
                    mu=args.mu,
                    alpha=args.alpha,
                    max_new_tokens=args.max_tokens,
                    temperature=args.temperature,
                    top_k=args.top_k,
                    top_p=args.top_p,
                    seed=args.seed,
                )
            except ValueError as e:
                raise CLIError(str(e)) from e
            rows.append(
                {
                    "prompt": prompt,
                    "mode": mode,
                    "mu": res.mu,
                    "alpha": res.alpha,
                    "text": res.text,
                    "token_ids": res.token_ids,
                }
            )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            strength = "" if r["mu"] is None else f" (mu={r['mu']:+.4g}, alpha={r['alpha']:g})"
            print(f"[{r['mode']}{strength}] {r['prompt']!r} -> {r['text']!r}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from . import artifact
    from .reference import ReferenceDecoder

    vector = artifact.load(args.vector) if args.vector else None
    dec = ReferenceDecoder(args.base, args.adapter, vector=vector)
    try:
        scores = dec.score(
            args.prompt, args.option, args.mode, mu=args.mu, alpha=args.alpha, scoring=args.scoring
        )
    except ValueError as e:
        raise CLIError(str(e)) from e
    rows = [
        {"option": o, "logprob": s.logprob, "n_tokens": s.n_tokens, "mean_logprob": s.mean_logprob}
        for o, s in zip(args.option, scores, strict=True)
    ]
    print(json.dumps(rows, indent=2))
    return 0


def _cmd_vector_show(args: argparse.Namespace) -> int:
    from . import artifact

    art = artifact.load(args.file, expected_vocab_size=args.vocab_size)
    info = art.meta.model_dump(mode="json")
    info["shift_norm"] = float(art.shift.norm())
    print(json.dumps(info, indent=2))
    return 0


def _cmd_tiny(args: argparse.Namespace) -> int:
    from .tiny import build_tiny_lora, build_tiny_model

    out = Path(args.out)
    build_tiny_model(out / "base", seed=args.seed)
    build_tiny_lora(out / "base", out / "lora", seed=args.seed + 1)
    print(f"tiny base model: {out / 'base'}\ntiny LoRA adapter: {out / 'lora'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.workdir) if args.workdir else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="svd-vllm",
        description="Steering Vector Decoding (Hu et al., NeurIPS 2025) for vLLM LoRA serving.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--base", type=_existing_dir, required=True, help="base model directory")
        p.add_argument("--adapter", type=_existing_dir, help="PEFT adapter directory")
        p.add_argument("--vector", type=_existing_file, help="steering artifact (.safetensors)")
        p.add_argument("--mu", type=float, help="strength (default: from the vector)")
        p.add_argument(
            "--alpha", type=float, help="confidence-mask threshold (default: vector or 0.1)"
        )

    g = sub.add_parser("generate", help="decode with the reference decoder (transformers + peft)")
    model_args(g)
    g.add_argument("--mode", choices=(*MODES, "all"), default="svd-precomputed")
    g.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--json", action="store_true", help="print JSON")
    g.set_defaults(func=_cmd_generate)

    s = sub.add_parser("score", help="teacher-forced log-likelihood of options")
    model_args(s)
    s.add_argument("--mode", choices=MODES, default="svd-precomputed")
    s.add_argument("--prompt", required=True)
    s.add_argument("--option", action="append", required=True, help="continuation (repeatable)")
    s.add_argument("--scoring", choices=("soft", "filtered"), default="soft")
    s.set_defaults(func=_cmd_score)

    v = sub.add_parser("vector", help="inspect steering artifacts")
    vsub = v.add_subparsers(dest="vector_command", required=True)
    vs = vsub.add_parser("show", help="validate an artifact and print its metadata")
    vs.add_argument("file")
    vs.add_argument("--vocab-size", type=int, help="also check against this vocab size")
    vs.set_defaults(func=_cmd_vector_show)

    t = sub.add_parser("tiny", help="build the tiny test model and a random LoRA")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_cmd_tiny)

    d = sub.add_parser("demo", help="run the demo (see README)")
    d.add_argument("--workdir", help="where to cache what the demo builds")
    d.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    from .artifact import ArtifactError

    try:
        return int(args.func(args) or 0)
    except (CLIError, ArtifactError) as e:
        print(f"svd-vllm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
