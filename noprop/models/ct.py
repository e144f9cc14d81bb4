"""NoProp-CT: one time-conditioned block and a learnable noise schedule."""

from __future__ import annotations

import torch
from torch import nn

from noprop import ops
from noprop.models.ode import TimeConditionedModel
from noprop.objectives import LossTerms, cross_entropy, kl_to_standard_normal
from noprop.schedules import LearnableSchedule


class NoPropCT(TimeConditionedModel):
    """NoProp with continuous time (paper section 2.3).

    Training: ``t ~ U(0, 1)`` per example, ``z_t = sqrt(abar(t)) u_y + sqrt(1 - abar(t)) eps`` and

    ``CE(classifier(z_1), y) + KL(q(z_0 | y) || N(0, I)) + (eta / 2) E[SNR'(t) ||u_hat(z_t, x, t) - u_y||^2]``

    with ``u_hat = softmax(block(x, z_t, t)) @ W_embed`` and the learnable schedule of
    :class:`noprop.schedules.LearnableSchedule` (trained with everything else).
    Inference integrates the probability-flow ODE from ``z_0 ~ N(0, I)`` to ``t = 1`` (Euler or
    Heun, paper: 1000 steps), then applies the classifier.

    Args:
        num_classes, in_channels, image_size, embedding, embedding_dim, width, backend: see
            :class:`noprop.models.base.NoPropModel`.
        eta: scale of the L2 term (paper: 1).
    """

    method = "ct"
    readout = "softmax"

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
    ):
        super().__init__(num_classes, in_channels, image_size, embedding, embedding_dim, width, backend)
        self.eta = float(eta)
        self.noise_schedule = LearnableSchedule()
        self.classifier = nn.Linear(self.embed_dim, num_classes)
        self.reset_classifier()
        self.register_buffer("ends", torch.tensor([0.0, 1.0]), persistent=False)

    def config(self) -> dict:
        return {**super().config(), "eta": self.eta}

    def loss_terms(self, x: torch.Tensor, y: torch.Tensor) -> LossTerms:
        """The CT objective; ``parts["l2"]`` is the weighted L2 term (``[1]``)."""
        x, y = self.check_inputs(x, y)
        self.embedding.check_ready()
        W = self.embedding.weight
        batch = x.shape[0]
        t = torch.rand(batch, device=x.device)
        alpha_bar = self.noise_schedule.alpha_bar(torch.cat([t, self.ends]))
        alpha_bar_t, alpha_bar_0, alpha_bar_1 = alpha_bar[:batch], alpha_bar[batch], alpha_bar[batch + 1]
        # row 0: the block's input z_t; row 1: z_1 ~ q(z_1 | y) for the classifier
        signal = torch.stack([alpha_bar_t, alpha_bar_1.expand(batch)]).sqrt()
        noise = (1 - torch.stack([alpha_bar_t, alpha_bar_1.expand(batch)])).sqrt()
        z = ops.noised_latents(W, y, signal, noise, self.draw_seed(x.device), backend=self.backend)
        logits = self.block(x, z[0], t).unsqueeze(0)
        weight = (self.eta / 2 * self.noise_schedule.snr_derivative(t)).unsqueeze(0)
        l2 = ops.denoising_loss(logits, W, y, weight, backend=self.backend)
        ce = cross_entropy(self.classifier(z[1]), y)
        kl = kl_to_standard_normal(alpha_bar_0.sqrt() * W[y], 1 - alpha_bar_0)
        return LossTerms(l2 + ce + kl, {"ce": ce.detach(), "kl": kl.detach(), "l2": l2.detach().reshape(1)})

    def ode_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The probability-flow ODE of the learned schedule (:meth:`LearnableSchedule.ode_coefficients`)."""
        return self.noise_schedule.ode_coefficients(t)

    def class_logits(self, z: torch.Tensor) -> torch.Tensor:
        """The classifier on ``z_1``."""
        return self.classifier(z)
