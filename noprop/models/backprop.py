"""The paper's discrete-time back-propagation baseline (Section 4): the T DT blocks as one deep network."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from noprop import ops
from noprop.models.base import NoPropModel
from noprop.objectives import LossTerms, cross_entropy
from noprop.stack import BlockStack
from noprop.user_blocks import FuncBlockStack
from noprop.validation import check_positive_int

INITIAL_MIXING = 0.5  # alpha_t at initialisation: every block moves z halfway towards its prediction


class Backprop(NoPropModel):
    """T DT blocks chained through the latent and trained end to end on cross-entropy (Section 4).

    ``z_0 ~ N(0, I)``; for ``t = 1..T``:
    ``z_t = (1 - alpha_t) z_{t-1} + alpha_t u_hat_t``, ``u_hat_t = softmax(block_t(x, z_{t-1})) @ W_embed``,
    ``alpha_t = tanh(w_t)`` with one learnable ``w_t`` per block; ``logits = classifier(z_T)``, a
    linear classifier; the loss is ``CE(logits, y)`` and the gradient flows through every block.
    Each update is :func:`noprop.ops.latent_update` with ``p = alpha_t``, ``q = 1 - alpha_t``,
    ``r = 0`` (differentiable on every backend). The blocks' image paths do not depend on ``z``,
    so they run once, as one wide network (:class:`noprop.stack.BlockStack`); the label and
    fusion layers run block after block.

    Choices the paper leaves open: ``w_t`` starts at ``atanh(0.5)`` (``alpha_t = 0.5``), the
    classifier starts as the embedding (see :meth:`NoPropModel.reset_classifier`), and inference
    draws ``z_0 ~ N(0, I)`` as training does (``deterministic=True`` starts from ``z_0 = 0``).

    Args:
        num_classes, in_channels, image_size, embedding, embedding_dim, width, backend: see
            :class:`noprop.models.base.NoPropModel`.
        T: number of blocks (paper: 10).
        block: a block factory (``(x, z) -> logits``) in place of the paper's ``DTBlock``, the T
            blocks stacked by :class:`noprop.user_blocks.FuncBlockStack` (see :mod:`noprop.user_blocks`).
    """

    method = "backprop"

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        T: int = 10,
        embedding: str = "onehot",
        embedding_dim: int | None = None,
        *,
        width: float = 1.0,
        backend: str = "auto",
        block: Callable[..., nn.Module] | None = None,
    ):
        super().__init__(num_classes, in_channels, image_size, embedding, embedding_dim, width, backend, block)
        self.T = check_positive_int("T", T)
        if self.block_factory is not None:
            self.blocks = FuncBlockStack(self.build_user_blocks(T, time_conditioned=False))
        else:
            self.blocks = BlockStack.build(T, **self.block_arguments())
        self.mixing_logit = nn.Parameter(torch.full((T,), math.atanh(INITIAL_MIXING)))  # w_t
        self.classifier = nn.Linear(self.embed_dim, num_classes)
        self.reset_classifier()

    def config(self) -> dict:
        return {**super().config(), "T": self.T}

    @property
    def mixing(self) -> torch.Tensor:
        """``alpha_t = tanh(w_t)``, ``[T]``."""
        return torch.tanh(self.mixing_logit)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_classes]`` of the chain started at ``z = z_0 [B, D]`` on images ``x [B, C_in, H, W]``."""
        W = self.embedding.weight
        features = self.blocks.image_features(x)
        alpha = self.mixing
        for t in range(self.T):
            logits = self.blocks.head(t, features, z)
            z = ops.latent_update(logits, W, z, alpha[t], 1 - alpha[t], 0.0, 0, backend=self.backend)
        return self.classifier(z)

    def _start(self, batch: int, seed: torch.Tensor, device: torch.device, deterministic: bool = False) -> torch.Tensor:
        """``z_0 [batch, D]``: noise-contract normals of ``seed``, or zeros when ``deterministic``."""
        W = self.embedding.weight
        if deterministic:
            return W.new_zeros(batch, self.embed_dim)
        return ops.normal(seed, (batch, self.embed_dim), device=device, backend=self.backend).to(W.dtype)

    def loss_terms(self, x: torch.Tensor, y: torch.Tensor) -> LossTerms:
        """Cross-entropy of the chain's classifier, from a fresh ``z_0 ~ N(0, I)``."""
        x, y = self.check_inputs(x, y)
        self.embedding.check_ready()
        z = self._start(x.shape[0], self.draw_seed(x.device), x.device)
        ce = cross_entropy(self(x, z), y)
        return LossTerms(ce, {"ce": ce.detach()})

    @torch.no_grad()
    def predict(
        self,
        x: torch.Tensor,
        steps: int | None = None,
        solver: str | None = None,
        deterministic: bool = False,
        seed: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The chain's logits ``[B, num_classes]`` from ``z_0 ~ N(0, I)`` (seed ``seed``, drawn if None).

        ``steps`` must be None or T; ``solver`` is ignored; ``deterministic`` starts from ``z_0 = 0``.
        """
        if steps not in (None, self.T):
            raise ValueError(f"steps: the back-propagation baseline runs exactly its T = {self.T} blocks, got {steps}")
        x, _ = self.check_inputs(x)
        z = self._start(x.shape[0], self._inference_seed(seed, x.device), x.device, deterministic)
        return self(x, z)
