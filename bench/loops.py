"""Reference training loops the end-to-end benchmark compares against (and tests count launches of).

* :class:`SeedStyleLoop`: what public NoProp implementations do: every minibatch visits the T
  blocks one after another, each with its own optimizer step (T forward/backward passes and T
  optimizer steps per minibatch). ``compile=True`` runs each block's loss through
  ``torch.compile`` (the "compiled reference loop" of the benchmark).
* The paper loop (Algorithm 1) is the same per-block step in a different order: for each block, a
  full pass over the data. ``SeedStyleLoop(...)(x, y, range(t, t + 1))`` is that step.
"""

from __future__ import annotations

import torch

from noprop.models.dt import NoPropDT
from noprop.objectives import LossTerms


class SeedStyleLoop:
    """Train a NoProp-DT (``schedule="paper"``: independent blocks) block by block, one optimizer per block.

    ``__call__(x, y)`` trains all T blocks on the batch, one after another; ``__call__(x, y, blocks)``
    trains only the blocks in ``blocks`` (the paper loop trains one per pass). The classifier and
    the embedding have an optimizer of their own, stepped with every block.

    Args:
        model: a ``NoPropDT(schedule="paper")``.
        lr, weight_decay: AdamW's, for every optimizer.
        compile: ``torch.compile`` the per-block loss (one graph per block).
    """

    def __init__(self, model: NoPropDT, lr: float = 1e-3, weight_decay: float = 1e-3, compile: bool = False):
        if model.schedule != "paper":
            raise ValueError("model: the seed-style loop needs NoPropDT(schedule='paper') (independent blocks)")
        self.model = model
        self.block_optimizers = [
            torch.optim.AdamW(block.parameters(), lr=lr, weight_decay=weight_decay) for block in model.blocks.blocks
        ]
        shared = [p for name, p in model.named_parameters() if not name.startswith("blocks.")]
        self.shared_optimizer = torch.optim.AdamW(shared, lr=lr, weight_decay=weight_decay)
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
