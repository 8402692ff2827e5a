"""Scoring methods on task items with the reference decoder, and honest statistics.

For every item the base and adapter logits of every option are computed ONCE; each method
(``base``, ``peft``, ``peft+svd-exact``, ``peft+svd-precomputed``, ``peft+logit-bias``) is a
transformation of those logits, so methods are compared on identical forward passes. Items run
``batch_size`` at a time (all their options in one right-padded pass per model), and the float32
scoring runs on chunks of completion tokens, as in ``extraction``.

Metrics (stated in every table):
* commonsense ``acc``: the option with the highest token-length-normalised log-likelihood
  (mean log-prob per token) must be the gold one; ``acc_sum`` uses the raw sum.
* TruthfulQA ``mc1``: the best answer has the highest summed log-likelihood among best +
  false answers; ``mc2``: probability mass (from summed log-likelihoods) on true answers.
* ``gen``: greedy generation (decoding mode, filtered mask) starts with the gold answer text.
Multiple-choice scoring uses "soft" steering, ``log_softmax(z + mu * I * dz)``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.choices import EVAL_METHODS
from ..core.steering import Mode, svd_logits
from .precision import TOKENS_PER_PASS, float32_chunks
from .reference import ReferenceDecoder
from .tasks import Item

__all__ = [
    "ABLATION_METHODS",
    "METHODS",
    "MethodSpec",
    "evaluate_items",
    "format_ci",
    "paired_bootstrap",
    "task_summary",
]

METHODS = EVAL_METHODS
#: What SVD's gain is made of: its confidence mask alone (the vector zeroed, the same alpha and
#: soft scoring, so multiple choice equals PEFT by construction) and vLLM's ``min_p = alpha``
#: filter (the same mask, filtered: options with a token outside it score ``-inf``). Greedy
#: generation keeps the argmax under both, so ``gen`` equals PEFT's.
ABLATION_METHODS = ("peft+svd-mask", "peft+min-p")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    mode: Mode  # steering.svd_logits mode
    mu: float = 0.0
    alpha: float = 0.1
    shift: torch.Tensor | None = None
    filtered: bool = False  # multiple choice: tokens outside the mask score -inf (a sampler filter)


def method_specs(vector: Any | None, *, include: Sequence[str] = METHODS) -> list[MethodSpec]:
    """Method specs from a steering artifact (its calibrated strengths)."""
    specs = []
    for name in include:
        if name == "base":
            specs.append(MethodSpec("base", "base"))
        elif name == "peft":
            specs.append(MethodSpec("peft", "adapter"))
        else:
            if vector is None:
                continue
            m = vector.meta
            if name == "peft+svd-exact":
                specs.append(MethodSpec(name, "svd-exact", float(m.mu_bar_exact or 0.0), m.alpha))
            elif name == "peft+svd-precomputed":
                specs.append(MethodSpec(name, "svd-precomputed", m.mu_bar, m.alpha, vector.shift))
            elif name == "peft+logit-bias":
                beta = float(m.calibration.estimators.get("logit_bias_beta", 0.0))
                specs.append(MethodSpec(name, "logit-bias", beta, m.alpha, vector.shift))
            elif name in ABLATION_METHODS:
                zero = torch.zeros_like(vector.shift)
                filtered = name == "peft+min-p"
                specs.append(MethodSpec(name, "svd-precomputed", m.mu_bar, m.alpha, zero, filtered))
            else:
                raise ValueError(f"unknown method {name!r}")
    return specs


@dataclass(frozen=True)
class _Pairs:
    """The distinct (prompt, option) continuations of a batch of items, tokenised."""

    keys: list[tuple[str, str]]
    seqs: list[list[int]]
    starts: list[int]

    @classmethod
    def of(cls, dec: ReferenceDecoder, items: Sequence[Item], max_length: int | None) -> _Pairs:
        keys = list(
            dict.fromkeys(
                (o.get("prompt") or it.prompt, o["text"])
                for it in items
                for o in [*it.options, *(it.options_mc2 or [])]
            )
        )
        limit = max_length or dec.max_length
        seqs, starts = [], []
        for prompt, text in keys:
            ctx, cont = dec.continuation_ids(prompt, text)
            if limit is not None and len(ctx) + len(cont) > limit:
                raise ValueError(
                    f"an option of prompt {prompt[:40]!r} is {len(ctx) + len(cont)} tokens, over "
                    f"the maximum length {limit}; raise --max-length or shorten the item"
                )
            seqs.append(ctx + cont)
            starts.append(len(ctx))
        return cls(keys, seqs, starts)

    def tokens(self) -> int:
        return sum(len(x) for x in self.seqs)

    def merged(self, other: _Pairs) -> _Pairs:
        have = set(self.keys)
        keep = [i for i, k in enumerate(other.keys) if k not in have]
        return _Pairs(
            self.keys + [other.keys[i] for i in keep],
            self.seqs + [other.seqs[i] for i in keep],
            self.starts + [other.starts[i] for i in keep],
        )


def _groups(
    dec: ReferenceDecoder, items: Sequence[Item], batch_size: int, max_length: int | None
) -> list[tuple[list[Item], _Pairs]]:
    """Consecutive items per forward pass: at most ``batch_size`` items and, past the first,
    at most ``TOKENS_PER_PASS`` padded tokens. Every option is tokenised (and checked) first."""
    groups: list[tuple[list[Item], _Pairs]] = []
    for item in items:
        pairs = _Pairs.of(dec, [item], max_length)
        if groups and len(groups[-1][0]) < batch_size:
            joined = groups[-1][1].merged(pairs)
            if len(joined.seqs) * max(len(q) for q in joined.seqs) <= TOKENS_PER_PASS:
                groups[-1] = ([*groups[-1][0], item], joined)
                continue
        groups.append(([item], pairs))
    return groups


def _pair_logprobs(
    dec: ReferenceDecoder, pairs: _Pairs, specs: Sequence[MethodSpec]
) -> dict[str, dict[tuple[str, str], tuple[float, int]]]:
    """Per method, per continuation: (summed log-prob, token count), from one pass per model."""
    modes = {s.mode for s in specs}
    need_base = bool(modes & {"base", "svd-exact"})
    need_adapter = bool(modes - {"base"})
    if need_adapter and dec.adapter_dir is None:
        raise ValueError("these methods need an adapter")
    z_a = dec.teacher_forced(pairs.seqs, pairs.starts, adapter=True) if need_adapter else None
    z_b = dec.teacher_forced(pairs.seqs, pairs.starts, adapter=False) if need_base else None
    counts = [len(q) - st for q, st in zip(pairs.seqs, pairs.starts, strict=True)]
    labels = torch.tensor(
        [t for q, st in zip(pairs.seqs, pairs.starts, strict=True) for t in q[st:]],
        device=dec.device,
    )
    owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(dec.device)
    out: dict[str, dict[tuple[str, str], tuple[float, int]]] = {}
    for spec in specs:
        shift = spec.shift.to(dec.device) if spec.shift is not None else None
        lp = torch.empty(len(labels), dtype=torch.float64, device=dec.device)
        for c in float32_chunks(len(labels), dec.vocab_size):
            zb = z_b[c].float() if z_b is not None else None
            if spec.mode == "base":
                assert zb is not None
                z = zb
            else:
                assert z_a is not None
                z = svd_logits(
                    spec.mode,
                    z_a[c].float(),
                    z_base=zb,
                    shift=shift,
                    mu=spec.mu,
                    alpha=spec.alpha,
                    filtered=spec.filtered,
                )
            lab = labels[c].unsqueeze(-1)
            lp[c] = torch.log_softmax(z, dim=-1).gather(-1, lab).squeeze(-1).double()
        sums = torch.zeros(len(counts), dtype=torch.float64, device=dec.device)
        sums.index_add_(0, owner, lp)
        out[spec.name] = {
            k: (float(v), n) for k, v, n in zip(pairs.keys, sums.tolist(), counts, strict=True)
        }
    return out


def _option_scores(
    per: dict[tuple[str, str], tuple[float, int]], item: Item, options: list[dict[str, Any]]
) -> tuple[np.ndarray, np.ndarray]:
    vals = [per[(o.get("prompt") or item.prompt, o["text"])] for o in options]
    return np.array([v[0] for v in vals]), np.array([v[1] for v in vals])


def _picks_gold(scores: np.ndarray, gold: int) -> float:
    """1.0 if the gold option scores highest (the first of equal scores wins, as argmax does);
    an option the method gives probability 0 (``-inf``, a filtered sampler) is never right."""
    return float(bool(np.isfinite(scores[gold])) and int(np.argmax(scores)) == gold)


def _true_mass(log_likelihoods: np.ndarray, true: np.ndarray) -> float:
    """MC2: the probability mass on the true answers (0 when every answer has probability 0)."""
    top = log_likelihoods.max()
    if not np.isfinite(top):
        return 0.0
    w = np.exp(log_likelihoods - top)
    return float(w[true].sum() / w.sum())


_NORM = re.compile(r"[^a-z0-9 ]+")


def _norm(text: str) -> str:
    return " ".join(_NORM.sub(" ", text.lower()).split())


def generation_choice(text: str, options: list[dict[str, Any]]) -> int | None:
    """The option a generation starts with (the longest matching option wins), or None when it
    starts with none of them (such an answer is scored wrong)."""
    g = _norm(text)
    matches = [
        i for i, o in enumerate(options) if _norm(o["text"]) and g.startswith(_norm(o["text"]))
    ]
    return max(matches, key=lambda i: len(_norm(options[i]["text"])), default=None)


def generation_correct(text: str, options: list[dict[str, Any]], gold: int) -> bool:
    """The generation starts with the gold option (see ``generation_choice``)."""
    return generation_choice(text, options) == gold


def max_new_tokens(dec: ReferenceDecoder, item: Item) -> int:
    """Enough tokens to spell the longest option, plus one."""
    return 1 + max(len(dec.continuation_ids(item.prompt, o["text"])[1]) for o in item.options)


def evaluate_items(
    dec: ReferenceDecoder,
    items: Sequence[Item],
    specs: Sequence[MethodSpec],
    *,
    generation: bool = False,
    gen_limit: int | None = None,
    progress: bool = True,
    desc: str = "eval",
    batch_size: int = 8,
    max_length: int | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Per method, per metric, one score per item (aligned across methods for pairing).

    ``batch_size`` items share a forward pass; ``max_length`` (default: the model's context)
    bounds each option's tokens.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    size = 1 if dec.is_prompt_learning else batch_size
    batches = _groups(dec, items, size, max_length)
    scores: dict[str, dict[str, list[float]]] = {s.name: {} for s in specs}
    t0 = time.time()
    bar = tqdm(
        total=sum(p.tokens() for _, p in batches),
        desc=desc,
        unit="tok",
        unit_scale=True,
        disable=not progress,
    )
    n = 0
    for group, pairs in batches:
        per_method = _pair_logprobs(dec, pairs, specs)
        for item in group:
            for s in specs:
                per = per_method[s.name]
                sums, counts = _option_scores(per, item, item.options)
                m = scores[s.name]
                if item.options_mc2 is None:
                    m.setdefault("acc", []).append(_picks_gold(sums / counts, item.gold))
                    m.setdefault("acc_sum", []).append(_picks_gold(sums, item.gold))
                else:
                    m.setdefault("mc1", []).append(_picks_gold(sums, item.gold))
                    s2, _ = _option_scores(per, item, item.options_mc2)
                    true = np.array([o["correct"] for o in item.options_mc2], dtype=bool)
                    m.setdefault("mc2", []).append(_true_mass(s2, true))
                if generation and (gen_limit is None or n < gen_limit):
                    res = dec.generate(
                        item.prompt,
                        s.mode,
                        mu=None if s.mode in ("base", "adapter") else s.mu,
                        alpha=None if s.mode in ("base", "adapter") else s.alpha,
                        max_new_tokens=max_new_tokens(dec, item),
                        shift=s.shift,
                    )
                    m.setdefault("gen", []).append(
                        float(generation_correct(res.text, item.options, item.gold))
                    )
            n += 1
        bar.update(pairs.tokens())
    bar.close()
    for s in specs:
        scores[s.name]["_seconds"] = [time.time() - t0]
    return scores


def format_ci(d: dict[str, float] | None) -> str:
    """A paired difference with its CI, in points: ``+1.0 [+0.1, +2.0]`` (``—`` if absent)."""
    if not d:
        return "—"
    return f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    reps: int = 5000,
    seed: int = 0,
) -> dict[str, float]:
    """Mean of ``a - b`` over items with a 95% percentile bootstrap CI (items resampled)."""
    x = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if x.size == 0:
        return {"diff": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(reps, x.size))
    boot = x[idx].mean(axis=1)
    return {
        "diff": float(x.mean()),
        "lo": float(np.quantile(boot, 0.025)),
        "hi": float(np.quantile(boot, 0.975)),
        "n": int(x.size),
    }


def average_gain_ci(
    per_task: dict[str, tuple[np.ndarray, np.ndarray]], *, reps: int = 5000, seed: int = 0
) -> dict[str, float]:
    """Average over tasks of the per-task mean paired difference, with a bootstrap CI that
    resamples items within each task independently."""
    rng = np.random.default_rng(seed)
    diffs = {t: np.asarray(a, float) - np.asarray(b, float) for t, (a, b) in per_task.items()}
    point = float(np.mean([d.mean() for d in diffs.values()]))
    boot = np.zeros(reps)
    for d in diffs.values():
        boot += d[rng.integers(0, d.size, size=(reps, d.size))].mean(axis=1)
    boot /= len(diffs)
    return {
        "diff": point,
        "lo": float(np.quantile(boot, 0.025)),
        "hi": float(np.quantile(boot, 0.975)),
        "n": int(sum(d.size for d in diffs.values())),
        "tasks": len(diffs),
    }


def task_summary(
    scores: dict[str, dict[str, list[float]]], reference: str = "peft"
) -> dict[str, Any]:
    """Accuracy per method and metric, and the paired difference to ``reference`` with CI."""
    out: dict[str, Any] = {}
    for method, metrics in scores.items():
        out[method] = {}
        for metric, vals in metrics.items():
            if metric.startswith("_"):
                continue
            entry: dict[str, Any] = {
                "n": len(vals),
                "score": float(np.mean(vals)) if vals else math.nan,
            }
            if method != reference and reference in scores and metric in scores[reference]:
                entry["vs_" + reference] = paired_bootstrap(vals, scores[reference][metric])
            out[method][metric] = entry
    return out
