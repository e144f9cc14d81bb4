"""Noise schedules: the fixed cosine schedule of NoProp-DT and the learnable schedule of NoProp-CT.

Orientation (paper): ``alpha_bar`` *increases* with time. ``t = 0`` is (nearly) pure noise and
``t = T`` (DT) or ``t = 1`` (CT) is (nearly) the clean label embedding, so block ``t`` denoises
``z_{t-1}`` towards ``u_y``.

:func:`posterior_coefficients` holds Eq. 3's ``a, b, c`` (the Gaussian posterior of the next
latent given the current one and ``u_y``) for both DT's inference and CT's ancestral sampler.
The learnable schedule keeps ``gamma_0 < gamma_1`` by construction (``gamma_1 = gamma_0 + span``
with a positive ``span``), so ``alpha_bar`` increases and ``SNR'(t) >= 0`` for any parameter
values: crossed endpoints would make the loss weight ``SNR'(t)`` negative and the loss unbounded
below.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from noprop.validation import check_positive_int

COSINE_OFFSET = 0.008
MAX_ALPHA_BAR = 0.999
MIN_GAMMA_SPAN = 1e-3


def posterior_coefficients(
    alpha_bar_prev: torch.Tensor, alpha_bar_next: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 3's coefficients of one step from ``alpha_bar_prev`` to the cleaner ``alpha_bar_next``.

    With ``alpha = alpha_bar_prev / alpha_bar_next``:
    ``a = sqrt(alpha_bar_next) (1 - alpha) / (1 - alpha_bar_prev)``,
    ``b = sqrt(alpha) (1 - alpha_bar_next) / (1 - alpha_bar_prev)``,
    ``c = (1 - alpha_bar_next) (1 - alpha) / (1 - alpha_bar_prev)``,
    so that ``z_next = a u + b z_prev + sqrt(c) eps`` draws from ``q(z_next | z_prev, u)`` when
    ``z_prev ~ N(sqrt(alpha_bar_prev) u, (1 - alpha_bar_prev) I)``; in particular
    ``z_next ~ N(sqrt(alpha_bar_next) u, (1 - alpha_bar_next) I)``.

    Args:
        alpha_bar_prev, alpha_bar_next: broadcastable tensors with
            ``0 < alpha_bar_prev <= alpha_bar_next < 1``.

    Returns:
        ``(a, b, c)``, broadcast to the common shape (``c >= 0`` when ``alpha_bar`` does not decrease).
    """
    alpha = alpha_bar_prev / alpha_bar_next
    a = alpha_bar_next.sqrt() * (1 - alpha) / (1 - alpha_bar_prev)
    b = alpha.sqrt() * (1 - alpha_bar_next) / (1 - alpha_bar_prev)
    c = (1 - alpha_bar_next) * (1 - alpha) / (1 - alpha_bar_prev)
    return a, b, c


class CosineSchedule:
    """The DT cosine schedule, precomputed in float64.

    ``alpha_bar_t = min(f(1 - t / T) / f(0), 0.999)`` for ``t = 0..T`` with
    ``f(tau) = cos^2(pi / 2 * (tau + s) / (1 + s))`` and ``s = 0.008`` (Nichol & Dhariwal's cosine
    schedule, run backwards in NoProp's orientation). ``f(1 - t/T) / f(0)`` reaches exactly 1 at
    ``t = T``, where ``SNR`` is infinite, so ``alpha_bar`` is capped at ``0.999``
    (``SNR(T) = 999``); ``alpha_bar_0 = f(1) / f(0)`` is ~4e-33, pure noise for practical purposes.

    Attributes (float64 CPU tensors; entry ``t - 1`` of a ``[T]`` tensor belongs to step ``t``):
        alpha_bar ``[T+1]``: increasing.
        snr ``[T+1]``: ``alpha_bar / (1 - alpha_bar)``.
        snr_delta ``[T]``: ``SNR(t) - SNR(t-1)``.
        a, b, c ``[T]``: Eq. 3's coefficients of step ``t`` (:func:`posterior_coefficients` of
            ``alpha_bar_{t-1}, alpha_bar_t``), with ``alpha_{t-1} = alpha_bar_{t-1} / alpha_bar_t``:
            ``a_t = sqrt(alpha_bar_t) (1 - alpha_{t-1}) / (1 - alpha_bar_{t-1})``,
            ``b_t = sqrt(alpha_{t-1}) (1 - alpha_bar_t) / (1 - alpha_bar_{t-1})``,
            ``c_t = (1 - alpha_bar_t) (1 - alpha_{t-1}) / (1 - alpha_bar_{t-1})``.
    """

    def __init__(self, T: int, offset: float = COSINE_OFFSET, max_alpha_bar: float = MAX_ALPHA_BAR):
        self.T = check_positive_int("T", T)
        if not 0.0 < max_alpha_bar < 1.0:
            raise ValueError(f"max_alpha_bar: expected a value in (0, 1), got {max_alpha_bar}")
        self.offset = float(offset)
        self.max_alpha_bar = float(max_alpha_bar)
        tau = 1.0 - torch.arange(T + 1, dtype=torch.float64) / T

        def f(tau: torch.Tensor | float) -> torch.Tensor:
            tau = torch.as_tensor(tau, dtype=torch.float64)
            return torch.cos(math.pi / 2 * (tau + offset) / (1 + offset)) ** 2

        self.alpha_bar = torch.clamp(f(tau) / f(0.0), max=max_alpha_bar)
        self.snr = self.alpha_bar / (1 - self.alpha_bar)
        self.snr_delta = self.snr[1:] - self.snr[:-1]
        self.a, self.b, self.c = posterior_coefficients(self.alpha_bar[:-1], self.alpha_bar[1:])

    def loss_weights(self, eta: float) -> torch.Tensor:
        """Per-block L2 weights ``(T * eta / 2) * (SNR(t) - SNR(t-1))``, float64 ``[T]``."""
        return self.T * eta / 2 * self.snr_delta

    def describe(self) -> dict:
        """The parameters that rebuild this schedule (stored in checkpoints)."""
        return {"kind": "cosine", "T": self.T, "offset": self.offset, "max_alpha_bar": self.max_alpha_bar}


