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
    "Estimator",
    "EstimatorResult",
    "PositionStats",
    "bootstrap_ci",
    "bootstrap_samples",
    "calibrate",
    "line_search_many",
    "line_search_mu",
    "percentile_ci",
]

#: An estimator of one scalar strength: ``(num, den, stats) -> mu`` from the Gauss-Newton
#: terms of the positions where ``den > 0`` and the soft-loss statistics of all positions.
Estimator = Callable[[torch.Tensor, torch.Tensor, "PositionStats"], float]


def _steps(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """Per-position Gauss-Newton steps ``num / den``."""
    return (num / (den + GN_EPS)).float()


#: Every estimator of the spec, by name, in the order they are reported (an artifact's
#: ``estimator`` field names the one calibration chose).
ESTIMATORS: dict[str, Estimator] = {
    "mean": lambda num, den, _: aggregate_mu(_steps(num, den), "mean"),
    "pooled": lambda num, den, _: pooled_mu(num, den),
    "median": lambda num, den, _: aggregate_mu(_steps(num, den), "median"),
    "trimmed": lambda num, den, _: aggregate_mu(_steps(num, den), "trimmed"),
    "line_search": lambda _num, _den, stats: line_search_mu(stats),
}


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
            self.z_in[rows],
            self.d_in[rows],
            self.lse_out[rows],
            self.label_z[rows],
            self.label_d[rows],
        )

    def nll(self, mu: float) -> torch.Tensor:
        """Per-position NLL of the label under ``log_softmax(z + mu * I * dz)`` (float64)."""
        steered = self.z_in.double() + mu * self.d_in.double()
        lse = torch.logsumexp(torch.cat([steered, self.lse_out.double()[:, None]], dim=-1), -1)
        return lse - (self.label_z.double() + mu * self.label_d.double())


