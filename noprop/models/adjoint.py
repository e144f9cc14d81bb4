"""The paper's continuous-time back-propagation baseline (Table 1, "Adjoint"): a neural ODE on the CT block."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from noprop import ops
from noprop.models.ode import PAPER_INFERENCE_STEPS, TimeConditionedModel
from noprop.objectives import LossTerms, cross_entropy
from noprop.validation import check_positive_int


def _odeint_adjoint():
    """``torchdiffeq.odeint_adjoint``, imported on first use (``noprop`` imports without torchdiffeq)."""
    try:
        from torchdiffeq import odeint_adjoint
    except ImportError as error:
        raise ImportError("the Adjoint baseline needs torchdiffeq: pip install torchdiffeq") from error
    return odeint_adjoint


class Adjoint(TimeConditionedModel):
    """A neural ODE ``dz/dt = f(z, x, t)`` with the CT block, trained end to end with the adjoint method.

    ``f(z, x, t) = block(x, z, t) @ W_embed``: the block's logits read out linearly as a velocity,
    as in NoProp-FM. This is this library's choice between the two fields the paper allows; the
    other, ``softmax(logits) @ W_embed - z`` (a flow towards the predicted embedding), learns far
    more slowly: its softmax damps the gradient to the block and ``e^-1 z_0`` of the starting
    noise always remains in ``z_1``. Measured on the MNIST split (width 1/4, 10 Euler steps, Adam
    at 1e-3, batch 128): training accuracy 80% after 120 steps with the linear field, 45% with
    the softmax one.
    Training integrates from ``z_0 ~ N(0, I)`` to ``t = 1`` with ``torchdiffeq.odeint_adjoint``
    (fixed-step Euler of ``ode_steps`` steps, the paper's 1000 by default, forward and adjoint),
    then minimises ``CE(classifier(z_1), y)`` with a linear classifier. The adjoint pass stores no
    activations of the solver: memory is constant in the number of steps. The block's image path
    does not depend on ``z`` or ``t``: it runs once, and its features ride along as a constant part
    of the ODE state so their gradient comes out of the adjoint pass as well.
    Inference (:meth:`predict`) integrates the same ODE with the fused :func:`noprop.ops.latent_update`.

    Args:
        num_classes, in_channels, image_size, embedding, embedding_dim, width, backend: see
            :class:`noprop.models.base.NoPropModel`.
        ode_steps: Euler steps of the training solve (paper: 1000).
        block: a factory of ``(x, z, t) -> logits`` blocks in place of the paper's ``TimeBlock``
            (:mod:`noprop.user_blocks`).
    """

    method = "adjoint"
    readout = "linear"
    solvers = ("euler", "heun")
    default_solver = "euler"

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        embedding: str = "onehot",
        embedding_dim: int | None = None,
        *,
        ode_steps: int = PAPER_INFERENCE_STEPS,
        width: float = 1.0,
        backend: str = "auto",
        block: Callable[..., nn.Module] | None = None,
    ):
        super().__init__(num_classes, in_channels, image_size, embedding, embedding_dim, width, backend, block)
        self.ode_steps = check_positive_int("ode_steps", ode_steps)
        self.classifier = nn.Linear(self.embed_dim, num_classes)
        self.reset_classifier()

    def config(self) -> dict:
        return {**super().config(), "ode_steps": self.ode_steps}

    def velocity(self, features: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``f = head(features, z, t) @ W``: ``[B, D]`` from features ``[B, hidden]``, ``z [B, D]``, ``t [B]``."""
        logits = self.block.head(features, z, t)
        return ops.latent_update(logits, self.embedding.weight, z, 1.0, 0.0, 0.0, 0, readout="linear", backend=self.backend)

    def _adjoint_parameters(self) -> list[torch.Tensor]:
        """What ``f`` reads besides its state: the block's label, time and fusion layers, and a trained embedding.

        A user block (:mod:`noprop.user_blocks`) gives all its parameters: which ones its ``image``
        reads is not known, and the adjoint pass gives those it does not read a zero gradient.
        """
        head = [p for name, p in self.block.named_parameters() if not name.startswith("image.")]
        return head + ([self.embedding.weight] if self.embedding.learnable else [])

    def integrate_adjoint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``z_1 [B, D]`` from ``z_0 = z [B, D]``, differentiable by the adjoint method (Euler, ``ode_steps`` steps)."""
        features = self.block.image(x)
        batch = x.shape[0]

        def dynamics(t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            z_t, constant = state
            return self.velocity(constant, z_t, t.expand(batch)), torch.zeros_like(constant)

        times = torch.tensor([0.0, 1.0], device=x.device)
        z_path, _ = _odeint_adjoint()(
            dynamics,
            (z, features),
            times,
            method="euler",
            options={"step_size": 1.0 / self.ode_steps},
            adjoint_params=self._adjoint_parameters(),
        )
        return z_path[-1]

    def loss_terms(self, x: torch.Tensor, y: torch.Tensor) -> LossTerms:
        """Cross-entropy of the classifier on ``z_1``, from a fresh ``z_0 ~ N(0, I)``."""
        x, y = self.check_inputs(x, y)
        self.embedding.check_ready()
        W = self.embedding.weight
        z = ops.normal(self.draw_seed(x.device), (x.shape[0], self.embed_dim), backend=self.backend).to(W.dtype)
        ce = cross_entropy(self.classifier(self.integrate_adjoint(x, z)), y)
        return LossTerms(ce, {"ce": ce.detach()})

    def ode_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``dz/dt = logits @ W``: ``P = 1``, ``Q = 0``."""
        return torch.ones_like(t), torch.zeros_like(t)

    def class_logits(self, z: torch.Tensor) -> torch.Tensor:
        """The classifier on ``z_1``."""
        return self.classifier(z)
