"""Containers of the T same-shaped DT blocks.

``BlockList`` holds T independent :class:`noprop.blocks.DTBlock` modules and runs them one after
another. Every container has the same interface, so a model does not care which it holds:

* ``forward(x [B, C_in, H, W], z [k, B, D], blocks=range(k0, k0 + k)) -> logits [k, B, C]``:
  block ``blocks[j]`` reads ``z[j]``; ``blocks`` defaults to all T.
* ``image_features(x) -> [T, B, hidden]``: the image path of every block (it does not depend on
  ``z``, so inference computes it once).
* ``head(t, features, z [B, D]) -> [B, C]``: block ``t``'s label path and fusion layers.
"""

from __future__ import annotations

import torch
from torch import nn

from noprop.blocks import BlockConfig, DTBlock
from noprop.validation import check_positive_int


def check_block_range(blocks: range | None, T: int) -> range:
    """``blocks`` (a range of consecutive block indices within ``[0, T)``) or ``range(T)`` for None."""
    if blocks is None:
        return range(T)
    if not isinstance(blocks, range) or blocks.step != 1 or not 0 <= blocks.start < blocks.stop <= T:
        raise ValueError(f"blocks: expected a non-empty range of consecutive block indices within [0, {T}), got {blocks!r}")
    return blocks


class BlockList(nn.Module):
    """T independent DT blocks, run one after another.

    Args:
        blocks: the ``DTBlock`` modules, all built with the same arguments.
    """

    def __init__(self, blocks: list[DTBlock]):
        super().__init__()
        if not blocks:
            raise ValueError("blocks: expected at least one DTBlock")
        self.blocks = nn.ModuleList(blocks)

    @classmethod
    def build(
        cls, T: int, num_classes: int, in_channels: int, image_size: int, embed_dim: int, config: BlockConfig
    ) -> "BlockList":
        """``T`` freshly initialised blocks."""
        check_positive_int("T", T)
        return cls([DTBlock(num_classes, in_channels, image_size, embed_dim, config) for _ in range(T)])

    @property
    def T(self) -> int:
        """Number of blocks."""
        return len(self.blocks)

    def forward(self, x: torch.Tensor, z: torch.Tensor, blocks: range | None = None) -> torch.Tensor:
        blocks = check_block_range(blocks, self.T)
        if z.shape[0] != len(blocks):
            raise ValueError(f"z: expected one latent per block ({len(blocks)}) in dim 0, got shape {list(z.shape)}")
        return torch.stack([self.blocks[t](x, z[j]) for j, t in enumerate(blocks)])

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([block.image(x) for block in self.blocks])

    def head(self, t: int, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.blocks[t].head(features[t], z)
