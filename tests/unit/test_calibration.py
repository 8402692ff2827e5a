"""Strength calibration and vector extraction."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from svd_vllm.core import artifact
from svd_vllm.core.steering import (
    GN_EPS,
    confidence_mask,
    exact_delta,
    log_ratio,
    precomputed_delta,
    steer,
)
from svd_vllm.offline.calibration import (
    DirectionStats,
    PositionStats,
    bootstrap_ci,
    calibrate,
    line_search_many,
    line_search_mu,
)
from svd_vllm.offline.extraction import CalibrationItem, ShiftAccumulator, extract_vector
from svd_vllm.offline.reference import ReferenceDecoder


def _toy(seed: int = 0, n: int = 400, v: int = 30, boost: float = 1.5):
    """The adapter moved half-way toward a true distribution; labels are drawn from the truth."""
    g = torch.Generator().manual_seed(seed)
    z_b = torch.randn(n, v, generator=g) * 2
    k = torch.randint(0, v, (n,), generator=g)
    z_a = z_b.clone()
    z_a[torch.arange(n), k] += boost
    z_true = z_b.clone()
    z_true[torch.arange(n), k] += 2 * boost
    labels = torch.multinomial(torch.softmax(z_true, -1), 1, generator=g).squeeze(-1)
    return z_a, z_b, labels


def direct_nll(z_a, dz, mask, labels, mu) -> torch.Tensor:
    steered = steer(z_a, dz, mu, mask, filtered=False).double()
    return -torch.log_softmax(steered, -1).gather(-1, labels[:, None]).squeeze(-1)


@pytest.mark.parametrize("alpha", [0.05, 0.3, 1.0])
def test_position_stats_reproduce_the_soft_nll(alpha: float) -> None:
    z_a, z_b, labels = _toy()
    z_a[0, 3] = -math.inf  # a token removed by someone else
    dz = exact_delta(z_a, z_b)
    mask = confidence_mask(z_a, alpha)
    stats = PositionStats.from_logits(z_a, dz, mask, labels)
    for mu in (-7.0, -1.0, 0.0, 2.5):
        torch.testing.assert_close(
            stats.nll(mu), direct_nll(z_a, dz, mask, labels, mu), rtol=1e-5, atol=1e-5
        )


def test_line_search_finds_the_grid_minimum() -> None:
    z_a, z_b, labels = _toy()
    dz = exact_delta(z_a, z_b)
    mask = confidence_mask(z_a, 0.05)
    stats = PositionStats.from_logits(z_a, dz, mask, labels)
    mu = line_search_mu(stats)
    grid = torch.linspace(mu - 5, mu + 5, 2001)
    vals = torch.stack([stats.nll(float(m)).mean() for m in grid])
    assert abs(float(grid[vals.argmin()]) - mu) < 0.02
    assert float(stats.nll(mu).mean()) <= float(vals.min()) + 1e-9
    assert mu < 0  # the adapter moved toward the labels: extrapolate


def test_line_search_per_resample_equals_the_search_on_the_resampled_rows() -> None:
    """The vectorised bootstrap (position weights = draw counts) gives, per resample, the
    minimiser of the NLL over the rows of that resample, repeated rows included."""
    z_a, z_b, labels = _toy(n=120)
    stats = PositionStats.from_logits(z_a, exact_delta(z_a, z_b), confidence_mask(z_a, 0.1), labels)
    g = torch.Generator().manual_seed(3)
    draws = [torch.randint(0, 120, (120,), generator=g) for _ in range(6)]
    weights = torch.stack([torch.bincount(d, minlength=120) for d in draws]).double()
    many = line_search_many(stats, weights)
    for r, d in enumerate(draws):
        sub = stats.select(d)
        grid = torch.linspace(float(many[r]) - 2, float(many[r]) + 2, 801)
        vals = torch.stack([sub.nll(float(m)).mean() for m in grid])
        assert abs(float(grid[vals.argmin()]) - float(many[r])) <= 0.006
        assert float(sub.nll(float(many[r])).mean()) <= float(vals.min()) + 1e-9
    assert len(set(many.tolist())) > 1  # the resamples differ


def test_calibrate_reports_every_estimator_and_picks_lowest_nll() -> None:
    z_a, z_b, labels = _toy(n=60)
    dz = exact_delta(z_a, z_b)
    mask = confidence_mask(z_a, 0.1)
    d = DirectionStats()
    for i in range(0, 60, 6):  # 10 items of 6 tokens
        d.add(i // 6, z_a[i : i + 6], dz[i : i + 6], labels[i : i + 6], mask[i : i + 6])
    res = calibrate(d, bootstrap_reps=50)
    # Each estimator against its definition: the Gauss-Newton step of a token is the ridge
    # least-squares fit of the residual e_y - p by mu * (I * dz) (ridge GN_EPS per token);
    # "pooled" is one fit over all tokens at once, "mean" / "median" / "trimmed" aggregate the
    # per-token fits. Solved as plain least squares with a row sqrt(eps) * mu = 0 appended.
    p = torch.softmax(z_a.double(), -1)
    residual = torch.nn.functional.one_hot(labels, z_a.shape[1]).double() - p
    direction = torch.where(mask, dz.double(), 0.0)
    moved = direction.abs().sum(-1) > 0

    def ridge_fit(d: torch.Tensor, r: torch.Tensor, eps: float) -> float:
        a = torch.cat([d.reshape(-1, 1), torch.tensor([[math.sqrt(eps)]], dtype=d.dtype)])
        b = torch.cat([r.reshape(-1, 1), torch.zeros(1, 1, dtype=r.dtype)])
        return float(torch.linalg.lstsq(a, b).solution)

    rows = torch.nonzero(moved).flatten()
    per_token = torch.tensor([ridge_fit(direction[t], residual[t], GN_EPS) for t in rows])
    pooled = ridge_fit(direction[moved], residual[moved], GN_EPS * int(moved.sum()))
    assert res.mu["pooled"] == pytest.approx(pooled, rel=1e-4)
    assert res.mu["mean"] == pytest.approx(float(per_token.mean()), rel=1e-4)
    assert res.mu["median"] == pytest.approx(float(per_token.median()), rel=1e-4)
    cut = math.floor(0.1 * per_token.numel())
    trimmed = per_token.sort().values[cut : per_token.numel() - cut].mean()
    assert res.mu["trimmed"] == pytest.approx(float(trimmed), rel=1e-4)
    # Each reported NLL is the mean soft NLL at that mu, computed directly on the logits;
    # the chosen estimator is the one whose strength fits the labels best.
    direct = {k: float(direct_nll(z_a, dz, mask, labels, mu).mean()) for k, mu in res.mu.items()}
    for k in res.mu:
        assert res.nll[k] == pytest.approx(direct[k], rel=1e-5)
    assert direct[res.chosen] <= min(direct.values()) + 1e-9
    assert direct["line_search"] <= float(direct_nll(z_a, dz, mask, labels, 0.0).mean())
    lo, hi = res.ci
    assert lo <= hi and math.isfinite(lo)
    assert res.tokens == 60


def test_bootstrap_ci_of_the_mean() -> None:
    vals = torch.arange(100, dtype=torch.float64)
    lo, hi = bootstrap_ci(lambda idx: float(vals[idx].mean()), 100, reps=400)
    assert lo < 49.5 < hi and hi - lo < 25


def test_shift_accumulator_matches_formulas() -> None:
    z_a, z_b, _ = _toy()
    r = log_ratio(z_a, z_b)
    p = torch.softmax(z_a, -1)
    p[:, 0] = 0.0  # a token the adapter never gives mass to
    acc = ShiftAccumulator(z_a.shape[1])
    acc.add(r[:25], p[:25])  # streamed in two parts
    acc.add(r[25:], p[25:])
    # The definitions: s_v is the mean of r over tokens, or its average weighted by p_phi
    # (numpy's weighted average, column by column); a token never given mass gets 0.
    r_np, p_np = r.double().numpy(), p.double().numpy()
    assert np.allclose(acc.shift("mean").numpy(), r_np.mean(0), rtol=1e-5, atol=1e-6)
    expected = [0.0] + [np.average(r_np[:, v], weights=p_np[:, v]) for v in range(1, r.shape[1])]
    assert np.allclose(acc.shift("prob").numpy(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="variant"):
        acc.shift("median")
    with pytest.raises(ValueError, match="no calibration tokens"):
        ShiftAccumulator(3).shift("mean")


@pytest.fixture(scope="module")
def decoder(tiny_dirs: tuple[Path, Path]) -> ReferenceDecoder:
    return ReferenceDecoder(*tiny_dirs)


def test_extract_vector_end_to_end(decoder: ReferenceDecoder, tmp_path: Path) -> None:
    prompts = [
        "the color of sky is",
        "one two three",
        "the sun is",
        "a leaf is",
        "what is the color of snow ? answer :",
    ]
    items = [
        CalibrationItem(p, decoder.generate(p, "adapter", max_new_tokens=4).text) for p in prompts
    ]
    art, report = extract_vector(decoder, items, name="t", progress=False, bootstrap_reps=20)
    m = art.meta
    assert m.vocab_size == decoder.vocab_size and art.shift.shape == (decoder.vocab_size,)
    assert torch.isfinite(art.shift).all()

    # Steering with the file's vector and strength lowers the calibration NLL, computed here
    # directly from the decoder's logits (soft scoring: the mask only gates the step).
    def calib_nll(mu: float) -> float:
        total, count = 0.0, 0
        for it in items:
            ctx, cont = decoder.continuation_ids(it.prompt, it.completion)
            z = decoder.adapter_logits(ctx + cont)[len(ctx) - 1 : len(ctx) - 1 + len(cont)]
            dz = precomputed_delta(z, art.shift)
            nll = direct_nll(z, dz, confidence_mask(z, m.alpha), torch.tensor(cont), mu)
            total, count = total + float(nll.sum()), count + len(cont)
        return total / count

    assert calib_nll(m.mu_bar) < calib_nll(0.0)
    assert calib_nll(m.mu_bar) == pytest.approx(
        m.calibration.nll["precomputed_" + m.estimator], rel=1e-4
    )
    # The adapter's own continuations: steering further along the fine-tuning shift helps.
    assert m.mu_bar < 0 and m.mu_bar_exact is not None and m.mu_bar_exact < 0
    assert m.calibration.nll["unsteered"] > m.calibration.nll["precomputed_" + m.estimator]
    assert m.calibration.items == 5 and m.calibration.tokens == sum(
        len(decoder.continuation_ids(i.prompt, i.completion)[1]) for i in items
    )
    path = artifact.save(art, tmp_path / "t.safetensors")
    assert artifact.load(path).meta == m
    # The exact direction's strength also fits: it lowers the report's unsteered NLL.
    exact = report.results["exact"]
    assert exact.nll[exact.chosen] < exact.nll_unsteered


def test_extract_refuses_bad_input(decoder: ReferenceDecoder, tiny_dirs: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match="empty"):
        extract_vector(decoder, [], name="t", progress=False)
    with pytest.raises(ValueError, match="alpha"):
        extract_vector(decoder, [CalibrationItem("a", "b")], name="t", alpha=0.0, progress=False)
    with pytest.raises(ValueError, match="tokenises to nothing"):
        extract_vector(decoder, [CalibrationItem("a", "")], name="t", progress=False)
    with pytest.raises(ValueError, match="needs an adapter"):
        extract_vector(
            ReferenceDecoder(tiny_dirs[0]), [CalibrationItem("a", "b")], name="t", progress=False
        )
