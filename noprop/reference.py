"""Plain-PyTorch implementation of every fused op: the CPU fallback and the test oracle.

Each function computes its op with ordinary differentiable tensor operations, so its gradients
come from autograd and are independent of the hand-written backward passes of the fused
backends. Inputs arrive normalised by :mod:`noprop.ops` (coefficients expanded to ``[T, B]`` or
``[N]``, seeds as int64 tensors of shape ``[1]``); see that module for the public contracts.
"""

from __future__ import annotations

import torch

from noprop import rng

READOUTS = ("softmax", "linear")


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors to float32; float32 and float64 stay as they are."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def readout(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Class weights from logits ``[..., C]``: ``softmax(logits)`` or ``logits`` itself, at least float32."""
    logits = _upcast(logits)
    if kind == "softmax":
        return torch.softmax(logits, dim=-1)
    if kind == "linear":
        return logits
    raise ValueError(f"readout: expected one of {READOUTS}, got {kind!r}")


def normal(seed: torch.Tensor, shape: tuple[int, ...], offset: int = 0) -> torch.Tensor:
    """``eps = normal(seed, shape, offset)`` of the noise contract (:func:`noprop.rng.normal`)."""
    return rng.normal(seed, shape, offset=offset, device=seed.device)


def noised_latents(
    W: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, seed: torch.Tensor
) -> torch.Tensor:
    """``z[t, i] = a[t, i] * W[y_i] + b[t, i] * eps[t, i]`` with ``eps = normal(seed, (T, B, D))``.

    Shapes: ``W [C, D]``, ``y [B]`` int64, ``a, b [T, B]``, ``seed [1]``; returns ``z [T, B, D]``.
    """
    T, B = a.shape
    eps = normal(seed, (T, B, W.shape[1]))
    return a.unsqueeze(-1) * W[y] + b.unsqueeze(-1) * eps.to(W.dtype)


def denoising_loss(
    logits: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    noise_coef: torch.Tensor | None,
    seed: torch.Tensor | None,
    readout_kind: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SNR-weighted L2 between the read-out embedding and the (optionally noised) target.

    ``u_hat[t, i] = readout(logits[t, i]) @ W``, ``target[t, i] = W[y_i] + c[t, i] * eps[t, i]``
    (no noise term when ``noise_coef`` is None), and the loss is
    ``sum_{t, i} weight[t, i] * ||u_hat[t, i] - target[t, i]||^2 / B``.

    Shapes: ``logits [T, B, C]``, ``W [C, D]``, ``y [B]``, ``weight, noise_coef [T, B]``;
    returns ``(loss, row_sq_error)``: the scalar loss and the detached per-row squared errors
    ``||u_hat[t, i] - target[t, i]||^2`` ``[T, B]``.
    """
    T, B, _ = logits.shape
    probs = readout(logits, readout_kind)
    W = W.to(probs.dtype)
    u_hat = probs @ W
    target = W[y]
    if noise_coef is not None:
        target = target + noise_coef.unsqueeze(-1) * normal(seed, (T, B, W.shape[1])).to(W.dtype)
    squared_error = (u_hat - target).square().sum(dim=-1)
    return (weight.to(W.dtype) * squared_error).sum() / B, squared_error.detach()


def latent_update(
    logits: torch.Tensor,
    W: torch.Tensor,
    z: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    r: torch.Tensor,
    seed: torch.Tensor,
    readout_kind: str,
) -> torch.Tensor:
    """``z_new = p * readout(logits) @ W + q * z + r * normal(seed, z.shape)``.

    Shapes: ``logits [N, C]``, ``W [C, D]``, ``z [N, D]``, ``p, q, r [N]``; returns ``[N, D]``
    in ``z``'s dtype.
    """
    probs = readout(logits, readout_kind)
    u_hat = probs @ W.to(probs.dtype)
    eps = normal(seed, tuple(z.shape))
    z_new = p.unsqueeze(-1) * u_hat + q.unsqueeze(-1) * _upcast(z) + r.unsqueeze(-1) * eps
    return z_new.to(z.dtype)


def stacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """T linear layers in one batched product: ``y[t] = x[t] @ weight[t] + bias[t]``.

    Shapes: ``x [T, B, I]``, ``weight [T, I, O]``, ``bias [T, O]``; returns ``y [T, B, O]``.
    """
    return torch.baddbmm(bias.unsqueeze(1), x, weight)


def conv_epilogue(
    x: torch.Tensor,
    seed: torch.Tensor,
    p: float,
    pooled: bool,
    blocks: int,
    block_offset: int,
    row_offset: int,
    stream: int,
    contiguous_output: bool,
) -> torch.Tensor:
    """The tail of a conv stage: ``y = dropout(relu(maxpool2(x)))`` (``maxpool2`` only if ``pooled``).

    Shapes: ``x [B, blocks * C, H, W]`` (block ``j``'s channels are ``j * C .. (j + 1) * C``), ``seed [1]``;
    returns ``y [B, blocks * C, H', W']`` with ``H', W' = H // 2, W // 2`` (pooled) or ``H, W``. A value is
    kept where :func:`noprop.rng.dropout_keep` says so (rows from ``row_offset``, blocks from
    ``block_offset``) and scaled by ``1 / (1 - p)``. ``y`` keeps ``x``'s memory format unless
    ``contiguous_output``.
    """
    h = torch.nn.functional.max_pool2d(x, 2) if pooled else x
    y = torch.relu(h)
    if p > 0:
        B, channels, height, width = y.shape
        keep = rng.dropout_keep(seed, p, (B, blocks, channels // blocks, height, width), row_offset, block_offset, stream)
        scale = 1.0 / (1.0 - p) if p < 1 else 0.0
        y = torch.where(keep.reshape(y.shape), y * scale, torch.zeros((), dtype=y.dtype, device=y.device))
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last and not contiguous_output else torch.contiguous_format
    return y.contiguous(memory_format=fmt)
