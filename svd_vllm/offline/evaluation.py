"""Scoring methods on task items with the reference decoder, and honest statistics.

For every item the base and adapter logits of every option are computed ONCE; each method
(``base``, ``peft``, ``peft+svd-exact``, ``peft+svd-precomputed``, ``peft+logit-bias``) is a
transformation of those logits, so methods are compared on identical forward passes.

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

from ..core.steering import Mode, svd_logits
from .reference import ReferenceDecoder
from .tasks import Item

__all__ = [
    "METHODS",
    "MethodSpec",
    "evaluate_items",
    "format_ci",
    "paired_bootstrap",
    "task_summary",
]

METHODS = ("base", "peft", "peft+svd-exact", "peft+svd-precomputed", "peft+logit-bias")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    mode: Mode  # steering.svd_logits mode
    mu: float = 0.0
    alpha: float = 0.1
    shift: torch.Tensor | None = None


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
    return specs


def _option_logprobs(
    per_option: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]], spec: MethodSpec
) -> tuple[np.ndarray, np.ndarray]:
    sums, counts = [], []
    for z_a, z_b, labels in per_option:
        if spec.mode == "base":
            z = z_b
        else:
            if z_a is None:
                raise ValueError(f"method {spec.name} needs an adapter")
            z = svd_logits(
                spec.mode, z_a, z_base=z_b, shift=spec.shift, mu=spec.mu, alpha=spec.alpha,
                filtered=False,
            )  # fmt: skip
        lp = torch.log_softmax(z, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        sums.append(float(lp.double().sum()))
        counts.append(int(labels.numel()))
    return np.array(sums), np.array(counts)


def _group_logits(dec: ReferenceDecoder, item: Item, *option_lists: list[dict[str, Any]]):  # type: ignore[no-untyped-def]
    """Per option logits for each list; options sharing a prompt share one prompt pass, and an
    option text that appears in several lists (TruthfulQA MC1 / MC2) is scored once."""
    keys = [[(o.get("prompt") or item.prompt, o["text"]) for o in opts] for opts in option_lists]
    groups: dict[str, list[str]] = {}
    for prompt, text in dict.fromkeys(k for ks in keys for k in ks):
        groups.setdefault(prompt, []).append(text)
    cache: dict[tuple[str, str], Any] = {}
    for prompt, texts in groups.items():
        for text, r in zip(texts, dec.continuation_logits(prompt, texts), strict=True):
            cache[(prompt, text)] = r
    return [[cache[k] for k in ks] for ks in keys]


_NORM = re.compile(r"[^a-z0-9 ]+")


def _norm(text: str) -> str:
    return " ".join(_NORM.sub(" ", text.lower()).split())


def generation_correct(text: str, options: list[dict[str, Any]], gold: int) -> bool:
    """The generation starts with the gold option (the longest matching option wins)."""
    g = _norm(text)
    matches = [
        i for i, o in enumerate(options) if _norm(o["text"]) and g.startswith(_norm(o["text"]))
    ]
    if not matches:
        return False
    best = max(matches, key=lambda i: len(_norm(options[i]["text"])))
    return best == gold


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
) -> dict[str, dict[str, list[float]]]:
    """Per method, per metric, one score per item (aligned across methods for pairing)."""
    scores: dict[str, dict[str, list[float]]] = {s.name: {} for s in specs}
    t0 = time.time()
    for n, item in enumerate(tqdm(items, desc=desc, unit="item", disable=not progress)):
        if item.options_mc2:
            per_opt, per_mc2 = _group_logits(dec, item, item.options, item.options_mc2)
        else:
            (per_opt,), per_mc2 = _group_logits(dec, item, item.options), None
        for s in specs:
            sums, counts = _option_logprobs(per_opt, s)
            m = scores[s.name]
            if item.options_mc2 is None:
                m.setdefault("acc", []).append(float(np.argmax(sums / counts) == item.gold))
                m.setdefault("acc_sum", []).append(float(np.argmax(sums) == item.gold))
            else:
                m.setdefault("mc1", []).append(float(np.argmax(sums) == item.gold))
                s2, _ = _option_logprobs(per_mc2, s)
                true = np.array([o["correct"] for o in item.options_mc2], dtype=bool)
                w = np.exp(s2 - s2.max())
                m.setdefault("mc2", []).append(float(w[true].sum() / w.sum()))
            if generation and (gen_limit is None or n < gen_limit):
                res = dec.generate(
                    item.prompt, s.mode,
                    mu=None if s.mode in ("base", "adapter") else s.mu,
                    alpha=None if s.mode in ("base", "adapter") else s.alpha,
                    max_new_tokens=max_new_tokens(dec, item), shift=s.shift,
                )  # fmt: skip
                m.setdefault("gen", []).append(
                    float(generation_correct(res.text, item.options, item.gold))
                )
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
