"""Inference by integrating ``dz/dt = P(t) readout(logits(z, t)) @ W + Q(t) z`` from t = 0 to 1.

NoProp-CT (``P, Q`` from its schedule, softmax readout) and NoProp-FM (``P = 1, Q = 0``, linear
readout: the block predicts the velocity) share this integrator. Every step is one or two
:func:`noprop.ops.latent_update` calls, so the fused backends run the readout, the matrix product
and the update in one launch.
"""

from __future__ import annotations

from typing import Callable

import torch

from noprop import ops


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

    def step(logits, z_from, p, q):
        return ops.latent_update(logits, W, z_from, p, q, 0.0, 0, readout=readout, backend=backend)

    for k in range(steps):
        logits = logits_at(z, times[k].expand(batch))
        if solver == "euler":
            z = step(logits, z, h * P[k], 1 + h * Q[k])
            continue
        z_guess = step(logits, z, h * P[k], 1 + h * Q[k])
        logits_next = logits_at(z_guess, times[k + 1].expand(batch))
        z = step(logits, z, h / 2 * P[k], 1 + h / 2 * Q[k]) + step(logits_next, z_guess, h / 2 * P[k + 1], h / 2 * Q[k + 1])
    return z
