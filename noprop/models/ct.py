"""NoProp-CT: one time-conditioned block, a learnable noise schedule, and the ancestral sampler.

Inference "simulates the diffusion process" (paper section 2.3) by default: :func:`ancestral_sample`
takes DT's Eq. 3 steps between consecutive times of the grid ``t_k = k / steps`` of the learned
schedule. The probability-flow ODE (Euler or Heun, :func:`noprop.models.ode.integrate`) is the
alternative.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from noprop import ops
from noprop.models.base import BatchRows, StepSeeds
from noprop.models.ode import TimeConditionedModel
from noprop.models.rows import dropout_keyword, noised_latents, uniform_times
from noprop.objectives import LossTerms, cross_entropy, kl_to_standard_normal
from noprop.schedules import LearnableSchedule, posterior_coefficients
from noprop.validation import check_number


def ancestral_sample(
    logits_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    W: torch.Tensor,
    z: torch.Tensor,
    times: torch.Tensor,
    alpha_bar: torch.Tensor,
    seed: int | torch.Tensor,
    deterministic: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Ancestral sampling down a grid of increasing ``alpha_bar``: Eq. 3 between consecutive grid times.

    For ``k = 0..K-1`` (``K = len(times) - 1``), with ``abar_k = alpha_bar[k]``:
    ``z_{k+1} = a_k u_hat(z_k, t_k) + b_k z_k + sqrt(c_k) eps_k``,
    ``u_hat(z, t) = softmax(logits_at(z, t)) @ W``, ``eps_k = normal(seed + k + 1, z.shape)`` and
    ``(a_k, b_k, c_k) = posterior_coefficients(abar_k, abar_{k+1})`` (computed in float64), i.e.
    ``a = sqrt(abar_{k+1})(1 - alpha) / (1 - abar_k)``, ``b = sqrt(alpha)(1 - abar_{k+1}) / (1 - abar_k)``,
    ``c = (1 - abar_{k+1})(1 - alpha) / (1 - abar_k)``, ``alpha = abar_k / abar_{k+1}``. With an
    exact ``u_hat = u_y`` and ``z_0 ~ q(z_0 | y)``, every ``z_k`` has the marginal
    ``N(sqrt(abar_k) u_y, (1 - abar_k) I)``. The noise of step ``k`` depends on ``seed`` and ``k``
    only, so a call on a prefix of the grid retraces the first steps of the full call.

    Args:
        logits_at: ``(z [B, D], t [B]) -> logits [B, C]``, the block (it never sees a label).
        W: embedding ``[C, D]``.
        z: latent ``[B, D]`` at ``times[0]``.
        times: grid times ``[K + 1]`` (passed to ``logits_at``).
        alpha_bar: the schedule at ``times``, ``[K + 1]``, non-decreasing.
        seed: int or int64 tensor with one element.
        deterministic: no noise (``c`` ignored): the posterior mean at every step.
        backend: fused-op backend of :func:`noprop.ops.latent_update`.

    Returns:
        ``z`` at ``times[-1]``, ``[B, D]``.
    """
    a, b, c = posterior_coefficients(alpha_bar[:-1].double(), alpha_bar[1:].double())
    # c >= 0 for a non-decreasing alpha_bar; the clamp keeps a rounding-level crossing from making a NaN
    r = torch.zeros_like(c) if deterministic else c.clamp(min=0).sqrt()
    a, b, r = a.float(), b.float(), r.float()
    batch = z.shape[0]
    for k in range(times.shape[0] - 1):
        logits = logits_at(z, times[k].expand(batch))
        z = ops.latent_update(logits, W, z, a[k], b[k], r[k], seed + (k + 1), readout="softmax", backend=backend)
    return z


