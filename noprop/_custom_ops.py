"""``torch.library`` registration of the fused ops (``noprop::*``) with fake kernels and autograd.

Every op takes the name of a ``kind="kernels"`` backend as its last argument and forwards to that
backend's implementation module (:func:`noprop.backends.implementation`), which follows
:class:`noprop.backends.KernelImplementation`: :mod:`noprop.kernels` (Triton), :mod:`noprop._ext`
(the C++/CUDA extension) or any registered backend. The protocol's docstring lists every function
with its normalised inputs and outputs.

``row_sq_error[t, i] = ||u_hat[t, i] - target[t, i]||^2`` is the per-row error the loss forward
saves so the weight gradient ``row_sq_error * grad_loss / B`` needs no second pass. Nothing of size
``T * B * D`` is saved for the backward: the noise is regenerated from the seed. ``latent_update``
and ``stacked_linear`` save their inputs only. ``conv_epilogue`` saves its output ``y`` (which the
next layer keeps anyway) and a one-byte argmax per pooled element, and never its input or a mask.

The annotations stay real objects (no ``from __future__ import annotations``): ``custom_op``
infers each schema from them, and older torch releases (2.4) may not resolve string annotations.
"""

from types import ModuleType
from typing import List, Optional

import torch
from torch import Tensor

from noprop import backends


def _backend_module(backend: str) -> ModuleType:
    return backends.implementation(backend)


def _empty_if(needed: bool, like: Tensor) -> Tensor:
    return torch.empty_like(like) if needed else like.new_empty((0,))


# ---------------------------------------------------------------------------------------------- normal


@torch.library.custom_op("noprop::normal", mutates_args=())
def normal(seed: Tensor, shape: List[int], offset: int, backend: str) -> Tensor:
    """Noise-contract normals on a fused backend (see :func:`noprop.ops.normal`)."""
    return _backend_module(backend).normal(seed, tuple(shape), offset)


