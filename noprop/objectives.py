"""The non-fused terms of the NoProp objectives and the container the models return them in."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class LossTerms:
    """One training step's objective.

    Attributes:
        total: the differentiable scalar to minimise (sum of all terms).
        parts: detached values of the terms for logging, by name: scalars (``"ce"``, ``"kl"``,
            ``"anchor_ce"``) or ``[T]`` vectors holding each block's weighted L2 (``"l2"``).
    """

    total: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def kl_to_standard_normal(mean: torch.Tensor, variance: torch.Tensor | float) -> torch.Tensor:
    """``KL(N(mean, variance I) || N(0, I))`` averaged over the batch.

    ``0.5 * sum_d (mean_d^2 + variance - 1 - log variance)`` per example; ``mean [B, D]``,
    ``variance`` a scalar (tensor) or ``[B]``.
    """
    variance = torch.as_tensor(variance, dtype=mean.dtype, device=mean.device)
    if variance.dim() == 1:
        variance = variance.unsqueeze(-1)
    per_dim = mean.square() + variance - 1 - torch.log(variance)
    return 0.5 * per_dim.sum(dim=-1).mean()


def nearest_embedding_logits(z: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Logits that rank classes by closeness of ``z [B, D]`` to each row of ``W [C, D]``: ``-||z - W_c||^2``."""
    return -torch.cdist(z.float(), W.float()).square()


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy ``-log softmax(logits)[y]`` over the batch, computed in float32."""
    return F.cross_entropy(logits.float(), y)
