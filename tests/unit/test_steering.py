"""The SVD math against explicit formulas and the spec's edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from svd_vllm.core.steering import (
    LOG_PROB_FLOOR,
    aggregate_mu,
    confidence_mask,
    exact_delta,
    gauss_newton_mu,
    gauss_newton_terms,
    log_ratio,
    pooled_mu,
    precomputed_delta,
    steer,
    svd_logits,
)


def explicit_delta(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """(diag(p) - p p^T) g with g = -(log(p/q) + 1), formed as a V x V matrix, float64."""
    out = []
    for za, zb in zip(z_a.double(), z_b.double(), strict=True):
        p = torch.softmax(za, -1)
        q = torch.softmax(zb, -1)
        g = -(torch.log(p / q) + 1.0)
        jac = torch.diag(p) - torch.outer(p, p)
        out.append(jac @ g)
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_exact_delta_equals_explicit_jacobian(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    z_a = (torch.randn(16, 11, generator=g) * 3).to(dtype)
    z_b = (torch.randn(16, 11, generator=g) * 3).to(dtype)
    dz = exact_delta(z_a, z_b)
    assert dz.dtype == torch.float32
    ref = explicit_delta(z_a.float(), z_b.float())
    torch.testing.assert_close(dz.double(), ref, rtol=1e-4, atol=1e-6)
    # The Jacobian kills constants: dz sums to zero per row.
    torch.testing.assert_close(dz.sum(-1), torch.zeros(16), atol=1e-5, rtol=0)


def test_exact_delta_is_zero_when_models_agree() -> None:
    z = torch.randn(4, 9)
    assert torch.count_nonzero(exact_delta(z, z)) == 0
    # Same distribution from shifted logits: zero up to float32 rounding.
    torch.testing.assert_close(exact_delta(z, z + 5.0), torch.zeros(4, 9), atol=1e-6, rtol=0)


def test_precomputed_delta_with_exact_ratio_reproduces_exact() -> None:
    g = torch.Generator().manual_seed(1)
    z_a, z_b = torch.randn(5, 13, generator=g), torch.randn(5, 13, generator=g)
    r = log_ratio(z_a, z_b)
    torch.testing.assert_close(precomputed_delta(z_a, r), exact_delta(z_a, z_b))
    # One shared vector for all rows equals per-row copies of it.
    shared = torch.randn(13, generator=g)
    torch.testing.assert_close(
        precomputed_delta(z_a, shared), precomputed_delta(z_a, shared.expand(5, 13).clone())
    )


def test_precomputed_delta_rejects_wrong_vocab() -> None:
    with pytest.raises(ValueError, match="vocab size 7"):
        precomputed_delta(torch.randn(2, 9), torch.randn(7))


def test_mask_alpha_one_keeps_argmax_and_ties() -> None:
    z = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.0, -1.0, 5.0, 4.9]])
    m = confidence_mask(z, 1.0)
    assert m.tolist() == [[False, True, True, False], [False, False, True, False]]


def test_mask_alpha_to_zero_keeps_all_finite() -> None:
    z = torch.tensor([[1.0, -math.inf, -300.0, 40.0]])
    assert confidence_mask(z, 0.0).tolist() == [[True, False, True, True]]
    assert confidence_mask(z, 1e-300).tolist() == [[True, False, True, True]]


def test_mask_matches_probability_definition_and_per_row_alpha() -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(8, 50, generator=g) * 2
    alpha = torch.linspace(0.01, 0.9, 8)
    p = torch.softmax(z.double(), -1)
    expected = p >= alpha.double().unsqueeze(-1) * p.amax(-1, keepdim=True)
    assert torch.equal(confidence_mask(z, alpha), expected)


def test_mask_rejects_alpha_out_of_range() -> None:
    with pytest.raises(ValueError, match="alpha"):
        confidence_mask(torch.randn(2, 3), 1.5)
    with pytest.raises(ValueError, match="alpha"):
        confidence_mask(torch.randn(2, 3), torch.tensor([0.5, -0.1]))


def test_inf_rows_and_huge_logits_give_no_nan() -> None:
    z_a = torch.tensor(
        [
            [1e4, -1e4, 0.0, 5.0],
            [-math.inf, 2.0, 1.0, -math.inf],
            [-math.inf] * 4,
            [3.0, 3.0, 3.0, 3.0],
        ]
    )
    z_b = torch.tensor(
        [
            [-1e4, 1e4, 0.0, 5.0],
            [0.0, -math.inf, 1.0, 2.0],
            [0.0, 1.0, 2.0, 3.0],
            [-math.inf] * 4,
        ]
    )
    dz = exact_delta(z_a, z_b)
    assert torch.isfinite(dz).all()
    assert torch.count_nonzero(dz[2]) == 0 and torch.count_nonzero(dz[3]) == 0
    r = log_ratio(z_a, z_b)
    assert torch.isfinite(r).all() and r.min() >= 2 * LOG_PROB_FLOOR
    for filtered in (True, False):
        for alpha in (1e-6, 0.1, 1.0):
            mask = confidence_mask(z_a, alpha)
            out = steer(z_a, dz, -3.0, mask, filtered=filtered)
            assert not torch.isnan(out).any()
            # Tokens other processors removed stay removed; the all -inf row is unchanged.
            assert torch.isneginf(out[z_a.isneginf()]).all()
            assert torch.equal(out[2], z_a[2])
    shift = torch.randn(4)
    dzp = precomputed_delta(z_a, shift)
    assert torch.isfinite(dzp).all() and torch.count_nonzero(dzp[2]) == 0


def test_steer_filtered_sets_outside_mask_to_minus_inf_and_soft_keeps_it() -> None:
    z = torch.tensor([[2.0, 1.0, -5.0], [0.0, 0.0, 0.0]])
    dz = torch.tensor([[1.0, -1.0, 100.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    mu = torch.tensor([2.0, -1.0])
    hard = steer(z, dz, mu, mask, filtered=True)
    assert hard.tolist() == [[4.0, -1.0, -math.inf], [-1.0, -math.inf, -3.0]]
    soft = steer(z, dz, mu, mask, filtered=False)
    assert soft.tolist() == [[4.0, -1.0, -5.0], [-1.0, 0.0, -3.0]]
    # mu = 0 is the identity on the masked-in tokens.
    assert torch.equal(steer(z, dz, 0.0, mask, filtered=False), z)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_steer_returns_input_dtype_and_computes_in_float32(dtype: torch.dtype) -> None:
    z = torch.randn(3, 20).to(dtype)
    dz = exact_delta(z, torch.randn(3, 20).to(dtype))
    mask = confidence_mask(z, 0.05)
    out = steer(z, dz, -2.5, mask)
    assert out.dtype == dtype
    ref = steer(z.float(), dz, -2.5, mask).to(dtype)
    assert torch.equal(out, ref)


def _toy_adapter_boosts_label() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contexts where the adapter raised the label's logit over the base, but not enough."""
    g = torch.Generator().manual_seed(3)
    n, v = 64, 12
    z_b = torch.randn(n, v, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    z_a = z_b.clone()
    z_a[torch.arange(n), labels] += 1.5
    return z_a, z_b, labels


def test_sign_mu_negative_and_steering_helps_the_label() -> None:
    z_a, z_b, labels = _toy_adapter_boosts_label()
    dz = exact_delta(z_a, z_b)
    mask = confidence_mask(z_a, 0.0)  # whole vocabulary: the sign is a property of dz, not the mask
    steps = gauss_newton_mu(z_a, dz, labels, mask)
    num, den = gauss_newton_terms(z_a, dz, labels, mask)
    for mu_bar in (aggregate_mu(steps, "mean"), aggregate_mu(steps, "median"), pooled_mu(num, den)):
        assert mu_bar < 0
        steered = steer(z_a, dz, mu_bar, mask, filtered=False)
        lp_before = torch.log_softmax(z_a, -1).gather(-1, labels[:, None]).mean()
        lp_after = torch.log_softmax(steered, -1).gather(-1, labels[:, None]).mean()
        assert lp_after > lp_before


def test_gauss_newton_step_matches_definition() -> None:
    g = torch.Generator().manual_seed(4)
    z_a, z_b = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    labels = torch.randint(0, 10, (6,), generator=g)
    dz = exact_delta(z_a, z_b)
    mask = confidence_mask(z_a, 0.2)
    mdz = torch.where(mask, dz, torch.zeros(()))
    p = torch.softmax(z_a, -1)
    e = torch.nn.functional.one_hot(labels, 10).float()
    expected = ((e - p) * mdz).sum(-1) / ((mdz * mdz).sum(-1) + 1e-12)
    keep = (mdz != 0).any(-1)
    torch.testing.assert_close(gauss_newton_mu(z_a, dz, labels, mask), expected[keep])


def test_zero_dz_rows_and_ignored_labels_are_skipped() -> None:
    z = torch.randn(4, 8)
    dz = exact_delta(z, z)  # all zero
    labels = torch.tensor([0, 1, -100, 3])
    steps = gauss_newton_mu(z, dz, labels, confidence_mask(z, 0.0))
    assert steps.numel() == 0
    assert (
        aggregate_mu(steps) == 0.0
        and pooled_mu(*gauss_newton_terms(z, dz, labels, torch.ones_like(z, dtype=torch.bool)))
        == 0.0
    )


def test_mu_aggregators_mean_median_trimmed_skip_nan_and_refuse_unknown() -> None:
    steps = torch.tensor([1.0, 2.0, 3.0, 4.0, 1000.0])
    assert aggregate_mu(steps, "mean") == pytest.approx(202.0)
    assert aggregate_mu(steps, "median") == pytest.approx(3.0)
    assert aggregate_mu(steps, "trimmed", trim=0.2) == pytest.approx(3.0)
    assert aggregate_mu(torch.tensor([float("nan"), 2.0]), "mean") == pytest.approx(2.0)
    with pytest.raises(ValueError):
        aggregate_mu(steps, "mode")  # type: ignore[arg-type]


def test_each_svd_logits_mode_computes_its_formula() -> None:
    g = torch.Generator().manual_seed(5)
    z_a, z_b = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    assert torch.equal(svd_logits("adapter", z_a), z_a)
    assert torch.equal(svd_logits("base", z_a, z_base=z_b), z_b)
    r = log_ratio(z_a, z_b)
    ex = svd_logits("svd-exact", z_a, z_base=z_b, mu=-1.0, alpha=0.1)
    pre = svd_logits("svd-precomputed", z_a, shift=r, mu=-1.0, alpha=0.1)
    torch.testing.assert_close(ex, pre)
    bias = svd_logits("logit-bias", z_a, shift=r[0], mu=0.5, alpha=1e-9, filtered=False)
    torch.testing.assert_close(bias, z_a + 0.5 * r[0])
    with pytest.raises(ValueError, match="needs a steering vector"):
        svd_logits("svd-precomputed", z_a)
    with pytest.raises(ValueError, match="unknown mode"):
        svd_logits("nope", z_a)  # type: ignore[arg-type]