class NoPropCT(TimeConditionedModel):
    """NoProp with continuous time (paper section 2.3).

    Training: ``t ~ U(0, 1)`` per example, ``z_t = sqrt(abar(t)) u_y + sqrt(1 - abar(t)) eps`` and

    ``CE(classifier(z_1), y) + KL(q(z_0 | y) || N(0, I)) + (eta / 2) E[SNR'(t) ||u_hat(z_t, x, t) - u_y||^2]``

    with ``u_hat = softmax(block(x, z_t, t)) @ W_embed`` and the learnable schedule of
    :class:`noprop.schedules.LearnableSchedule` (trained with everything else, but without weight
    decay: :func:`noprop.train.build_optimizer`).
    Inference goes from ``z_0 ~ N(0, I)`` to ``t = 1`` on the grid ``t_k = k / steps`` (paper: 1000
    steps), then applies the classifier. Solvers: ``"ancestral"`` (the default, the paper's
    simulation of the diffusion process: :func:`ancestral_sample`), or ``"euler"``/``"heun"`` on
    the probability-flow ODE (:func:`noprop.models.ode.integrate`).

    Args:
        num_classes, in_channels, image_size, embedding, embedding_dim, width, backend: see
            :class:`noprop.models.base.NoPropModel`.
        eta: scale of the L2 term (paper: 1).
        block: a factory of ``(x, z, t) -> logits`` blocks in place of the paper's ``TimeBlock``
            (:mod:`noprop.user_blocks`).
    """

    method = "ct"
    readout = "softmax"
    solvers = ("ancestral", "euler", "heun")
    default_solver = "ancestral"

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        eta: float = 1.0,
        embedding: str = "onehot",
        embedding_dim: int | None = None,
        *,
        width: float = 1.0,
        backend: str = "auto",
        block: Callable[..., nn.Module] | None = None,
    ):
        super().__init__(num_classes, in_channels, image_size, embedding, embedding_dim, width, backend, block)
        self.eta = check_number("eta", eta)
        self.noise_schedule = LearnableSchedule()
        self.classifier = nn.Linear(self.embed_dim, num_classes)
        self.reset_classifier()
        self.register_buffer("ends", torch.tensor([0.0, 1.0]), persistent=False)

    def config(self) -> dict:
        return {**super().config(), "eta": self.eta}

    def loss_terms(self, x: torch.Tensor, y: torch.Tensor, seeds: StepSeeds | None = None, rows: BatchRows | None = None) -> LossTerms:
        """The CT objective; ``parts["l2"]`` is the weighted L2 term (``[1]``).

        Args:
            x, y: images ``[B, C_in, H, W]`` and labels ``[B]``.
            seeds: the step's noise and dropout seeds (drawn if None, before the times).
            rows: x is this part of a larger batch (data parallelism): its rows get the times,
                noise and dropout masks they get in the whole batch (:mod:`noprop.models.rows`).
        """
        x, y = self.check_inputs(x, y)
        self.embedding.check_ready()
        W = self.embedding.weight
        batch = x.shape[0]
        seeds = seeds if seeds is not None else self.draw_step_seeds(x.device)
        t = uniform_times(rows, batch, x.device)
        alpha_bar = self.noise_schedule.alpha_bar(torch.cat([t, self.ends]))
        alpha_bar_t, alpha_bar_0, alpha_bar_1 = alpha_bar[:batch], alpha_bar[batch], alpha_bar[batch + 1]
        # row 0: the block's input z_t; row 1: z_1 ~ q(z_1 | y) for the classifier
        signal = torch.stack([alpha_bar_t, alpha_bar_1.expand(batch)]).sqrt()
        noise = (1 - torch.stack([alpha_bar_t, alpha_bar_1.expand(batch)])).sqrt()
        z = noised_latents(W, y, signal, noise, seeds.noise, rows, self.backend)
        logits = self.block(x, z[0], t, **dropout_keyword(self.block, seeds, rows)).unsqueeze(0)
        weight = (self.eta / 2 * self.noise_schedule.snr_derivative(t)).unsqueeze(0)
        l2 = ops.denoising_loss(logits, W, y, weight, backend=self.backend)
        ce = cross_entropy(self.classifier(z[1]), y)
        kl = kl_to_standard_normal(alpha_bar_0.sqrt() * W[y], 1 - alpha_bar_0)
        return LossTerms(l2 + ce + kl, {"ce": ce.detach(), "kl": kl.detach(), "l2": l2.detach().reshape(1)})

    def ode_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The probability-flow ODE of the learned schedule (:meth:`LearnableSchedule.ode_coefficients`)."""
        return self.noise_schedule.ode_coefficients(t)

    def solve(
        self,
        logits_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        W: torch.Tensor,
        z: torch.Tensor,
        times: torch.Tensor,
        solver: str,
        deterministic: bool,
        seed: torch.Tensor,
    ) -> torch.Tensor:
        """:func:`ancestral_sample` on the learned ``alpha_bar(times)`` for ``"ancestral"``, else the ODE solvers.

        Shapes and arguments: see :meth:`noprop.models.ode.TimeConditionedModel.solve`.
        """
        if solver != "ancestral":
            return super().solve(logits_at, W, z, times, solver, deterministic, seed)
        alpha_bar = self.noise_schedule.alpha_bar(times)
        return ancestral_sample(logits_at, W, z, times, alpha_bar, seed, deterministic, self.backend)

    def class_logits(self, z: torch.Tensor) -> torch.Tensor:
        """The classifier on ``z_1``."""
        return self.classifier(z)