class LearnableSchedule(nn.Module):
    """NoProp-CT's learnable schedule ``alpha_bar(t) = sigmoid(-gamma(t))`` on ``t in [0, 1]``.

    ``gamma(t) = gamma_0 + (gamma_1 - gamma_0) * (1 - gbar(t))`` where ``gbar`` is a normalised
    monotone network, ``gbar(t) = (g(t) - g(0)) / (g(1) - g(0))`` with
    ``g(t) = w_0 t + sum_k v_k sigmoid(w_k t + b_k)`` and positive ``w_0, v_k, w_k`` (softplus of
    free parameters): a two-layer network with positive weights, increasing in ``t``. So
    ``gamma(0) = gamma_1`` and ``gamma(1) = gamma_0``; ``gamma_0``, ``gamma_1`` and the network
    are trained. ``SNR(t) = exp(-gamma(t))`` and its derivative is exact:
    ``SNR'(t) = (gamma_1 - gamma_0) * gbar'(t) * exp(-gamma(t))``.

    The endpoints are ordered by construction: the parameters are ``gamma_0`` itself and
    ``raw_span``, and ``gamma_1 = gamma_0 + MIN_GAMMA_SPAN + softplus(raw_span)``. So for any
    parameter values ``gamma_1 - gamma_0 >= MIN_GAMMA_SPAN = 1e-3`` (the floor keeps the inequality
    strict in float32, where ``softplus(-80) ~ 2e-35`` would vanish next to ``gamma_0``, as long as
    ``|gamma_0| < 2^15``), ``alpha_bar`` increases and ``SNR'(t) >= 0``. Unconstrained endpoints
    could cross in training, turning the loss weight negative and the loss unbounded below.

    The initial range ``gamma_0 = -3, gamma_1 = 3`` (``alpha_bar`` from 0.047 to 0.953) is a
    choice of this library: the loss weight ``SNR'(t)`` grows like ``exp(-gamma(t))``, so a wider
    range puts nearly all the weight on almost clean latents, where the block learns to copy
    ``z`` rather than read ``x``. On 8,000 MNIST images (width 0.25), ``+-7`` reached 17% test
    accuracy after 5 epochs, ``+-3`` 62% after 6 and rising.

    Args:
        hidden: units of the monotone network.
        gamma_0: initial ``gamma(1)`` (``alpha_bar(1) = sigmoid(-gamma_0)``, near 1).
        gamma_1: initial ``gamma(0)`` (``alpha_bar(0) = sigmoid(-gamma_1)``, near 0).
    """

    def __init__(self, hidden: int = 64, gamma_0: float = -3.0, gamma_1: float = 3.0):
        super().__init__()
        check_positive_int("hidden", hidden)
        if not gamma_1 - gamma_0 > MIN_GAMMA_SPAN:
            raise ValueError(
                f"gamma_0, gamma_1: expected gamma_1 - gamma_0 > {MIN_GAMMA_SPAN} (alpha_bar increasing), got {gamma_0}, {gamma_1}"
            )
        self.gamma_0 = nn.Parameter(torch.tensor(float(gamma_0)))
        # softplus^-1(s) = log(expm1(s)) = s + log(-expm1(-s)) (no overflow): gamma_1 starts at the requested value
        span = gamma_1 - gamma_0 - MIN_GAMMA_SPAN
        self.raw_span = nn.Parameter(torch.tensor(span + math.log(-math.expm1(-span))))
        generator = torch.Generator().manual_seed(0)
        self.raw_linear = nn.Parameter(torch.tensor(0.0))
        self.raw_in = nn.Parameter(torch.randn(hidden, generator=generator))
        self.bias_in = nn.Parameter(torch.randn(hidden, generator=generator))
        self.raw_out = nn.Parameter(torch.randn(hidden, generator=generator) - 2.0)

    @property
    def span(self) -> torch.Tensor:
        """``gamma_1 - gamma_0 = MIN_GAMMA_SPAN + softplus(raw_span) > 0``, a 0-dim tensor."""
        return MIN_GAMMA_SPAN + F.softplus(self.raw_span)

    @property
    def gamma_1(self) -> torch.Tensor:
        """``gamma(0) = gamma_0 + span > gamma_0``, a 0-dim tensor (``alpha_bar(0) = sigmoid(-gamma_1)``)."""
        return self.gamma_0 + self.span

    def _g_and_slope(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``g(t)`` and ``g'(t)`` of the unnormalised monotone network, shaped like ``t``."""
        w0 = F.softplus(self.raw_linear)
        w_in = F.softplus(self.raw_in)
        v = F.softplus(self.raw_out)
        hidden = torch.sigmoid(t.unsqueeze(-1) * w_in + self.bias_in)
        g = w0 * t + (v * hidden).sum(-1)
        slope = w0 + (v * w_in * hidden * (1 - hidden)).sum(-1)
        return g, slope

    def gbar(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ``gbar(t)`` in ``[0, 1]`` and its derivative ``gbar'(t) > 0``."""
        ends = torch.arange(2, dtype=t.dtype, device=t.device)  # [0, 1], made on the device: no host-to-device copy
        g_ends, _ = self._g_and_slope(ends)
        scale = g_ends[1] - g_ends[0]
        g, slope = self._g_and_slope(t)
        return (g - g_ends[0]) / scale, slope / scale

    def gamma_and_rate(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``gamma(t)`` and ``k(t) = -gamma'(t) = (gamma_1 - gamma_0) gbar'(t)``, shaped like ``t``."""
        gbar, gbar_slope = self.gbar(t)
        return self.gamma_0 + self.span * (1 - gbar), self.span * gbar_slope

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        """``gamma(t) = gamma_0 + (gamma_1 - gamma_0) (1 - gbar(t))``, shaped like ``t``."""
        return self.gamma_and_rate(t)[0]

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """``alpha_bar(t) = sigmoid(-gamma(t))``, increasing in ``t``."""
        return torch.sigmoid(-self.gamma(t))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """``SNR(t) = alpha_bar / (1 - alpha_bar) = exp(-gamma(t))``."""
        return torch.exp(-self.gamma(t))

    def snr_derivative(self, t: torch.Tensor) -> torch.Tensor:
        """Exact ``SNR'(t) = k(t) exp(-gamma(t))`` with ``k = (gamma_1 - gamma_0) gbar'(t)`` (no finite differences)."""
        gamma, rate = self.gamma_and_rate(t)
        return rate * torch.exp(-gamma)

    def ode_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``P(t), Q(t)`` of the probability-flow ODE ``dz/dt = P u_hat + Q z`` in clean-embedding form.

        With ``z_t = sqrt(abar) u + sqrt(1 - abar) eps`` and ``eps`` estimated as
        ``(z - sqrt(abar) u_hat) / sqrt(1 - abar)``, ``dz/dt = (sqrt abar)' u_hat +
        (sqrt(1 - abar))' eps_hat``, i.e. ``P = abar' / (2 sqrt(abar) (1 - abar))`` and
        ``Q = -abar' / (2 (1 - abar))``. Since ``abar' = k abar (1 - abar)`` these are computed in
        the stable forms ``P = k sqrt(abar) / 2`` and ``Q = -k abar / 2``.
        """
        gamma, rate = self.gamma_and_rate(t)
        alpha_bar = torch.sigmoid(-gamma)
        return rate * alpha_bar.sqrt() / 2, -rate * alpha_bar / 2

    def describe(self) -> dict:
        """A summary for checkpoints and logs (the parameters themselves live in the state dict)."""
        return {"kind": "learnable", "gamma_0": self.gamma_0.item(), "gamma_1": self.gamma_1.item()}
