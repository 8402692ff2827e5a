"""Offline extraction: the precomputed steering vector and its calibrated strengths.

Two streaming passes over the calibration split, teacher-forced on the gold completion:

1. base + adapter: accumulate ``r = log p_phi - log p_theta`` into the two shift variants
   (probability-weighted and plain mean, float64 running sums of length V) and gather the
   exact-SVD calibration statistics;
2. adapter only: calibration statistics of ``dz`` built from each shift variant, and of the
   plain logit-bias baseline.

Memory is O(V) for the sums plus a few numbers per calibration token (no V x T matrix).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core.artifact import CalibrationStats, SteeringArtifact
from ..core.identity import model_identity, tokenizer_fingerprint
from ..core.steering import confidence_mask, exact_delta, log_ratio, precomputed_delta
from .calibration import DirectionStats, EstimatorResult, calibrate
from .reference import ReferenceDecoder

__all__ = ["CalibrationItem", "ExtractionReport", "ShiftAccumulator", "extract_vector"]

SHIFT_VARIANTS: tuple[str, ...] = ("prob", "mean")


@dataclass(frozen=True)
class CalibrationItem:
    """One teacher-forced calibration example: the prompt and its gold completion."""

    prompt: str
    completion: str


class ShiftAccumulator:
    """Running sums for ``s = sum_t w_t * r_t / sum_t w_t`` with ``w_t = p_phi,t`` or 1."""

    def __init__(self, vocab_size: int) -> None:
        self.sum_pr = torch.zeros(vocab_size, dtype=torch.float64)
        self.sum_p = torch.zeros(vocab_size, dtype=torch.float64)
        self.sum_r = torch.zeros(vocab_size, dtype=torch.float64)
        self.count = 0

    def add(self, r: torch.Tensor, p: torch.Tensor) -> None:
        """Add rows of ``r`` (float32 ``[T, V]``) with the adapter's probabilities ``p``."""
        if not torch.isfinite(r).all():
            raise ValueError("non-finite log-ratio in calibration data")
        self.sum_pr += (p.double() * r.double()).sum(0)
        self.sum_p += p.double().sum(0)
        self.sum_r += r.double().sum(0)
        self.count += r.shape[0]

    def shift(self, variant: str) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no calibration tokens were accumulated")
        if variant == "mean":
            s = self.sum_r / self.count
        elif variant == "prob":
            # Tokens the adapter never gave mass to get 0: they cannot be steered anyway.
            s = torch.where(self.sum_p > 0, self.sum_pr / self.sum_p.clamp_min(1e-300), 0.0)
        else:
            raise ValueError(f"unknown shift variant {variant!r}; use prob or mean")
        return s.float()


@dataclass
class ExtractionReport:
    """All calibration results: per direction (exact, each shift, logit-bias)."""

    results: dict[str, EstimatorResult]
    default_shift: str
    items: int
    tokens: int
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "default_shift": self.default_shift,
            "items": self.items,
            "tokens": self.tokens,
            "directions": {
                k: {
                    "mu": v.mu,
                    "nll": v.nll,
                    "nll_unsteered": v.nll_unsteered,
                    "chosen": v.chosen,
                    "mu_bar": v.mu_bar,
                    "ci95": list(v.ci),
                }
                for k, v in self.results.items()
            },
        }


def _item_tensors(
    dec: ReferenceDecoder, item: CalibrationItem
) -> tuple[list[int], int, torch.Tensor]:
    ctx, cont = dec.continuation_ids(item.prompt, item.completion)
    return ctx + cont, len(ctx), torch.tensor(cont, dtype=torch.long)


