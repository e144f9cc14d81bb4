"""Schedules against independent formulas: orientation, posterior coefficients, SNR weights, SNR',
endpoints ordered for any parameters, and no weight decay on the learned schedule."""

from __future__ import annotations

import math

import pytest
import torch

from noprop.models import NoPropCT, NoPropDT
from noprop.schedules import MAX_ALPHA_BAR, MIN_GAMMA_SPAN, CosineSchedule, LearnableSchedule, posterior_coefficients
from noprop.train import TrainConfig, build_optimizer


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


def _gaussian_posterior(ab_prev: float, ab_next: float) -> tuple[float, float, float]:
    """(a, b, c) from conditioning the joint Gaussian of (z_next, z_prev) given u, computed independently.

    Noising runs from next to prev: z_next ~ N(sqrt(abar_next) u, 1 - abar_next) and
    z_prev | z_next ~ N(sqrt(alpha) z_next, 1 - alpha), alpha = abar_prev / abar_next. Conditioning
    z_next on z_prev: mean = m_next + Cov / Var_prev (z_prev - m_prev), variance = Var_next - Cov^2 / Var_prev.
    """
    alpha = ab_prev / ab_next
    var_next, cov = 1 - ab_next, math.sqrt(alpha) * (1 - ab_next)
    var_prev = alpha * var_next + (1 - alpha)
    gain = cov / var_prev
    return math.sqrt(ab_next) - gain * math.sqrt(ab_prev), gain, var_next - cov * cov / var_prev


@pytest.mark.parametrize("T", [3, 10])
def test_eq3_coefficients_are_the_gaussian_posterior(T):
    s = CosineSchedule(T)
    ab = s.alpha_bar.tolist()
    for t in range(1, T + 1):
        a_expected, b_expected, c_expected = _gaussian_posterior(ab[t - 1], ab[t])
        assert s.b[t - 1].item() == pytest.approx(b_expected, rel=1e-9, abs=1e-12)
        assert s.a[t - 1].item() == pytest.approx(a_expected, rel=1e-9, abs=1e-12)
        assert s.c[t - 1].item() == pytest.approx(c_expected, rel=1e-9, abs=1e-12)


def test_posterior_coefficients_on_arbitrary_pairs():
    """The shared function (used by CT's sampler too) on CT-like pairs, elementwise over a batch of pairs."""
    pairs = [(0.047, 0.06), (0.3, 0.31), (0.5, 0.9), (0.94, 0.953), (0.2, 0.2)]
    prev = torch.tensor([p for p, _ in pairs], dtype=torch.float64)
    nxt = torch.tensor([n for _, n in pairs], dtype=torch.float64)
    a, b, c = posterior_coefficients(prev, nxt)
    for i, (p, n) in enumerate(pairs):
        for got, expected in zip((a[i], b[i], c[i]), _gaussian_posterior(p, n)):
            assert got.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert a[-1].item() == 0 and b[-1].item() == 1 and c[-1].item() == 0  # no change in alpha_bar: z stays where it is


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


def test_learnable_schedule_starts_at_the_requested_endpoints():
    s = LearnableSchedule()
    assert s.gamma_0.item() == pytest.approx(-3.0, abs=1e-6) and s.gamma_1.item() == pytest.approx(3.0, abs=1e-6)
    assert s.describe() == {"kind": "learnable", "gamma_0": s.gamma_0.item(), "gamma_1": s.gamma_1.item()}
    wide = LearnableSchedule(gamma_0=-7.0, gamma_1=40.0)
    assert wide.gamma_1.item() == pytest.approx(40.0, abs=1e-5)
    with pytest.raises(ValueError, match="gamma_0, gamma_1"):
        LearnableSchedule(gamma_0=1.0, gamma_1=1.0)


@pytest.mark.parametrize(
    "values",
    [
        {"raw_span": -80.0, "gamma_0": 50.0},  # huge negative span at the noisy end
        {"raw_span": -80.0, "gamma_0": -50.0},  # ... and at the clean end
        {"raw_span": -1e4, "gamma_0": 3.0},  # a gradient step that would have crossed the endpoints
        {"raw_span": 80.0, "gamma_0": 50.0, "raw_linear": 80.0, "raw_in": 80.0, "raw_out": 80.0, "bias_in": 80.0},
        {"raw_span": 80.0, "gamma_0": -50.0, "raw_in": 80.0, "bias_in": -80.0},
        {"raw_span": -80.0, "gamma_0": 0.0, "raw_linear": -80.0, "raw_in": -80.0, "raw_out": -80.0, "bias_in": -80.0},
        {"raw_span": -80.0, "gamma_0": 0.0, "raw_linear": -80.0, "raw_in": 80.0, "raw_out": 80.0, "bias_in": -40.0},
    ],
)
def test_learnable_endpoints_stay_ordered_for_any_parameters(values):
    """gamma_0 < gamma_1, SNR'(t) >= 0 and alpha_bar non-decreasing whatever the raw parameters hold."""
    s = LearnableSchedule()
    with torch.no_grad():
        for name, value in values.items():
            getattr(s, name).fill_(value)
    assert s.gamma_0.item() < s.gamma_1.item()
    assert (s.gamma_1 - s.gamma_0).item() >= MIN_GAMMA_SPAN * (1 - 1e-3)
    t = torch.linspace(0, 1, 257)
    with torch.no_grad():
        slope, alpha_bar, gamma = s.snr_derivative(t), s.alpha_bar(t), s.gamma(t)
    for name, value in (("SNR'", slope), ("alpha_bar", alpha_bar), ("gamma", gamma)):
        assert not torch.isnan(value).any(), name  # the extremes are NaN-free, so the checks below mean something
    assert torch.all(slope >= 0)
    assert torch.all(alpha_bar[1:] >= alpha_bar[:-1])
    assert torch.all(gamma[1:] <= gamma[:-1]) and gamma[0] > gamma[-1]


def test_schedule_parameters_are_kept_out_of_weight_decay():
    """CT's optimizer: schedule parameters in a group without weight decay, everything else decayed."""
    model = NoPropCT(10, 1, 28, embedding="learned", width=0.125)
    optimizer = build_optimizer(model, TrainConfig(method="ct"))
    assert isinstance(optimizer, torch.optim.Adam)
    decayed, undecayed = optimizer.param_groups
    assert (decayed["weight_decay"], undecayed["weight_decay"]) == (1e-3, 0.0)
    assert {id(p) for p in undecayed["params"]} == {id(p) for p in model.noise_schedule.parameters()}
    assert {id(p) for p in decayed["params"]} == {
        id(p) for name, p in model.named_parameters() if not name.startswith("noise_schedule.")
    }
    assert any(p is model.embedding.weight for p in decayed["params"])
    assert any(p is model.classifier.weight for p in decayed["params"])

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # only the L2 term of weight decay moves a parameter
    optimizer.step()
    for name, p in model.named_parameters():
        if name.startswith("noise_schedule."):
            assert torch.equal(p.detach(), before[name]), name
        else:  # Adam's first step on the L2 gradient g = wd * p: p - lr * g / (|g| + eps), towards 0
            g = 1e-3 * before[name]
            torch.testing.assert_close(p.detach(), before[name] - 1e-3 * g / (g.abs() + 1e-8), rtol=1e-5, atol=1e-8)


def test_models_without_a_learned_schedule_keep_one_decayed_group():
    model = NoPropDT(10, 1, 28, T=2, width=0.125)
    (group,) = build_optimizer(model, TrainConfig()).param_groups
    assert group["weight_decay"] == 1e-3 and len(group["params"]) == len(list(model.parameters()))