@normal.register_fake
def _normal_fake(seed: Tensor, shape: List[int], offset: int, backend: str) -> Tensor:
    return seed.new_empty(shape, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- noised_latents


@torch.library.custom_op("noprop::noised_latents", mutates_args=())
def noised_latents(W: Tensor, y: Tensor, a: Tensor, b: Tensor, seed: Tensor, backend: str) -> Tensor:
    """``z[t, i] = a[t, i] W[y_i] + b[t, i] eps[t, i]`` on a fused backend (see :func:`noprop.ops.noised_latents`)."""
    return _backend_module(backend).noised_latents_forward(W, y, a, b, seed)


@noised_latents.register_fake
def _noised_latents_fake(W: Tensor, y: Tensor, a: Tensor, b: Tensor, seed: Tensor, backend: str) -> Tensor:
    return W.new_empty((a.shape[0], y.shape[0], W.shape[1]))


@torch.library.custom_op("noprop::noised_latents_backward", mutates_args=())
def noised_latents_backward(
    grad_z: Tensor,
    W: Tensor,
    y: Tensor,
    a: Tensor,
    b: Tensor,
    seed: Tensor,
    backend: str,
    needs_W: bool,
    needs_a: bool,
    needs_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`noised_latents` for ``W``, ``a`` and ``b``, regenerating the noise."""
    gW, ga, gb = _backend_module(backend).noised_latents_backward(grad_z, W, y, a, b, seed, needs_W, needs_a, needs_b)
    return gW, ga, gb


@noised_latents_backward.register_fake
def _noised_latents_backward_fake(grad_z, W, y, a, b, seed, backend, needs_W, needs_a, needs_b):
    return _empty_if(needs_W, W), _empty_if(needs_a, a), _empty_if(needs_b, b)


def _noised_latents_setup(ctx, inputs, output) -> None:
    W, y, a, b, seed, backend = inputs
    ctx.save_for_backward(W, y, a, b, seed)
    ctx.backend = backend


def _noised_latents_grad(ctx, grad_z: Tensor):
    W, y, a, b, seed = ctx.saved_tensors
    needs_W, _, needs_a, needs_b = ctx.needs_input_grad[:4]
    gW, ga, gb = noised_latents_backward(grad_z.contiguous(), W, y, a, b, seed, ctx.backend, needs_W, needs_a, needs_b)
    return (gW if needs_W else None, None, ga if needs_a else None, gb if needs_b else None, None, None)


noised_latents.register_autograd(_noised_latents_grad, setup_context=_noised_latents_setup)


# ---------------------------------------------------------------------------------------------- denoising_loss


@torch.library.custom_op("noprop::denoising_loss", mutates_args=())
def denoising_loss(
    logits: Tensor,
    W: Tensor,
    y: Tensor,
    weight: Tensor,
    noise_coef: Optional[Tensor],
    seed: Optional[Tensor],
    readout: str,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``(loss, row_sq_error)`` of the weighted denoising loss (see :func:`noprop.ops.denoising_loss`)."""
    loss, row_sq_error = _backend_module(backend).denoising_loss_forward(logits, W, y, weight, noise_coef, seed, readout)
    return loss, row_sq_error


@denoising_loss.register_fake
def _denoising_loss_fake(logits, W, y, weight, noise_coef, seed, readout, backend):
    T, B, _ = logits.shape
    return logits.new_empty((), dtype=torch.float32), logits.new_empty((T, B), dtype=torch.float32)


@torch.library.custom_op("noprop::denoising_loss_backward", mutates_args=())
def denoising_loss_backward(
    grad_loss: Tensor,
    logits: Tensor,
    W: Tensor,
    y: Tensor,
    weight: Tensor,
    noise_coef: Optional[Tensor],
    seed: Optional[Tensor],
    readout: str,
    backend: str,
    needs_W: bool,
) -> tuple[Tensor, Tensor]:
    """Gradients of the denoising loss for ``logits`` and ``W``, regenerating the noise."""
    glogits, gW = _backend_module(backend).denoising_loss_backward(
        grad_loss, logits, W, y, weight, noise_coef, seed, readout, needs_W
    )
    return glogits, gW


@denoising_loss_backward.register_fake
def _denoising_loss_backward_fake(grad_loss, logits, W, y, weight, noise_coef, seed, readout, backend, needs_W):
    return torch.empty_like(logits), _empty_if(needs_W, W)


def _denoising_loss_setup(ctx, inputs, output) -> None:
    logits, W, y, weight, noise_coef, seed, readout, backend = inputs
    _, row_sq_error = output
    ctx.mark_non_differentiable(row_sq_error)
    ctx.save_for_backward(logits, W, y, weight, noise_coef, seed, row_sq_error)
    ctx.readout = readout
    ctx.backend = backend


def _denoising_loss_grad(ctx, grad_loss: Tensor, _grad_row_sq_error: Optional[Tensor]):
    logits, W, y, weight, noise_coef, seed, row_sq_error = ctx.saved_tensors
    needs_logits, needs_W, _, needs_weight = ctx.needs_input_grad[:4]
    glogits = gW = gweight = None
    if needs_logits or needs_W:
        glogits, gW = denoising_loss_backward(
            grad_loss.float().contiguous(), logits, W, y, weight, noise_coef, seed, ctx.readout, ctx.backend, needs_W
        )
    if needs_weight:
        gweight = row_sq_error * (grad_loss.float() / logits.shape[1])
    return (glogits if needs_logits else None, gW if needs_W else None, None, gweight, None, None, None, None)


denoising_loss.register_autograd(_denoising_loss_grad, setup_context=_denoising_loss_setup)


# ---------------------------------------------------------------------------------------------- latent_update


@torch.library.custom_op("noprop::latent_update", mutates_args=())
def latent_update(
    logits: Tensor, W: Tensor, z: Tensor, p: Tensor, q: Tensor, r: Tensor, seed: Tensor, readout: str, backend: str
) -> Tensor:
    """``z_new = p readout(logits) @ W + q z + r eps`` on a fused backend (see :func:`noprop.ops.latent_update`)."""
    return _backend_module(backend).latent_update_forward(logits, W, z, p, q, r, seed, readout)


@latent_update.register_fake
def _latent_update_fake(logits, W, z, p, q, r, seed, readout, backend):
    return torch.empty_like(z)


@torch.library.custom_op("noprop::latent_update_backward", mutates_args=())
def latent_update_backward(
    grad: Tensor,
    logits: Tensor,
    W: Tensor,
    z: Tensor,
    p: Tensor,
    q: Tensor,
    r: Tensor,
    seed: Tensor,
    readout: str,
    backend: str,
    needs_logits: bool,
    needs_W: bool,
    needs_z: bool,
    needs_p: bool,
    needs_q: bool,
    needs_r: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`latent_update` for ``logits, W, z, p, q, r``, regenerating the noise."""
    glogits, gW, gz, gp, gq, gr = _backend_module(backend).latent_update_backward(
        grad, logits, W, z, p, q, r, seed, readout, needs_logits, needs_W, needs_z, needs_p, needs_q, needs_r
    )
    return glogits, gW, gz, gp, gq, gr


@latent_update_backward.register_fake
def _latent_update_backward_fake(
    grad, logits, W, z, p, q, r, seed, readout, backend, needs_logits, needs_W, needs_z, needs_p, needs_q, needs_r
):
    return (
        _empty_if(needs_logits, logits),
        _empty_if(needs_W, W),
        _empty_if(needs_z, z),
        _empty_if(needs_p, p),
        _empty_if(needs_q, q),
        _empty_if(needs_r, r),
    )


def _latent_update_setup(ctx, inputs, output) -> None:
    logits, W, z, p, q, r, seed, readout, backend = inputs
    ctx.save_for_backward(logits, W, z, p, q, r, seed)
    ctx.readout = readout
    ctx.backend = backend


def _latent_update_grad(ctx, grad: Tensor):
    needs = ctx.needs_input_grad[:6]  # logits, W, z, p, q, r
    grads = (None,) * 6
    if any(needs):
        grads = latent_update_backward(grad.contiguous(), *ctx.saved_tensors, ctx.readout, ctx.backend, *needs)
    return (*(g if needed else None for g, needed in zip(grads, needs)), None, None, None)


latent_update.register_autograd(_latent_update_grad, setup_context=_latent_update_setup)


# ---------------------------------------------------------------------------------------------- stacked_linear


@torch.library.custom_op("noprop::stacked_linear", mutates_args=())
def stacked_linear(x: Tensor, weight: Tensor, bias: Tensor, backend: str) -> Tensor:
    """``y[t] = x[t] @ weight[t] + bias[t]`` on a kernel backend (see :func:`noprop.ops.stacked_linear`)."""
    return _backend_module(backend).stacked_linear_forward(x, weight, bias)


@stacked_linear.register_fake
def _stacked_linear_fake(x: Tensor, weight: Tensor, bias: Tensor, backend: str) -> Tensor:
    return x.new_empty((x.shape[0], x.shape[1], weight.shape[2]))


@torch.library.custom_op("noprop::stacked_linear_backward", mutates_args=())
def stacked_linear_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, backend: str, needs_input: bool, needs_params: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dW, db)`` of :func:`stacked_linear`."""
    dx, dW, db = _backend_module(backend).stacked_linear_backward(grad_y, x, weight, needs_input, needs_params)
    return dx, dW, db


@stacked_linear_backward.register_fake
def _stacked_linear_backward_fake(grad_y, x, weight, backend, needs_input, needs_params):
    T, _, O = grad_y.shape
    dW = weight.new_empty((T, weight.shape[1], O)) if needs_params else x.new_empty((0,))
    db = weight.new_empty((T, O)) if needs_params else x.new_empty((0,))
    return _empty_if(needs_input, x), dW, db


def _stacked_linear_setup(ctx, inputs, output) -> None:
    x, weight, _, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.backend = backend


def _stacked_linear_grad(ctx, grad_y: Tensor):
    x, weight = ctx.saved_tensors
    needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    dx, dW, db = stacked_linear_backward(grad_y, x, weight, ctx.backend, needs_x, needs_weight or needs_bias)
    return (dx if needs_x else None, dW if needs_weight else None, db if needs_bias else None, None)


stacked_linear.register_autograd(_stacked_linear_grad, setup_context=_stacked_linear_setup)


# ---------------------------------------------------------------------------------------------- conv_epilogue


def _epilogue_output(x: Tensor, pooled: bool, contiguous_output: bool) -> tuple[list[int], torch.memory_format]:
    B, K, H, W = x.shape
    shape = [B, K, H // 2, W // 2] if pooled else [B, K, H, W]
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last and not contiguous_output else torch.contiguous_format
    return shape, fmt


@torch.library.custom_op("noprop::conv_epilogue", mutates_args=())
def conv_epilogue(
    x: Tensor, seed: Tensor, p: float, pooled: bool, blocks: int, block_offset: int, row_offset: int, stream: int,
    contiguous_output: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    """``(y, argmax)`` of ``y = dropout(relu(maxpool2(x)))`` on a kernel backend (see :func:`noprop.ops.conv_epilogue`)."""
    y, argmax = _backend_module(backend).conv_epilogue_forward(
        x, seed, p, pooled, blocks, block_offset, row_offset, stream, contiguous_output
    )
    return y, argmax


@conv_epilogue.register_fake
def _conv_epilogue_fake(x, seed, p, pooled, blocks, block_offset, row_offset, stream, contiguous_output, backend):
    shape, fmt = _epilogue_output(x, pooled, contiguous_output)
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    argmax = torch.empty(shape, dtype=torch.uint8, device=x.device, memory_format=fmt) if pooled else x.new_empty((0,), dtype=torch.uint8)
    return y, argmax


@torch.library.custom_op("noprop::conv_epilogue_backward", mutates_args=())
def conv_epilogue_backward(
    grad_y: Tensor, y: Tensor, argmax: Tensor, p: float, pooled: bool, height: int, width: int, channels_last: bool,
    backend: str,
) -> Tensor:
    """``grad_x`` of :func:`conv_epilogue` from the saved ``y`` (``y > 0``: kept and positive) and 2-bit argmax."""
    return _backend_module(backend).conv_epilogue_backward(grad_y, y, argmax, p, pooled, height, width, channels_last)


@conv_epilogue_backward.register_fake
def _conv_epilogue_backward_fake(grad_y, y, argmax, p, pooled, height, width, channels_last, backend):
    shape = [y.shape[0], y.shape[1], height, width]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=fmt)


def _conv_epilogue_setup(ctx, inputs, output) -> None:
    x, _, p, pooled, *_, backend = inputs
    y, argmax = output
    ctx.save_for_backward(y, argmax)
    ctx.mark_non_differentiable(argmax)
    ctx.p, ctx.pooled, ctx.backend = p, pooled, backend
    ctx.height, ctx.width = x.shape[2], x.shape[3]
    ctx.channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _conv_epilogue_grad(ctx, grad_y: Tensor, _grad_argmax: Optional[Tensor]):
    y, argmax = ctx.saved_tensors
    grad_x = conv_epilogue_backward(
        grad_y, y, argmax, ctx.p, ctx.pooled, ctx.height, ctx.width, ctx.channels_last, ctx.backend
    )
    return (grad_x,) + (None,) * 9


conv_epilogue.register_autograd(_conv_epilogue_grad, setup_context=_conv_epilogue_setup)
