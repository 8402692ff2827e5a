"""The numerical heart of Steering Vector Decoding (Hu et al., NeurIPS 2025).

Every function works on a batch of rows (``[..., V]`` logits), computes in float32,
and returns the input dtype where it returns logits. See ``docs/method.md``:

* ``exact_delta``        -- the paper's per-step direction from adapter AND base logits.
* ``precomputed_delta``  -- the same with a per-adapter vector standing in for ``r``.
* ``confidence_mask``    -- ``p >= alpha * max p`` without a softmax.
* ``steer``              -- ``z + mu * mask * dz``, ``-inf`` outside the mask when filtered.
* ``gauss_newton_terms`` / ``gauss_newton_mu`` / ``aggregate_mu`` / ``pooled_mu`` -- strength.

Conventions that the paper leaves open (settled in ``docs/method.md``, section 3):

* Logits may already hold ``-inf`` (tokens removed by other processors). Such tokens
  have probability 0, get ``dz = 0`` and stay ``-inf``. A row whose every logit is
  ``-inf`` passes through ``steer`` unchanged and contributes nothing to calibration.
* Log-probabilities are floored at ``LOG_PROB_FLOOR`` (log of float32's smallest normal)
  before forming ``r``, so a token the base rules out gives a large but finite ratio.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from . import MATH_API
from .choices import MODES, Mode

__all__ = [*MATH_API, "GN_EPS", "LOG_PROB_FLOOR", "MODES", "Mode", "steer_table_rows_"]

#: log of float32's smallest normal number: the floor for log-probabilities in ``r``.
LOG_PROB_FLOOR: float = math.log(torch.finfo(torch.float32).tiny)
#: The damping of the Gauss-Newton step (the paper's 1e-12).
GN_EPS: float = 1e-12

Scalar = float | int
RowParam = Scalar | torch.Tensor


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _per_row(value: RowParam, like: torch.Tensor, name: str) -> torch.Tensor | float:
    """A scalar stays a float; a tensor of one value per row is shaped ``[..., 1]``."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return float(value)
        if value.shape != like.shape[:-1]:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}; expected a scalar or one value per "
                f"row {tuple(like.shape[:-1])}"
            )
        return _f32(value).to(like.device).unsqueeze(-1)
    return float(value)


def _row_probs(z32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log p, p, row_ok)`` for float32 logits; rows of all ``-inf`` give zeros, not NaN."""
    row_ok = torch.isfinite(z32).any(dim=-1, keepdim=True)
    safe = torch.where(row_ok, z32, torch.zeros_like(z32))
    logp = torch.log_softmax(safe, dim=-1)
    p = torch.where(row_ok, logp.exp(), torch.zeros_like(logp))
    return logp, p, row_ok


def log_ratio(z_adapter: torch.Tensor, z_base: torch.Tensor) -> torch.Tensor:
    """``r = log_softmax(z_adapter) - log_softmax(z_base)`` in float32, floored, finite.

    This is the quantity the precomputed vector ``shift`` averages offline.
    """
    if z_adapter.shape != z_base.shape:
        raise ValueError(
            f"adapter logits {tuple(z_adapter.shape)} and base logits "
            f"{tuple(z_base.shape)} differ in shape"
        )
    logp, _, ok_a = _row_probs(_f32(z_adapter))
    logq, _, ok_b = _row_probs(_f32(z_base))
    r = logp.clamp_min(LOG_PROB_FLOOR) - logq.clamp_min(LOG_PROB_FLOOR)
    return torch.where(ok_a & ok_b, r, torch.zeros_like(r))


def _jacobian_project(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``(diag(p) - p p^T) (-(r + 1)) == -p * (r - <p, r>)``: O(V) per row."""
    mean_r = (p * r).sum(dim=-1, keepdim=True)
    return -p * (r - mean_r)


def exact_delta(z_adapter: torch.Tensor, z_base: torch.Tensor) -> torch.Tensor:
    """The paper's logit-space steering direction per row (float32).

    ``dz = -p_phi * (r - <p_phi, r>)`` with ``r = log p_phi - log p_theta``. A positive
    multiple of ``dz`` moves the adapter toward the base; the calibrated strength is
    expected to be negative (extrapolation along the fine-tuning shift).
    """
    r = log_ratio(z_adapter, z_base)
    _, p, _ = _row_probs(_f32(z_adapter))
    return _jacobian_project(p, r)


