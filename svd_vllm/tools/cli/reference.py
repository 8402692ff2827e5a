"""Research: decoding and scoring with the reference decoder (transformers + peft)."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from ...core.choices import MODES
from .common import CLIError, _decoder, _steering_args

if TYPE_CHECKING:
    from .common import _Sub


def _cmd_generate(args: argparse.Namespace) -> int:
    from ...core import artifact

    vector = artifact.load(args.vector) if args.vector else None
    dec = _decoder(args, args.adapter, vector)
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
    from ...core import artifact

    vector = artifact.load(args.vector) if args.vector else None
    dec = _decoder(args, args.adapter, vector)
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


def _add_reference(sub: _Sub) -> None:
    """Decoding and scoring with the reference decoder (transformers + peft)."""
    g = sub.add_parser("generate", help="decode with the reference decoder (transformers + peft)")
    _steering_args(g)
    g.add_argument(
        "--mode",
        choices=(*MODES, "all"),
        default="svd-precomputed",
        help="what steers the adapter's logits (all: every mode, side by side)",
    )
    g.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    g.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k best (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    g.add_argument("--seed", type=int, help="sampling seed")
    g.add_argument("--json", action="store_true", help="print JSON")
    g.set_defaults(func=_cmd_generate)

    s = sub.add_parser("score", help="teacher-forced log-likelihood of options")
    _steering_args(s)
    s.add_argument(
        "--mode", choices=MODES, default="svd-precomputed", help="what steers the adapter's logits"
    )
    s.add_argument("--prompt", required=True, help="the context the options continue")
    s.add_argument("--option", action="append", required=True, help="continuation (repeatable)")
    s.add_argument(
        "--scoring",
        choices=("soft", "filtered"),
        default="soft",
        help="soft: the steered softmax; filtered: -inf outside the mask too",
    )
    s.set_defaults(func=_cmd_score)
