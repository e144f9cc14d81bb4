"""NoProp-FM: flow matching of the label embedding with one time-conditioned block."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from noprop import ops
from noprop.models.base import BatchRows, StepSeeds
from noprop.models.ode import TimeConditionedModel
from noprop.models.rows import dropout_keyword, row_noise, uniform_times
from noprop.objectives import LossTerms, cross_entropy, nearest_embedding_logits


class NoPropFM(TimeConditionedModel):
    """NoProp with flow matching (paper section 2.3).

    Training: ``t ~ U(0, 1)``, ``z_0 ~ N(0, I)``, ``z_t = t u_y + (1 - t) z_0``; the block predicts
    the velocity ``v = block(x, z_t, t) @ W_embed`` (no softmax) and the loss is
    ``E||v - (u_y - z_0)||^2``. With a trained embedding (learned, prototype) the anchor term of
    Eq. 12-13, ``CE(theta_out(z~_1), y)`` with the one-step endpoint ``z~_1 = z_t + (1 - t) v``
    and a linear classifier ``theta_out`` (:attr:`classifier`), keeps the class embeddings apart;
    with the fixed one-hot embedding FM is pure flow matching and has no classifier.
    Inference integrates ``dz/dt = v`` from ``z_0 ~ N(0, I)`` to ``t = 1`` and predicts the class
    whose embedding is nearest to the final ``z``.

    Args: see :class:`noprop.models.base.NoPropModel`.
    """

    method = "fm"
    readout = "linear"

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        embedding: str = "onehot",
        embedding_dim: int | None = None,
        *,
        width: float = 1.0,
        backend: str = "auto",
        block: Callable[..., nn.Module] | None = None,
    ):
        super().__init__(num_classes, in_channels, image_size, embedding, embedding_dim, width, backend, block)
        if self.embedding.learnable:
            self.classifier = nn.Linear(self.embed_dim, num_classes)  # theta_out of the anchor term
            self.reset_classifier()

    def loss_terms(self, x: torch.Tensor, y: torch.Tensor, seeds: StepSeeds | None = None, rows: BatchRows | None = None) -> LossTerms:
        """The FM objective; ``parts["l2"]`` is the velocity loss (``[1]``).

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
        logits_of = lambda z_t: self.block(x, z_t, t, **dropout_keyword(self.block, seeds, rows))  # noqa: E731
        ones = torch.ones(1, device=x.device)
        if rows is None:
            # eps of noised_latents is z_0; the loss's target W[y] - eps reuses it through the seed
            z_t = ops.noised_latents(W, y, t.unsqueeze(0), (1 - t).unsqueeze(0), seeds.noise, backend=self.backend)[0]
            logits = logits_of(z_t)
            l2 = ops.denoising_loss(
                logits.unsqueeze(0), W, y, ones, readout="linear", noise_coef=-ones, seed=seeds.noise, backend=self.backend
            )
        else:  # the whole batch's z_0 rows: the same terms, the noise passed explicitly
            z_0 = row_noise(seeds.noise, 1, rows, batch, W.shape[1], self.backend)[0].to(W.dtype)
            z_t = t.unsqueeze(1) * W[y] + (1 - t).unsqueeze(1) * z_0
            logits = logits_of(z_t)
            l2 = (logits.float() @ W - (W[y] - z_0)).square().sum() / batch
        parts = {"l2": l2.detach().reshape(1)}
        total = l2
        if self.embedding.learnable:
            endpoint = z_t + (1 - t).unsqueeze(1) * (logits.float() @ W)
            anchor = cross_entropy(self.classifier(endpoint), y)
            parts["anchor_ce"] = anchor.detach()
            total = total + anchor
        return LossTerms(total, parts)

    def ode_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``dz/dt = v``: ``P = 1``, ``Q = 0``."""
        return torch.ones_like(t), torch.zeros_like(t)

    def class_logits(self, z: torch.Tensor) -> torch.Tensor:
        """``-||z_1 - W_c||^2``: the nearest class embedding wins."""
        return nearest_embedding_logits(z, self.embedding.weight)
