"""Reference training loops the end-to-end benchmark compares against (and tests count launches of).

* :class:`SeedStyleLoop`: what public NoProp implementations do: every minibatch visits the T
  blocks one after another, each with its own optimizer step (T forward/backward passes and T
  foreach-AdamW steps per minibatch), every block a :class:`SeedStyleBlock` (the paper's block
  with ``nn.Dropout`` after ReLU and max-pool, as the seed notebook writes it).
  ``compile=True`` runs each block's loss through ``torch.compile`` (the "compiled reference
  loop" of the benchmark).
* The paper loop (Algorithm 1) is the same per-block step in a different order: for each block, a
  full pass over the data. ``SeedStyleLoop(...)(x, y, range(t, t + 1))`` is that step.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from noprop.blocks import POOLED_STAGES, DTBlock
from noprop.models.dt import NoPropDT
from noprop.objectives import LossTerms
from noprop.stack import BlockList


class SeedStyleBlock(nn.Module):
    """A :class:`noprop.blocks.DTBlock`'s layers run as PyTorch modules: ``nn.Dropout`` (torch's
    generator, a stored mask) after ``relu(max_pool2d(conv))``, as public implementations write it.

    ``(x [B, C_in, H, W], z [B, D]) -> logits [B, num_classes]``; the one-hot/learned label path only.
    """

    def __init__(self, block: DTBlock):
        super().__init__()
        if block.dims["prototype"]:
            raise ValueError("block: the seed-style block has no prototype label path")
        self.block = block
        self.dropout = nn.Dropout(block.config.dropout)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        image = self.block.image
        for conv, pooled in zip((image.conv1, image.conv2, image.conv3), POOLED_STAGES):
            x = conv(x)
            x = self.dropout(F.relu(F.max_pool2d(x, 2) if pooled else x))
        features = image.bn(image.fc(x.flatten(1)))
        return self.block.fusion(torch.cat([features, self.block.label(z)], dim=-1))


class SeedStyleLoop:
    """Train a NoProp-DT (``schedule="paper"``: independent blocks) block by block, one optimizer per block.

    ``__call__(x, y)`` trains all T blocks on the batch, one after another; ``__call__(x, y, blocks)``
    trains only the blocks in ``blocks`` (the paper loop trains one per pass). The classifier and
    the embedding have an optimizer of their own, stepped with every block.

    Args:
        model: a ``NoPropDT(schedule="paper")`` with the paper's blocks; its blocks are wrapped in
            :class:`SeedStyleBlock` (same parameters).
        lr, weight_decay: AdamW's, for every optimizer.
        compile: ``torch.compile`` the per-block loss (one graph per block).
    """

    def __init__(self, model: NoPropDT, lr: float = 1e-3, weight_decay: float = 1e-3, compile: bool = False):
        if model.schedule != "paper":
            raise ValueError("model: the seed-style loop needs NoPropDT(schedule='paper') (independent blocks)")
        self.model = model
        model.blocks = BlockList([SeedStyleBlock(block) for block in model.blocks.blocks])
        self.block_optimizers = [
            torch.optim.AdamW(block.parameters(), lr=lr, weight_decay=weight_decay, foreach=True) for block in model.blocks.blocks
        ]
        shared = [p for name, p in model.named_parameters() if not name.startswith("blocks.")]
        self.shared_optimizer = torch.optim.AdamW(shared, lr=lr, weight_decay=weight_decay, foreach=True)
        self.block_loss = self._block_loss
        if compile:
            # one graph per block (the block index selects different modules): allow T of them
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * model.T)
            torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 4 * model.T)
            self.block_loss = torch.compile(self._block_loss)

    def _block_loss(self, x: torch.Tensor, y: torch.Tensor, t: int) -> torch.Tensor:
        return self.model.loss_terms(x, y, range(t, t + 1)).total

    def __call__(self, x: torch.Tensor, y: torch.Tensor, blocks: range | None = None) -> LossTerms:
        blocks = range(self.model.T) if blocks is None else blocks
        total = None
        for t in blocks:
            self.block_optimizers[t].zero_grad(set_to_none=True)
            self.shared_optimizer.zero_grad(set_to_none=True)
            loss = self.block_loss(x, y, t)
            loss.backward()
            self.block_optimizers[t].step()
            self.shared_optimizer.step()
            total = loss.detach() if total is None else total + loss.detach()
        return LossTerms(total, {})