def precomputed_delta(z_adapter: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``dz`` with a precomputed per-adapter ``shift`` standing in for ``r`` (float32).

    ``shift`` is one vector ``[V]`` for all rows or one per row (same shape as the logits).
    Only the adapter's own logits are needed, which is what a serving engine has.
    """
    if shift.shape[-1] != z_adapter.shape[-1]:
        raise ValueError(
            f"shift has vocab size {shift.shape[-1]} but the logits have {z_adapter.shape[-1]}"
        )
    if shift.dim() > 1 and shift.shape != z_adapter.shape:
        raise ValueError(
            f"shift has shape {tuple(shift.shape)}; expected [{z_adapter.shape[-1]}] or "
            f"{tuple(z_adapter.shape)}"
        )
    _, p, _ = _row_probs(_f32(z_adapter))
    return _jacobian_project(p, _f32(shift).to(p.device))


def confidence_mask(z_adapter: torch.Tensor, alpha: RowParam) -> torch.Tensor:
    """``p >= alpha * max p`` per row, as ``z >= max z + log alpha`` (no softmax).

    ``alpha`` is in [0, 1] (scalar or per row): 1 keeps the argmax and its ties, 0 keeps
    every finite token. ``-inf`` tokens and all-``-inf`` rows are never in the mask.
    """
    z32 = _f32(z_adapter)
    a = _per_row(alpha, z32, "alpha")
    if isinstance(a, float):
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {a}")
        log_a: float | torch.Tensor = math.log(a) if a > 0 else -math.inf
    else:
        if bool(((a < 0) | (a > 1) | torch.isnan(a)).any()):
            raise ValueError("every alpha must be in [0, 1]")
        log_a = torch.log(a)
    zmax = z32.amax(dim=-1, keepdim=True)
    finite = torch.isfinite(z32)
    # Where alpha == 0, zmax + log_a is -inf (or NaN for an all -inf row): the finite mask decides.
    return finite & (z32 >= zmax + log_a)


def steer(
    z_adapter: torch.Tensor,
    dz: torch.Tensor,
    mu: RowParam,
    mask: torch.Tensor,
    filtered: bool = True,
) -> torch.Tensor:
    """``z_hat = z + mu * mask * dz``; with ``filtered`` tokens outside the mask become ``-inf``.

    Computes in float32 and returns the dtype of ``z_adapter``. ``dz`` outside the mask
    is ignored (never multiplied), so it may hold anything finite or not.
    """
    if dz.shape != z_adapter.shape or mask.shape != z_adapter.shape:
        raise ValueError(
            f"logits {tuple(z_adapter.shape)}, dz {tuple(dz.shape)} and mask "
            f"{tuple(mask.shape)} must have the same shape"
        )
    z32 = _f32(z_adapter)
    m = _per_row(mu, z32, "mu")
    step = torch.where(mask, _f32(dz), torch.zeros((), dtype=torch.float32, device=z32.device))
    out = z32 + m * step
    if filtered:
        out = out.masked_fill(~mask, -math.inf)
    else:
        # Keep other processors' -inf exactly (and all -inf rows unchanged).
        out = torch.where(torch.isfinite(z32), out, z32)
    return out.to(z_adapter.dtype)


def gauss_newton_terms(
    z_adapter: torch.Tensor,
    dz: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Numerator ``<e_y - p, I*dz>`` and denominator ``||I*dz||^2`` per token (float32).

    Rows with a negative label (ignore index) or no finite logit get ``(0, 0)``.
    The per-token step is ``num / (den + GN_EPS)``; the pooled step is
    ``sum num / (sum den + T * GN_EPS)`` (the paper's Eq. 46).
    """
    z32 = _f32(z_adapter)
    _, p, row_ok = _row_probs(z32)
    mdz = torch.where(mask, _f32(dz), torch.zeros((), dtype=torch.float32, device=z32.device))
    valid = row_ok.squeeze(-1) & (labels >= 0)
    safe_labels = labels.clamp_min(0).unsqueeze(-1)
    at_label = mdz.gather(-1, safe_labels).squeeze(-1)
    num = at_label - (p * mdz).sum(dim=-1)
    den = (mdz * mdz).sum(dim=-1)
    zero = torch.zeros_like(num)
    num = torch.where(valid, num, zero)
    den = torch.where(valid, den, zero)
    return num, den


def gauss_newton_mu(
    z_adapter: torch.Tensor,
    dz: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Per-token Gauss-Newton strengths ``mu*_t`` (1-D, float32) for tokens with ``dz != 0``.

    Tokens whose masked ``dz`` is exactly zero (the adapter did not move, or the mask
    keeps a single token) carry no information and are skipped, so no inf/NaN escapes.
    """
    num, den = gauss_newton_terms(z_adapter, dz, labels, mask)
    keep = den > 0
    mu = num[keep] / (den[keep] + GN_EPS)
    return mu[torch.isfinite(mu)]


Aggregator = Literal["mean", "median", "trimmed"]


def aggregate_mu(mu_steps: torch.Tensor, how: Aggregator = "mean", trim: float = 0.1) -> float:
    """One strength from per-token steps: the paper's ``mean``, ``median`` or a ``trimmed`` mean.

    ``trim`` is the fraction cut from EACH tail. An empty input gives 0.0 (no steering).
    """
    steps = _f32(mu_steps).flatten()
    steps = steps[torch.isfinite(steps)]
    if steps.numel() == 0:
        return 0.0
    if how == "mean":
        return float(steps.double().mean())
    if how == "median":
        return float(steps.double().median())
    if how == "trimmed":
        if not 0.0 <= trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {trim}")
        srt = steps.double().sort().values
        k = math.floor(trim * srt.numel())
        kept = srt[k : srt.numel() - k] if srt.numel() - 2 * k > 0 else srt
        return float(kept.mean())
    raise ValueError(f"unknown aggregator {how!r}; use mean, median or trimmed")


def pooled_mu(num: torch.Tensor, den: torch.Tensor) -> float:
    """The pooled least-squares step over all tokens (the paper's Eq. 46)."""
    n = int(num.numel())
    if n == 0:
        return 0.0
    value = float(num.double().sum() / (den.double().sum() + n * GN_EPS))
    return value if math.isfinite(value) else 0.0


def svd_logits(
    mode: Mode,
    z_adapter: torch.Tensor,
    *,
    z_base: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    mu: RowParam = 0.0,
    alpha: RowParam = 0.1,
    filtered: bool = True,
) -> torch.Tensor:
    """The next-token logits one decoding mode samples from (float32).

    ``base`` / ``adapter`` return the respective logits; ``svd-exact`` needs ``z_base``;
    ``svd-precomputed`` needs ``shift``; ``logit-bias`` is the plain baseline
    ``z + mu * mask * shift`` (no Jacobian weighting) with the same confidence mask.
    """
    if mode == "base":
        if z_base is None:
            raise ValueError("mode 'base' needs the base logits")
        return _f32(z_base)
    if mode == "adapter":
        return _f32(z_adapter)
    mask = confidence_mask(z_adapter, alpha)
    if mode == "svd-exact":
        if z_base is None:
            raise ValueError("mode 'svd-exact' needs the base logits")
        dz = exact_delta(z_adapter, z_base)
    elif mode == "svd-precomputed":
        if shift is None:
            raise ValueError("mode 'svd-precomputed' needs a steering vector (shift)")
        dz = precomputed_delta(z_adapter, shift)
    elif mode == "logit-bias":
        if shift is None:
            raise ValueError("mode 'logit-bias' needs a steering vector (shift)")
        dz = _f32(shift).to(z_adapter.device).expand(z_adapter.shape)
    else:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    return _f32(steer(_f32(z_adapter), dz, mu, mask, filtered=filtered))


def steer_table_rows_(
    z: torch.Tensor,
    table: torch.Tensor,
    used_rows: torch.Tensor,
    row_vec: torch.Tensor,
    mu: torch.Tensor,
    log_alpha: torch.Tensor,
) -> torch.Tensor:
    """In-place filtered precomputed SVD on float32 rows ``z`` ``[n, V]`` (the serving kernel).

    Row ``i`` uses the vector ``table[used_rows[row_vec[i]]]``. Nothing of size ``[n, V]`` is
    gathered from the table: ``<p, s>`` for all rows and the ``k`` distinct vectors in use
    comes from one ``[n, V] x [V, k]`` product, and the steering term is evaluated only on
    the confidence mask (a few tokens per row), since every other token becomes ``-inf``.
    ``mu`` and ``log_alpha`` are float32 ``[n]``. Rows of all ``-inf`` stay unchanged.
    """
    if z.dtype != torch.float32:
        raise TypeError("steer_table_rows_ works in place on float32 logits")
    zmax = z.amax(dim=-1, keepdim=True)
    # softmax is one fused pass; all -inf rows give NaN here but select no token below.
    p = torch.softmax(z, dim=-1)
    vecs = table.index_select(0, used_rows)  # [k, V], k = distinct vectors in this batch
    ps = (p @ vecs.T).gather(1, row_vec.unsqueeze(1))  # [n, 1]: <p, s> of each row's vector
    thr = torch.where(
        torch.isfinite(zmax), zmax + log_alpha.unsqueeze(1), torch.full_like(zmax, math.inf)
    )
    rows, cols = torch.nonzero(z >= thr, as_tuple=True)
    s_at = vecs[row_vec[rows], cols]
    vals = z[rows, cols] + mu[rows] * p[rows, cols] * (ps[rows, 0] - s_at)
    z.fill_(-math.inf)
    z[rows, cols] = vals
    return z
