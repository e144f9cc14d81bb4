"""NoProp-DT: T blocks, each trained on its own to denoise a noisy label embedding."""

from __future__ import annotations

import torch
from torch import nn

from noprop import ops
from noprop.models.base import NoPropModel
from noprop.objectives import LossTerms, cross_entropy, kl_to_standard_normal
from noprop.schedules import CosineSchedule
from noprop.stack import BlockList, check_block_range
from noprop.validation import check_choice, check_positive_int

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
        schedule: ``"batched"`` (every step trains all T blocks on the same minibatch) or
            ``"paper"`` (Algorithm 1: the trainer makes a full pass over the data per block).
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
    ):
        super().__init__(num_classes, in_channels, image_size, embedding, embedding_dim, width, backend)
        self.T = check_positive_int("T", T)
        self.eta = float(eta)
        self.schedule = check_choice("schedule", schedule, SCHEDULES)
        self.noise_schedule = CosineSchedule(T)
        self.blocks = BlockList.build(T, num_classes, in_channels, image_size, self.embed_dim, self.block_config)
        self.classifier = nn.Linear(self.embed_dim, num_classes)
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

    def noised_inputs(self, y: torch.Tensor, seed: int | torch.Tensor, blocks: range | None = None) -> torch.Tensor:
        """The training latents ``[k + 1, B, D]``: ``z_{t-1}`` for each block ``t - 1`` in ``blocks``, then ``z_T``.

        ``z[j] = sqrt(abar) u_y + sqrt(1 - abar) eps`` with ``eps = normal(seed, (k + 1, B, D))``.
        """
        blocks = check_block_range(blocks, self.T)
        rows = torch.cat([self.signal[blocks.start : blocks.stop], self.signal[self.T :]])
        noise = torch.cat([self.noise[blocks.start : blocks.stop], self.noise[self.T :]])
        return ops.noised_latents(self.embedding.weight, y, rows, noise, seed, backend=self.backend)

    def loss_terms(self, x: torch.Tensor, y: torch.Tensor, blocks: range | None = None) -> LossTerms:
        """The objective for the blocks in ``blocks`` (default all), plus the CE and KL terms.

        ``parts["l2"]`` holds each trained block's weighted L2 term (``[k]``).
        """
        x, y = self.check_inputs(x, y)
        self.embedding.check_ready()
        blocks = check_block_range(blocks, self.T)
        W = self.embedding.weight
        z = self.noised_inputs(y, self.draw_seed(x.device), blocks)
        logits = self.blocks(x, z[:-1], blocks)
        weight = self.l2_weight[blocks.start : blocks.stop]
        l2, row_errors = ops.denoising_loss(logits, W, y, weight, backend=self.backend, return_row_errors=True)
        ce = cross_entropy(self.classifier(z[-1]), y)
        abar_0 = self.signal[0].square()
        kl = kl_to_standard_normal(self.signal[0] * W[y], 1 - abar_0)
        per_block = (weight.unsqueeze(1) * row_errors).sum(1) / x.shape[0]
        return LossTerms(l2 + ce + kl, {"ce": ce.detach(), "kl": kl.detach(), "l2": per_block})

    @torch.no_grad()
    def predict(
        self,
        x: torch.Tensor,
        steps: int | None = None,
        solver: str = "euler",
        deterministic: bool = False,
        seed: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Eq. 3 from ``z_0`` through the T blocks, then the classifier: logits ``[B, num_classes]``.

        Args:
            x: images ``[B, C_in, H, W]``.
            steps: must be None or T (DT runs exactly its blocks).
            solver: ignored by DT (accepted for a common signature).
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