def extract_vector(
    dec: ReferenceDecoder,
    items: Sequence[CalibrationItem] | Iterable[CalibrationItem],
    *,
    name: str,
    alpha: float = 0.1,
    base_model: str | None = None,
    adapter: str | None = None,
    bootstrap_reps: int = 200,
    seed: int = 0,
    progress: bool = True,
) -> tuple[SteeringArtifact, ExtractionReport]:
    """Estimate the shift and every strength on ``items``; return the default artifact."""
    if dec.adapter_dir is None:
        raise ValueError("extraction needs an adapter (warm-started model)")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    items = list(items)
    if not items:
        raise ValueError("the calibration split is empty")
    encoded = [_item_tensors(dec, it) for it in items]
    acc = ShiftAccumulator(dec.vocab_size)
    exact = DirectionStats()
    total = sum(len(lab) for _, _, lab in encoded)

    bar = tqdm(total=2 * total, desc="extract", unit="tok", disable=not progress)
    for i, (ids, n_ctx, labels) in enumerate(encoded):
        z_a, z_b = dec.logits(ids)
        assert z_a is not None  # extract_vector refused a decoder without an adapter
        sl = slice(n_ctx - 1, len(ids) - 1)
        za, zb = z_a[sl], z_b[sl]
        if not (torch.isfinite(za).all() and torch.isfinite(zb).all()):
            raise ValueError(f"calibration item {i}: the model produced non-finite logits")
        r = log_ratio(za, zb)
        acc.add(r, torch.softmax(za, -1))
        mask = confidence_mask(za, alpha)
        exact.add(i, za, exact_delta(za, zb), labels, mask)
        bar.update(len(labels))

    shifts = {v: acc.shift(v) for v in SHIFT_VARIANTS}
    pre = {v: DirectionStats() for v in SHIFT_VARIANTS}
    bias = {v: DirectionStats() for v in SHIFT_VARIANTS}
    for i, (ids, n_ctx, labels) in enumerate(encoded):
        z_a = dec.adapter_logits(ids)
        za = z_a[n_ctx - 1 : len(ids) - 1]
        mask = confidence_mask(za, alpha)
        for v, s in shifts.items():
            pre[v].add(i, za, precomputed_delta(za, s), labels, mask)
            bias[v].add(i, za, s.expand_as(za), labels, mask)
        bar.update(len(labels))
    bar.close()

    results: dict[str, EstimatorResult] = {
        "exact": calibrate(exact, bootstrap_reps=bootstrap_reps, seed=seed)
    }
    for v in SHIFT_VARIANTS:
        results[f"precomputed-{v}"] = calibrate(pre[v], bootstrap_reps=bootstrap_reps, seed=seed)
        # The logit-bias baseline: only the line search is meaningful (see the spec).
        results[f"logit-bias-{v}"] = calibrate(
            bias[v], estimators=("line_search",), bootstrap_reps=0, seed=seed
        )
    default = min(
        SHIFT_VARIANTS,
        key=lambda v: results[f"precomputed-{v}"].nll[results[f"precomputed-{v}"].chosen],
    )
    chosen = results[f"precomputed-{default}"]
    ex = results["exact"]
    estimators = {f"precomputed_{k}": x for k, x in chosen.mu.items()}
    estimators.update({f"exact_{k}": x for k, x in ex.mu.items()})
    estimators["logit_bias_beta"] = results[f"logit-bias-{default}"].mu_bar
    estimators["mu_bar_ci_low"], estimators["mu_bar_ci_high"] = (
        (chosen.ci[0], chosen.ci[1]) if all(math.isfinite(c) for c in chosen.ci) else (0.0, 0.0)
    )
    nll = {f"precomputed_{k}": x for k, x in chosen.nll.items()}
    nll.update({f"exact_{k}": x for k, x in ex.nll.items()})
    nll["unsteered"] = chosen.nll_unsteered
    nll["logit_bias"] = results[f"logit-bias-{default}"].nll["line_search"]
    stats = CalibrationStats(
        items=len(items),
        tokens=total,
        positions=chosen.positions,
        mu_mean=chosen.mu_mean,
        mu_median=chosen.mu_median,
        mu_std=chosen.mu_std,
        estimators=estimators,
        nll=nll,
    )
    art = SteeringArtifact.create(
        shifts[default],
        name=name,
        base_model=base_model or model_identity(dec.base_dir),
        adapter=adapter or model_identity(dec.adapter_dir),
        vocab_size=dec.vocab_size,
        tokenizer_fingerprint=tokenizer_fingerprint(dec.tokenizer),
        mu_bar=chosen.mu_bar,
        mu_bar_exact=ex.mu_bar,
        alpha=alpha,
        shift_weighting=default,
        estimator=chosen.chosen,
        calibration=stats,
    )
    report = ExtractionReport(
        results=results, default_shift=default, items=len(items), tokens=total
    )
    return art, report
