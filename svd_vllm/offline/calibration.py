"""Strength calibration: every estimator of the spec, on compact calibration statistics.

The calibration loss is the mean NLL of the labels under the steered distribution
``log_softmax(z + mu * I * dz)`` ("soft" scoring). It depends on a position only through
the masked-in logits and their ``dz`` (a handful of tokens when alpha = 0.1), the
log-sum-exp of the masked-out logits (one number) and the label's entries, so
``PositionStats`` keeps just those: the exact loss for ANY ``mu`` without V x T matrices.
The loss is convex in ``mu`` (log-sum-exp of affine functions minus a linear term), so
the line search is a safe bisection on its derivative.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..core.steering import GN_EPS, aggregate_mu, gauss_newton_terms, pooled_mu

__all__ = [
    "ESTIMATORS",
    "DirectionStats",
    "EstimatorResult",
    "PositionStats",
    "bootstrap_ci",
    "calibrate",
    "line_search_mu",
]

#: Estimators of one scalar strength, in the order they are reported.
ESTIMATORS: tuple[str, ...] = ("mean", "pooled", "median", "trimmed", "line_search")


@dataclass
class PositionStats:
    """Per-position sufficient statistics of the soft calibration loss (padded to K)."""

    z_in: torch.Tensor  # [T, K] masked-in logits (-inf padding)
    d_in: torch.Tensor  # [T, K] dz on masked-in tokens (0 padding)
    lse_out: torch.Tensor  # [T] logsumexp of masked-out finite logits (-inf if none)
    label_z: torch.Tensor  # [T] label logit
    label_d: torch.Tensor  # [T] I*dz at the label (0 if the label is masked out)

    @classmethod
    def from_logits(
        cls, z: torch.Tensor, dz: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> PositionStats:
        z = z.float()
        k = max(int(mask.sum(-1).max()) if mask.numel() else 0, 1)
        big = torch.where(mask, z, torch.full_like(z, -math.inf))
        z_in, idx = big.topk(k, dim=-1)
        valid = torch.isfinite(z_in)
        d_in = torch.where(valid, dz.float().gather(-1, idx), torch.zeros_like(z_in))
        out = torch.where(mask, torch.full_like(z, -math.inf), z)
        lse_out = torch.logsumexp(out, dim=-1)
        lab = labels.unsqueeze(-1)
        label_z = z.gather(-1, lab).squeeze(-1)
        label_d = torch.where(mask.gather(-1, lab), dz.float().gather(-1, lab), 0.0).squeeze(-1)
        return cls(z_in, d_in, lse_out, label_z, label_d)

    @staticmethod
    def cat(parts: Sequence[PositionStats]) -> PositionStats:
        k = max(p.z_in.shape[1] for p in parts)

        def pad(x: torch.Tensor, value: float) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, k - x.shape[1]), value=value)

        return PositionStats(
            torch.cat([pad(p.z_in, -math.inf) for p in parts]),
            torch.cat([pad(p.d_in, 0.0) for p in parts]),
            torch.cat([p.lse_out for p in parts]),
            torch.cat([p.label_z for p in parts]),
            torch.cat([p.label_d for p in parts]),
        )

    def select(self, rows: torch.Tensor) -> PositionStats:
        return PositionStats(
            self.z_in[rows], self.d_in[rows], self.lse_out[rows], self.label_z[rows],
            self.label_d[rows],
        )  # fmt: skip

    def nll(self, mu: float) -> torch.Tensor:
        """Per-position NLL of the label under ``log_softmax(z + mu * I * dz)`` (float64)."""
        steered = self.z_in.double() + mu * self.d_in.double()
        lse = torch.logsumexp(torch.cat([steered, self.lse_out.double()[:, None]], dim=-1), -1)
        return lse - (self.label_z.double() + mu * self.label_d.double())

    def nll_grad(self, mu: float) -> float:
        """d/dmu of the mean NLL: E_steered[dz] - dz[label], averaged over positions."""
        steered = self.z_in.double() + mu * self.d_in.double()
        allz = torch.cat([steered, self.lse_out.double()[:, None]], dim=-1)
        w = torch.softmax(allz, dim=-1)[:, :-1]
        w = torch.nan_to_num(w, nan=0.0)
        return float(((w * self.d_in.double()).sum(-1) - self.label_d.double()).mean())


def line_search_mu(stats: PositionStats, bound: float = 1e4, tol: float = 1e-6) -> float:
    """The exact minimiser of the mean soft NLL over one scalar mu (convex: bisection)."""
    if stats.label_z.numel() == 0:
        return 0.0
    g0 = stats.nll_grad(0.0)
    if not math.isfinite(g0) or g0 == 0.0:
        return 0.0
    # Walk downhill until the derivative changes sign.
    direction = -1.0 if g0 > 0 else 1.0
    lo, hi = 0.0, direction
    while stats.nll_grad(hi) * g0 > 0:
        lo, hi = hi, hi * 2.0
        if abs(hi) > bound:
            return float(math.copysign(bound, direction))
    a, b = sorted((lo, hi))
    for _ in range(200):
        mid = 0.5 * (a + b)
        gm = stats.nll_grad(mid)
        if gm > 0:
            b = mid
        else:
            a = mid
        if b - a <= tol * max(1.0, abs(mid)):
            break
    return 0.5 * (a + b)


@dataclass
class DirectionStats:
    """Everything calibration needs about one steering direction, built incrementally."""

    num: list[torch.Tensor] = field(default_factory=list)
    den: list[torch.Tensor] = field(default_factory=list)
    item: list[torch.Tensor] = field(default_factory=list)
    positions: list[PositionStats] = field(default_factory=list)

    def add(
        self,
        item_index: int,
        z: torch.Tensor,
        dz: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor,
    ) -> None:
        n, d = gauss_newton_terms(z, dz, labels, mask)
        self.num.append(n.double().cpu())
        self.den.append(d.double().cpu())
        self.item.append(torch.full((n.shape[0],), item_index, dtype=torch.long))
        self.positions.append(PositionStats.from_logits(z, dz, mask, labels))

    def frozen(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PositionStats]:
        if not self.num:
            raise ValueError("no calibration positions were added")
        return (
            torch.cat(self.num),
            torch.cat(self.den),
            torch.cat(self.item),
            PositionStats.cat(self.positions),
        )


@dataclass
class EstimatorResult:
    """Strength by every estimator, the calibration NLL of each, and the choice."""

    mu: dict[str, float]
    nll: dict[str, float]
    nll_unsteered: float
    chosen: str
    ci: tuple[float, float]
    tokens: int
    positions: int
    mu_mean: float
    mu_median: float
    mu_std: float

    @property
    def mu_bar(self) -> float:
        return self.mu[self.chosen]


def _estimate(num: torch.Tensor, den: torch.Tensor, stats: PositionStats, how: str) -> float:
    keep = den > 0
    if how == "pooled":
        return pooled_mu(num[keep], den[keep])
    if how == "line_search":
        return line_search_mu(stats)
    steps = num[keep] / (den[keep] + GN_EPS)
    return aggregate_mu(steps.float(), how)  # type: ignore[arg-type]


def bootstrap_ci(
    stat: Callable[[torch.Tensor], float],
    n_items: int,
    *,
    reps: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat(item_indices)`` over items resampled with replacement."""
    if n_items == 0 or reps <= 0:
        return (math.nan, math.nan)
    g = torch.Generator().manual_seed(seed)
    vals = torch.tensor(
        [stat(torch.randint(0, n_items, (n_items,), generator=g)) for _ in range(reps)],
        dtype=torch.float64,
    )
    lo = float(torch.quantile(vals, (1 - level) / 2))
    hi = float(torch.quantile(vals, 1 - (1 - level) / 2))
    return (lo, hi)