def _nll_grads(
    stats: PositionStats, mu: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """d/dmu of the (weighted) mean NLL at one ``mu`` per row of ``weights`` (float64 ``[R]``).

    ``weights[r, t]`` is how often position ``t`` is counted in replicate ``r`` (a bootstrap
    resample); ``None`` is one replicate that counts every position once. Replicates are
    evaluated in chunks so ``[R, T, K]`` never exceeds ``CHUNK_ELEMENTS``.
    """
    from .precision import CHUNK_ELEMENTS

    z_in, d_in = stats.z_in.double(), stats.d_in.double()
    lse_out, label_d = stats.lse_out.double(), stats.label_d.double()
    n_pos, k = z_in.shape
    dev = z_in.device
    w = (
        torch.ones(1, n_pos, dtype=torch.float64, device=dev)
        if weights is None
        else weights.to(dev, torch.float64)
    )
    mu = mu.to(dev)
    out = torch.empty(mu.shape[0], dtype=torch.float64, device=dev)
    step = max(1, CHUNK_ELEMENTS // max(1, n_pos * (k + 1)))
    for start in range(0, mu.shape[0], step):
        m = mu[start : start + step].double()
        steered = z_in.unsqueeze(0) + m[:, None, None] * d_in.unsqueeze(0)
        allz = torch.cat([steered, lse_out.expand(m.shape[0], n_pos).unsqueeze(-1)], dim=-1)
        p = torch.nan_to_num(torch.softmax(allz, dim=-1)[..., :-1], nan=0.0)
        g = (p * d_in.unsqueeze(0)).sum(-1) - label_d  # [r, T]
        ww = w[start : start + step] if w.shape[0] > 1 else w
        out[start : start + step] = (g * ww).sum(-1) / ww.sum(-1).clamp_min(1e-300)
    return out


def line_search_many(
    stats: PositionStats,
    weights: torch.Tensor | None = None,
    bound: float = 1e4,
    tol: float = 1e-6,
) -> torch.Tensor:
    """The exact minimiser of the (weighted) mean soft NLL, one per replicate, all at once.

    The loss is convex in mu, so each replicate walks downhill from 0 by doubling until its
    derivative changes sign (capped at ``bound``), then bisects to ``tol`` relative precision.
    Vectorised over replicates: a 200-resample bootstrap costs a few dozen batched evaluations,
    on the device the statistics are on (the GPU after a GPU extraction).
    """
    n_rep = 1 if weights is None else weights.shape[0]
    dev = stats.z_in.device
    if stats.label_z.numel() == 0:
        return torch.zeros(n_rep, dtype=torch.float64, device=dev)
    g0 = _nll_grads(stats, torch.zeros(n_rep, dtype=torch.float64, device=dev), weights)
    flat = ~torch.isfinite(g0) | (g0 == 0)
    direction = torch.where(g0 > 0, -1.0, 1.0).double()
    lo = torch.zeros(n_rep, dtype=torch.float64, device=dev)
    hi = direction.clone()
    capped = torch.zeros(n_rep, dtype=torch.bool, device=dev)
    active = ~flat
    while bool(active.any()):
        downhill = (_nll_grads(stats, hi, weights) * g0 > 0) & active
        lo = torch.where(downhill, hi, lo)
        hi = torch.where(downhill, hi * 2.0, hi)
        capped |= downhill & (hi.abs() > bound)
        active = downhill & ~capped
    a, b = torch.minimum(lo, hi), torch.maximum(lo, hi)
    for _ in range(200):
        mid = 0.5 * (a + b)
        if bool(((b - a) <= tol * mid.abs().clamp_min(1.0)).all()):
            break
        up = _nll_grads(stats, mid, weights) > 0
        b = torch.where(up, mid, b)
        a = torch.where(up, a, mid)
    mu = 0.5 * (a + b)
    mu = torch.where(capped, direction * bound, mu)
    return torch.where(flat, torch.zeros_like(mu), mu)


def line_search_mu(stats: PositionStats, bound: float = 1e4, tol: float = 1e-6) -> float:
    """The exact minimiser of the mean soft NLL over one scalar mu (convex: bisection)."""
    return float(line_search_many(stats, None, bound, tol)[0])


@dataclass
class DirectionStats:
    """Everything calibration needs about one steering direction, built incrementally."""

    num: list[torch.Tensor] = field(default_factory=list)
    den: list[torch.Tensor] = field(default_factory=list)
    item: list[torch.Tensor] = field(default_factory=list)
    positions: list[PositionStats] = field(default_factory=list)

    def add(
        self,
        item_index: int | torch.Tensor,
        z: torch.Tensor,
        dz: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor,
    ) -> None:
        """Add positions of one item (``item_index`` an int) or of several (one index per row).

        The statistics stay on the logits' device (no host sync per call), and calibration
        runs there too: its bootstrap is the costly part, and a GPU does it in well under a second.
        """
        n, d = gauss_newton_terms(z, dz, labels, mask)
        self.num.append(n.double())
        self.den.append(d.double())
        if isinstance(item_index, torch.Tensor):
            self.item.append(item_index.to(torch.long).reshape(n.shape[0]))
        else:
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
    return ESTIMATORS[how](num[keep], den[keep], stats)


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
    samples = bootstrap_samples(n_items, reps, seed)
    vals = torch.tensor([stat(x) for x in samples], dtype=torch.float64)
    return percentile_ci(vals, level)


def bootstrap_samples(n_items: int, reps: int, seed: int) -> list[torch.Tensor]:
    """The item indices of each resample (with replacement), seeded."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, n_items, (n_items,), generator=g) for _ in range(reps)]


def percentile_ci(vals: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    vals = vals.double()
    lo = float(torch.quantile(vals, (1 - level) / 2))
    hi = float(torch.quantile(vals, 1 - (1 - level) / 2))
    return (lo, hi)


def calibrate(
    direction: DirectionStats,
    *,
    estimators: Sequence[str] = tuple(ESTIMATORS),
    bootstrap_reps: int = 200,
    seed: int = 0,
) -> EstimatorResult:
    """Run every estimator, score each by calibration NLL, pick the lowest, bootstrap its CI."""
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if unknown or not estimators:
        raise ValueError(f"unknown estimators {unknown}; use some of {', '.join(ESTIMATORS)}")
    num, den, item, stats = direction.frozen()
    mus = {how: _estimate(num, den, stats, how) for how in estimators}
    mus = {k: (v if math.isfinite(v) else 0.0) for k, v in mus.items()}
    nlls = {k: float(stats.nll(v).mean()) for k, v in mus.items()}
    chosen = min(nlls, key=lambda k: (nlls[k], k != "pooled"))
    keep = den > 0
    steps = _steps(num[keep], den[keep])
    n_items = int(item.max()) + 1 if item.numel() else 0

    if chosen == "line_search" and n_items > 0 and bootstrap_reps > 0:
        # All resamples at once: position weights = how often its item was drawn.
        samples = torch.stack(bootstrap_samples(n_items, bootstrap_reps, seed))
        counts = torch.stack([torch.bincount(x, minlength=n_items) for x in samples])
        ci = percentile_ci(line_search_many(stats, counts.to(item.device)[:, item].double()))
    else:
        # The other estimators need only num/den: resample rows on the CPU (small vectors).
        num_c, den_c, item_c = num.cpu(), den.cpu(), item.cpu()
        rows_of = [torch.nonzero(item_c == i).flatten() for i in range(n_items)]

        def stat(sample: torch.Tensor) -> float:
            rows = torch.cat([rows_of[int(i)] for i in sample]) if sample.numel() else sample
            return _estimate(num_c[rows], den_c[rows], stats, chosen)

        ci = bootstrap_ci(stat, n_items, reps=bootstrap_reps, seed=seed)
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
