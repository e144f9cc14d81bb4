"""Schedules against independent formulas: orientation, posterior coefficients, SNR weights, SNR'."""

from __future__ import annotations

import math

import pytest
import torch

from noprop.schedules import MAX_ALPHA_BAR, CosineSchedule, LearnableSchedule


@pytest.mark.parametrize("T", [1, 3, 10, 50])
def test_cosine_alpha_bar_increases_from_noise_to_clean(T):
    s = CosineSchedule(T)
    assert s.alpha_bar.dtype == torch.float64 and s.alpha_bar.shape == (T + 1,)
    assert torch.all(s.alpha_bar[1:] > s.alpha_bar[:-1])
    assert s.alpha_bar[0] < 1e-6  # t = 0: pure noise
    assert s.alpha_bar[-1] == pytest.approx(MAX_ALPHA_BAR)  # t = T: the cap keeps SNR(T) finite
    assert torch.isfinite(s.snr).all() and torch.isfinite(s.snr_delta).all()


def test_cosine_formula_and_snr_weights():
    T, eta = 10, 0.1
    s = CosineSchedule(T)
    for t in range(T):  # below the cap the values are the documented cosine formula
        expected = math.cos(math.pi / 2 * (1 - t / T + 0.008) / 1.008) ** 2 / math.cos(math.pi / 2 * 0.008 / 1.008) ** 2
        assert s.alpha_bar[t].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    snr = [ab / (1 - ab) for ab in s.alpha_bar.tolist()]
    weights = s.loss_weights(eta)
    for t in range(1, T + 1):
        assert weights[t - 1].item() == pytest.approx(T * eta / 2 * (snr[t] - snr[t - 1]), rel=1e-12)
    assert torch.all(weights > 0)


@pytest.mark.parametrize("T", [3, 10])
def test_eq3_coefficients_are_the_gaussian_posterior(T):
    """a_t, b_t, c_t from conditioning the joint Gaussian of (z_t, z_{t-1}) given u, computed independently.

    Noising runs from t to t-1: z_t ~ N(sqrt(abar_t) u, 1 - abar_t) and
    z_{t-1} | z_t ~ N(sqrt(alpha) z_t, 1 - alpha), alpha = abar_{t-1} / abar_t. Conditioning z_t on
    z_{t-1}: mean = m_t + Cov / Var (z_{t-1} - m_{t-1}), variance = Var_t - Cov^2 / Var_{t-1}.
    """
    s = CosineSchedule(T)
    ab = s.alpha_bar.tolist()
    for t in range(1, T + 1):
        alpha = ab[t - 1] / ab[t]
        var_t, cov = 1 - ab[t], math.sqrt(alpha) * (1 - ab[t])
        var_prev = alpha * var_t + (1 - alpha)
        gain = cov / var_prev
        a_expected = math.sqrt(ab[t]) - gain * math.sqrt(ab[t - 1])  # coefficient of u
        c_expected = var_t - cov * cov / var_prev
        assert s.b[t - 1].item() == pytest.approx(gain, rel=1e-9, abs=1e-12)
        assert s.a[t - 1].item() == pytest.approx(a_expected, rel=1e-9, abs=1e-12)
        assert s.c[t - 1].item() == pytest.approx(c_expected, rel=1e-9, abs=1e-12)


def test_cosine_rejects_bad_arguments():
    with pytest.raises(ValueError, match="T"):
        CosineSchedule(0)
    with pytest.raises(TypeError, match="T"):
        CosineSchedule(2.5)
    with pytest.raises(ValueError, match="max_alpha_bar"):
        CosineSchedule(10, max_alpha_bar=1.0)


def test_learnable_schedule_is_increasing_and_normalised():
    s = LearnableSchedule()
    with torch.no_grad():
        s.raw_out.copy_(torch.randn_like(s.raw_out))  # a non-trivial monotone network
    t = torch.linspace(0, 1, 201)
    alpha_bar = s.alpha_bar(t)
    assert torch.all(alpha_bar[1:] > alpha_bar[:-1])
    gbar, _ = s.gbar(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(gbar, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(s.gamma(torch.tensor([0.0, 1.0])), torch.stack([s.gamma_1, s.gamma_0]).detach())


def test_learnable_snr_derivative_matches_autograd():
    s = LearnableSchedule()
    with torch.no_grad():
        s.raw_out.copy_(torch.randn_like(s.raw_out))
        s.raw_in.copy_(3 * torch.randn_like(s.raw_in))
    t = torch.rand(64, dtype=torch.float64, requires_grad=True)
    s = s.double()
    (autograd_slope,) = torch.autograd.grad(s.snr(t).sum(), t)
    torch.testing.assert_close(s.snr_derivative(t), autograd_slope, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(s.snr(t), s.alpha_bar(t) / (1 - s.alpha_bar(t)))


def test_learnable_schedule_trains_its_parameters():
    s = LearnableSchedule()
    s.snr_derivative(torch.rand(8)).sum().backward()
    for name, parameter in s.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