def calibrate(
    direction: DirectionStats,
    *,
    estimators: Sequence[str] = ESTIMATORS,
    bootstrap_reps: int = 200,
    seed: int = 0,
) -> EstimatorResult:
    """Run every estimator, score each by calibration NLL, pick the lowest, bootstrap its CI."""
    num, den, item, stats = direction.frozen()
    mus = {how: _estimate(num, den, stats, how) for how in estimators}
    mus = {k: (v if math.isfinite(v) else 0.0) for k, v in mus.items()}
    nlls = {k: float(stats.nll(v).mean()) for k, v in mus.items()}
    chosen = min(nlls, key=lambda k: (nlls[k], k != "pooled"))
    keep = den > 0
    steps = (num[keep] / (den[keep] + GN_EPS)).float()
    n_items = int(item.max()) + 1 if item.numel() else 0

    # Bootstrap over items: gather the rows of the resampled items (with multiplicity).
    rows_of = [torch.nonzero(item == i).flatten() for i in range(n_items)]

    def stat(sample: torch.Tensor) -> float:
        rows = torch.cat([rows_of[int(i)] for i in sample]) if sample.numel() else sample
        return _estimate(num[rows], den[rows], stats.select(rows), chosen)

    reps = bootstrap_reps if chosen != "line_search" else min(bootstrap_reps, 100)
    ci = bootstrap_ci(stat, n_items, reps=reps, seed=seed)
    return EstimatorResult(
        mu=mus,
        nll=nlls,
        nll_unsteered=float(stats.nll(0.0).mean()),
        chosen=chosen,
        ci=ci,
        tokens=int(num.numel()),
        positions=int(keep.sum()),
        mu_mean=float(steps.double().mean()) if steps.numel() else 0.0,
        mu_median=float(steps.double().median()) if steps.numel() else 0.0,
        mu_std=float(steps.double().std()) if steps.numel() > 1 else 0.0,
    )
