"""The time-conditioned models (CT, FM): shared construction, and inference on the grid ``t_k = k / steps``.

:class:`TimeConditionedModel` computes the image features once, starts from ``z_0 ~ N(0, I)``
(or ``z_0 = 0`` when deterministic), runs the chosen solver from ``t = 0`` to ``t = 1`` and
applies the model's readout of ``z_1``. The solvers here integrate the probability-flow ODE
``dz/dt = P(t) readout(logits(z, t)) @ W + Q(t) z`` (:func:`integrate`: Euler or Heun):
NoProp-CT (``P, Q`` from its schedule, softmax readout) and NoProp-FM (``P = 1, Q = 0``, linear
readout: the block predicts the velocity). NoProp-CT adds, as its default, the ancestral sampler
that simulates the diffusion process (:func:`noprop.models.ct.ancestral_sample`). Every step is
one or two :func:`noprop.ops.latent_update` calls, so the fused backends run the readout, the
matrix product and the update in one launch.

On a GPU the loop is bound by kernel launches (a 1000-step sampling is some ten thousand small
kernels): ``predict(..., cuda_graph=True)`` captures the whole of it in one CUDA graph and
replays that (:mod:`noprop.models.graphed`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from noprop import ops
from noprop.blocks import TimeBlock
from noprop.models.base import NoPropModel
from noprop.models.graphed import run_graphed
from noprop.validation import check_positive_int

PAPER_INFERENCE_STEPS = 1000


def integrate(
    logits_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    W: torch.Tensor,
    z: torch.Tensor,
    P: torch.Tensor,
    Q: torch.Tensor,
    solver: str,
    readout: str,
    backend: str,
) -> torch.Tensor:
    """Integrate on the uniform grid ``t_k = k / steps``, ``k = 0..steps`` with ``steps = len(P) - 1``.

    Euler: ``z_{k+1} = z_k + h f(z_k, t_k)``.
    Heun:  ``z~ = z_k + h f(z_k, t_k)``, ``z_{k+1} = z_k + h/2 (f(z_k, t_k) + f(z~, t_{k+1}))``.

    Args:
        logits_at: ``(z [B, D], t [B]) -> logits [B, C]``, the block.
        W: embedding ``[C, D]``.
        z: starting latent ``[B, D]`` at ``t = 0``.
        P, Q: ODE coefficients at the grid times, ``[steps + 1]`` each.
        solver: ``"euler"`` or ``"heun"``.
        readout: ``"softmax"`` or ``"linear"``.
        backend: fused-op backend.

    Returns:
        ``z`` at ``t = 1``, ``[B, D]``.
    """
    steps = P.shape[0] - 1
    h = 1.0 / steps
    times = torch.linspace(0.0, 1.0, steps + 1, device=z.device)
    batch = z.shape[0]
    # the steps add no noise (r = 0); a seed made on the device, not from a host int, keeps the loop
    # free of host-to-device copies (CUDA-graph capturable) and draws nothing new per step
    no_noise = torch.zeros(1, dtype=torch.int64, device=z.device)

    def step(logits, z_from, p, q):
        return ops.latent_update(logits, W, z_from, p, q, 0.0, no_noise, readout=readout, backend=backend)

    for k in range(steps):
        logits = logits_at(z, times[k].expand(batch))
        if solver == "euler":
            z = step(logits, z, h * P[k], 1 + h * Q[k])
            continue
        z_guess = step(logits, z, h * P[k], 1 + h * Q[k])
        logits_next = logits_at(z_guess, times[k + 1].expand(batch))
        z = step(logits, z, h / 2 * P[k], 1 + h / 2 * Q[k]) + step(logits_next, z_guess, h / 2 * P[k + 1], h / 2 * Q[k + 1])
    return z


class TimeConditionedModel(NoPropModel):
    """A NoProp model with one time-conditioned block (CT, FM): shared construction and inference.

    Subclasses set :attr:`readout` and implement :meth:`ode_coefficients` and :meth:`class_logits`;
    one with more solvers than the ODE's extends :attr:`solvers` and :meth:`solve`.
    Arguments: see :class:`noprop.models.base.NoPropModel`; ``block`` is a factory of
    ``(x, z, t) -> logits`` blocks (:mod:`noprop.user_blocks`) in place of the paper's ``TimeBlock``.
    """

    readout: str = "softmax"
    solvers = ("euler", "heun")
    default_solver = "euler"

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        embedding: str,
        embedding_dim: int | None,
        width: float,
        backend: str,
        block: Callable[..., nn.Module] | None = None,
    ):
        super().__init__(num_classes, in_channels, image_size, embedding, embedding_dim, width, backend, block)
        if self.block_factory is not None:  # a user block (x, z, t) -> logits behind TimeBlock's interface
            self.block = self.build_user_blocks(1, time_conditioned=True)[0]
        else:
            self.block = TimeBlock(**self.block_arguments())

    def ode_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``P(t), Q(t)`` of ``dz/dt = P u_hat + Q z`` at the times ``t [n]``."""
        raise NotImplementedError

    def class_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` from the latent ``z [B, D]`` reached at ``t = 1``."""
        raise NotImplementedError

    def solve(
        self,
        logits_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        W: torch.Tensor,
        z: torch.Tensor,
        times: torch.Tensor,
        solver: str,
        deterministic: bool,
        seed: torch.Tensor,
    ) -> torch.Tensor:
        """Run ``solver`` from ``z [B, D]`` at ``times[0] = 0`` over the grid ``times [steps + 1]``: ``z`` at ``t = 1``.

        Here the ODE solvers (:func:`integrate` with :meth:`ode_coefficients`), which use neither
        ``deterministic`` nor ``seed`` (they add no noise); ``logits_at(z [B, D], t [B]) -> [B, C]``
        is the block with the image features fixed.
        """
        P, Q = self.ode_coefficients(times)
        return integrate(logits_at, W, z, P, Q, solver, self.readout, self.backend)

    @torch.no_grad()
    def predict(
        self,
        x: torch.Tensor,
        steps: int | None = None,
        solver: str | None = None,
        deterministic: bool = False,
        seed: int | torch.Tensor | None = None,
        cuda_graph: bool = False,
    ) -> torch.Tensor:
        """Run :meth:`solve` from ``z_0`` to ``t = 1``, then :meth:`class_logits`: logits ``[B, num_classes]``.

        Args:
            x: images ``[B, C_in, H, W]``.
            steps: steps on the grid ``t_k = k / steps`` (default 1000, the paper's).
            solver: one of :attr:`solvers`; None is :attr:`default_solver`.
            deterministic: start from ``z_0 = 0`` instead of ``z_0 ~ N(0, I)`` (and, for a
                sampler, add no noise on the way).
            seed: seed of ``z_0`` (``seed``) and of a sampler's step ``k`` (``seed + k + 1``); drawn if None.
            cuda_graph: CUDA tensors only, model in eval mode: capture the whole computation (image
                features, ``z_0``, every step, the readout) in one CUDA graph on the first call
                with this batch shape, ``steps``, ``solver``, ``deterministic``, backend and
                autocast dtype, and replay it on later calls (:func:`noprop.models.graphed.run_graphed`):
                the same predictions as without, for the same seed, with one launch instead of
                thousands. The first call costs a capture (two eager runs and the capture itself).

        Raises:
            ValueError: ``cuda_graph`` with CPU tensors, or with the model in training mode.
        """
        steps = PAPER_INFERENCE_STEPS if steps is None else check_positive_int("steps", steps)
        solver = self.resolve_solver(solver)
        x, _ = self.check_inputs(x)
        seed = self._inference_seed(seed, x.device)
        if not cuda_graph:
            return self.sample(x, seed, steps, solver, deterministic)
        key = ("predict", steps, solver, bool(deterministic), self.backend)
        return run_graphed(self, lambda x, seed: self.sample(x, seed, steps, solver, deterministic), x, seed, key)

    def sample(self, x: torch.Tensor, seed: torch.Tensor, steps: int, solver: str, deterministic: bool) -> torch.Tensor:
        """The body of :meth:`predict` on checked arguments: logits ``[B, num_classes]`` from ``x [B, C_in, H, W]``.

        ``seed`` is an int64 ``[1]`` tensor on ``x``'s device; nothing here reads a tensor's value on
        the host, so a CUDA graph can capture it.
        """
        W = self.embedding.weight
        features = self.block.image(x)  # the image path does not depend on z or t: once per call
        shape = (x.shape[0], self.embed_dim)
        z = W.new_zeros(shape) if deterministic else ops.normal(seed, shape, backend=self.backend).to(W.dtype)
        times = torch.linspace(0.0, 1.0, steps + 1, device=x.device)
        z = self.solve(lambda z, t: self.block.head(features, z, t), W, z, times, solver, deterministic, seed)
        return self.class_logits(z)
