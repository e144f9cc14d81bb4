"""The paper's baseline: the same T DT blocks chained and trained end-to-end with back-propagation."""

from __future__ import annotations

import torch

from noprop.models.base import NoPropModel
from noprop.objectives import LossTerms, cross_entropy
from noprop.stack import BlockList
from noprop.validation import check_positive_int


class Backprop(NoPropModel):
    """T DT blocks in a chain, trained end-to-end on cross-entropy.

    ``z_0 = 0``; ``logits_t = block_t(x, z_{t-1})``; ``z_t = softmax(logits_t) @ W_embed``; the
    prediction is ``logits_T``. The gradient flows through every block (the comparison point for
    NoProp's memory and accuracy).

    Args:
        num_classes, in_channels, image_size, embedding, width, backend: see
            :class:`noprop.models.base.NoPropModel`.
        T: number of blocks (paper: 10).
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
    ):
        super().__init__(num_classes, in_channels, image_size, embedding, embedding_dim, width, backend)
        self.T = check_positive_int("T", T)
        self.blocks = BlockList.build(T, num_classes, in_channels, image_size, self.embed_dim, self.block_config)

    def config(self) -> dict:
        return {**super().config(), "T": self.T}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of the last block."""
        W = self.embedding.weight
        z = W.new_zeros(x.shape[0], self.embed_dim)
        for block in self.blocks.blocks:
            logits = block(x, z)
            z = torch.softmax(logits.float(), dim=-1) @ W
        return logits

    def loss_terms(self, x: torch.Tensor, y: torch.Tensor) -> LossTerms:
        """Cross-entropy of the chain's output."""
        x, y = self.check_inputs(x, y)
        self.embedding.check_ready()
        ce = cross_entropy(self(x), y)
        return LossTerms(ce, {"ce": ce.detach()})

    @torch.no_grad()
    def predict(
        self,
        x: torch.Tensor,
        steps: int | None = None,
        solver: str = "euler",
        deterministic: bool = False,
        seed: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The chain's logits ``[B, num_classes]`` (deterministic; ``steps``, ``solver``, ``seed`` are unused)."""
        if steps not in (None, self.T):
            raise ValueError(f"steps: the back-propagation baseline runs exactly its T = {self.T} blocks, got {steps}")
        x, _ = self.check_inputs(x)
        return self(x)
