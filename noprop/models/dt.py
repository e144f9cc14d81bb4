"""NoProp-DT: T blocks, each trained on its own to denoise a noisy label embedding."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from noprop import ops
from noprop.blocks import DropoutKey
from noprop.models import rows as batch_rows
from noprop.models.base import BatchRows, NoPropModel, StepSeeds
from noprop.objectives import LossTerms, cross_entropy, kl_to_standard_normal
from noprop.schedules import CosineSchedule
from noprop.stack import BlockList, BlockStack, check_block_range
from noprop.user_blocks import FuncBlockStack
from noprop.validation import check_choice, check_number, check_positive_int

SCHEDULES = ("batched", "paper")


class NoPropDT(NoPropModel):
    """NoProp with discrete time (paper section 2.2).

    Training, for every block ``t = 1..T`` (no gradient crosses blocks):
    ``z_{t-1} = sqrt(abar_{t-1}) u_y + sqrt(1 - abar_{t-1}) eps``, ``u_y = W_embed[y]``,
    ``u_hat_t = softmax(block_t(x, z_{t-1})) @ W_embed``, and the objective is

    ``CE(classifier(z_T), y) + KL(q(z_0 | y) || N(0, I))
    + sum_t (T eta / 2)(SNR(t) - SNR(t-1)) E||u_hat_t - u_y||^2``

    with ``z_T ~ q(z_T | y)`` and the cosine schedule of :class:`noprop.schedules.CosineSchedule`.
    Inference (Eq. 3): ``z_0 ~ N(0, I)``, ``z_t = a_t u_hat_t(z_{t-1}, x) + b_t z_{t-1} + sqrt(c_t) eps_t``,
    class = argmax ``classifier(z_T)``.

    Args:
        num_classes, in_channels, image_size, embedding, embedding_dim, width, backend: see
            :class:`noprop.models.base.NoPropModel`.
        T: number of blocks (paper: 10).
        eta: scale of the L2 terms (paper: 0.1).
        schedule: ``"batched"`` (every step trains all T blocks on the same minibatch, run as one
            wide network, :class:`noprop.stack.BlockStack`) or ``"paper"`` (Algorithm 1: the
            trainer makes a full pass over the data per block; the blocks are independent modules,
            :class:`noprop.stack.BlockList`, so the optimizer touches only the block in training).
        block: a block factory (``(x, z) -> logits``) in place of the paper's ``DTBlock``: the
            batched schedule runs the T user blocks as one network through ``torch.func``
            (:class:`noprop.user_blocks.FuncBlockStack`), the paper schedule as a ``BlockList``.
            See :mod:`noprop.user_blocks`.

    What the ``batched`` schedule changes against Algorithm 1 (each block's own gradient is
    the same either way; the blocks' parameters are disjoint):

    * the shared parameters (the classifier on ``z_T`` and a learned or prototype embedding) get
      one update per minibatch, i.e. ``1/T`` as many per epoch as under Algorithm 1, where every
      block's pass updates them again;
    * in one step ``W_embed``'s gradient is the sum of every block's, plus the CE and KL terms';
    * gradient reaches ``W_embed`` both through the target ``u_y`` and through the noised input
      ``z_{t-1} = sqrt(abar) u_y + sqrt(1 - abar) eps`` (the paper does not say whether the
      input is detached; this library does not detach it, under either schedule).

    On the 8,000-image MNIST split both schedules reach the same accuracy within a point after
    the same number of block updates (``tests/test_learning.py``).
    """

    method = "dt"

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        T: int = 10,
        eta: float = 0.1,
        embedding: str = "onehot",
        embedding_dim: int | None = None,
        *,
        width: float = 1.0,
        backend: str = "auto",
        schedule: str = "batched",
        block: Callable[..., nn.Module] | None = None,
    ):
        super().__init__(num_classes, in_channels, image_size, embedding, embedding_dim, width, backend, block)
        self.T = check_positive_int("T", T)
        self.eta = check_number("eta", eta)
        self.schedule = check_choice("schedule", schedule, SCHEDULES)
        self.noise_schedule = CosineSchedule(T)
        if self.block_factory is not None:
            user_blocks = self.build_user_blocks(T, time_conditioned=False)
            self.blocks = FuncBlockStack(user_blocks) if schedule == "batched" else BlockList(user_blocks)
        else:
            container = BlockStack if schedule == "batched" else BlockList
            self.blocks = container.build(T, **self.block_arguments())
        self.classifier = nn.Linear(self.embed_dim, num_classes)
        self.reset_classifier()
        s = self.noise_schedule
        # float32 copies of the float64 schedule, on the model's device; derived from T, so not saved.
        for name, value in {
            "signal": s.alpha_bar.sqrt(),  # [T+1] sqrt(abar_t), t = 0..T
            "noise": (1 - s.alpha_bar).sqrt(),  # [T+1] sqrt(1 - abar_t)
            "l2_weight": s.loss_weights(self.eta),  # [T]
            "step_a": s.a,  # [T] Eq. 3
            "step_b": s.b,
            "step_noise": s.c.sqrt(),
        }.items():
            self.register_buffer(name, value.float(), persistent=False)

    def config(self) -> dict:
        return {**super().config(), "T": self.T, "eta": self.eta, "schedule": self.schedule}

    def noised_inputs(self, y: torch.Tensor, seed: int | torch.Tensor, rows: BatchRows | None = None) -> torch.Tensor:
        """The training latents of every block and the classifier: ``z [T + 1, B, D]``.

        ``z[t] = sqrt(abar_t) u_y + sqrt(1 - abar_t) eps[t]`` for ``t = 0..T`` (``z[t]`` feeds block
        ``t``, ``z[T] ~ q(z_T | y)`` the classifier) with ``eps = normal(seed, (T + 1, B, D))``, or with
        ``rows`` the rows ``offset .. offset + B`` of ``normal(seed, (T + 1, total, D))``. Every block's
        noise is its row of the whole, so it does not depend on which blocks a step trains.
        """
        B = y.shape[0]
        signal, noise = self.signal[:, None].expand(-1, B), self.noise[:, None].expand(-1, B)
        return batch_rows.noised_latents(self.embedding.weight, y, signal, noise, seed, rows, self.backend)

    def loss_terms(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        blocks: range | None = None,
        shared_terms: bool = True,
        seeds: StepSeeds | None = None,
        rows: BatchRows | None = None,
    ) -> LossTerms:
        """The objective of the blocks in ``blocks`` (default all), plus the CE and KL terms.

        Args:
            x, y: images ``[B, C_in, H, W]`` and labels ``[B]``.
            blocks: the blocks to train (a range of block indices), e.g. one block in the paper
                schedule, a chunk of blocks with ``block_chunk``, or a rank's share.
            shared_terms: include the classifier's CE and the KL term (once per training step).
            seeds: the step's noise and dropout seeds (drawn if None). For given seeds, block t's
                noise and dropout masks do not depend on ``blocks``: chunked, sharded and whole
                steps compute the same numbers.
            rows: x is this part of a larger batch (data parallelism): its rows get the noise and
                masks they get in the whole batch.

        ``parts["l2"]`` holds each trained block's weighted L2 term (``[k]``).
        """
        x, y = self.check_inputs(x, y)
        self.embedding.check_ready()
        blocks = check_block_range(blocks, self.T)
        seeds = seeds if seeds is not None else self.draw_step_seeds(x.device)
        W = self.embedding.weight
        z = self.noised_inputs(y, seeds.noise, rows)
        paper_blocks = isinstance(self.blocks, BlockStack) or (isinstance(self.blocks, BlockList) and self.block_factory is None)
        keyword = {"dropout_key": DropoutKey(seeds.dropout, rows.offset if rows else 0)} if paper_blocks else {}
        logits = self.blocks(x, z[blocks.start : blocks.stop], blocks, **keyword)
        weight = self.l2_weight[blocks.start : blocks.stop]
        l2, row_errors = ops.denoising_loss(logits, W, y, weight, backend=self.backend, return_row_errors=True)
        parts = {"l2": (weight.unsqueeze(1) * row_errors).sum(1) / x.shape[0]}
        if not shared_terms:
            return LossTerms(l2, parts)
        ce = cross_entropy(self.classifier(z[-1]), y)
        kl = kl_to_standard_normal(self.signal[0] * W[y], 1 - self.signal[0].square())
        return LossTerms(l2 + ce + kl, {"ce": ce.detach(), "kl": kl.detach(), **parts})

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip every block's gradient norm separately, and the shared parameters' (embedding, classifier) jointly.

        Returns the norms before clipping: ``[T]`` for the blocks, then the shared norm.
        """
        block_norms = self.blocks.clip_grad_norm_(max_norm)
        shared = [p for name, p in self.named_parameters() if not name.startswith("blocks.") and p.grad is not None]
        shared_norm = torch.nn.utils.clip_grad_norm_(shared, max_norm, foreach=True) if shared else block_norms.new_zeros(())
        return torch.cat([block_norms, shared_norm.reshape(1)])

    @torch.no_grad()
    def predict(
        self,
        x: torch.Tensor,
        steps: int | None = None,
        solver: str | None = None,
        deterministic: bool = False,
        seed: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Eq. 3 from ``z_0`` through the T blocks, then the classifier: logits ``[B, num_classes]``.

        Args:
            x: images ``[B, C_in, H, W]``.
            steps: must be None or T (DT runs exactly its blocks).
            solver: ignored: DT has no choice of solver (accepted for the common signature).
            deterministic: ``z_0 = 0`` and no noise in the updates, instead of the paper's sampling.
            seed: seed of ``z_0`` (``seed``) and of step ``t``'s noise (``seed + t``); drawn if None.
        """
        if steps not in (None, self.T):
            raise ValueError(f"steps: NoProp-DT runs exactly its T = {self.T} blocks, got {steps}")
        x, _ = self.check_inputs(x)
        W = self.embedding.weight
        seed = self._inference_seed(seed, x.device)
        features = self.blocks.image_features(x)
        shape = (x.shape[0], self.embed_dim)
        z = W.new_zeros(shape) if deterministic else ops.normal(seed, shape, backend=self.backend).to(W.dtype)
        for t in range(self.T):
            logits = self.blocks.head(t, features, z)
            r = 0.0 if deterministic else self.step_noise[t]
            z = ops.latent_update(logits, W, z, self.step_a[t], self.step_b[t], r, seed + (t + 1), backend=self.backend)
        return self.classifier(z)
