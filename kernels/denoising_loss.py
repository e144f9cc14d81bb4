"""The weighted denoising loss of all T blocks from their logits: one forward and one backward launch.

Per row ``n = t * B + i``: ``u_hat[n] = readout(logits[n]) @ W``,
``target[n] = W[y_i] + noise_coef[n] * eps[n]`` (no noise term without ``noise_coef``),
``row_sq_error[n] = ||u_hat[n] - target[n]||^2`` and ``loss = sum_n weight[n] * row_sq_error[n] / B``.

A program takes a tile of rows, reads their logits once and walks the embedding dimension in
chunks: the residual ``u_hat - target = (readout(logits) - onehot(y)) @ W[:, chunk] - noise_coef *
eps[:, chunk]`` exists one chunk at a time, in registers, with ``eps`` drawn in-kernel. The
backward recomputes it chunk by chunk instead of saving anything of size ``T * B * D``. When ``W``
fits in one chunk (small ``D``) a program loads it once, takes several row tiles, and sums its
share of ``gW`` (and of the loss) before one atomic add per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    add_to_weight_gradient,
    store_class_tile,
    DOT_PRECISION,
    LOSS_BACKWARD_TILE,
    LOSS_FORWARD_TILE,
    launches_on_input_device,
    load_class_weights,
    load_embedding_chunk,
    randn_contract,
    readout_backward,
    row_tiling,
)


@triton.jit
def _chunk_residual(
    weights_minus_onehot, embedding_chunk, noise_coef, seed, rows, mask, cols, dim, HAS_NOISE: tl.constexpr,
):
    """``(u_hat - target)[rows, cols]``, zero where masked.

    ``u_hat - W[y] = (readout(logits) - onehot(y)) @ W``: the label rows come out of the same
    product as ``u_hat`` (no gather, and no cancellation between two nearly equal vectors).
    """
    residual = tl.dot(weights_minus_onehot, embedding_chunk, input_precision=DOT_PRECISION)
    if HAS_NOISE:
        residual -= noise_coef[:, None] * randn_contract(seed, rows[:, None] * dim + cols[None, :])
    return tl.where(mask, residual, 0.0)


@triton.jit
def _load_row_tile(
    logits_ptr, y_ptr, noise_coef_ptr, rows, row_mask, batch, num_classes,
    BLOCK_C: tl.constexpr, SOFTMAX: tl.constexpr, HAS_NOISE: tl.constexpr,
):
    """``(readout(logits[rows]), readout(logits[rows]) - onehot(y), noise_coef[rows])`` for a tile of rows."""
    class_weights = load_class_weights(logits_ptr, rows, row_mask, num_classes, BLOCK_C, SOFTMAX)
    labels = tl.load(y_ptr + rows % batch, mask=row_mask, other=0)
    onehot = (labels[:, None] == tl.arange(0, BLOCK_C)[None, :]).to(tl.float32)
    noise_coef = tl.load(noise_coef_ptr + rows, mask=row_mask, other=0.0) if HAS_NOISE else 0.0
    return class_weights, class_weights - onehot, noise_coef


@triton.jit
def _denoising_loss_forward_kernel(
    logits_ptr, W_ptr, y_ptr, weight_ptr, noise_coef_ptr, seed_ptr,
    loss_ptr, row_sq_error_ptr,
    num_rows, batch, num_classes, dim,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, TILES_PER_PROGRAM: tl.constexpr,
    SOFTMAX: tl.constexpr, HAS_NOISE: tl.constexpr, SINGLE_CHUNK: tl.constexpr,
):
    seed = tl.load(seed_ptr) if HAS_NOISE else 0
    if SINGLE_CHUNK:  # all of W fits in one chunk: load it once for all the program's tiles
        resident_chunk = load_embedding_chunk(W_ptr, num_classes, dim, tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_D) < dim, BLOCK_C)
    weighted_error = tl.zeros([BLOCK_N], dtype=tl.float32)
    for tile in range(TILES_PER_PROGRAM):
        rows = (tl.program_id(0).to(tl.int64) * TILES_PER_PROGRAM + tile) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < num_rows
        _, weights_minus_onehot, noise_coef = _load_row_tile(
            logits_ptr, y_ptr, noise_coef_ptr, rows, row_mask, batch, num_classes, BLOCK_C, SOFTMAX, HAS_NOISE
        )
        sq_error = tl.zeros([BLOCK_N], dtype=tl.float32)
        for col_start in range(0, dim, BLOCK_D):
            cols = col_start + tl.arange(0, BLOCK_D)
            col_mask = cols < dim
            if SINGLE_CHUNK:
                embedding_chunk = resident_chunk
            else:
                embedding_chunk = load_embedding_chunk(W_ptr, num_classes, dim, cols, col_mask, BLOCK_C)
            residual = _chunk_residual(
                weights_minus_onehot, embedding_chunk, noise_coef, seed, rows,
                row_mask[:, None] & col_mask[None, :], cols, dim, HAS_NOISE,
            )
            sq_error += tl.sum(residual * residual, axis=1)
        tl.store(row_sq_error_ptr + rows, sq_error, mask=row_mask)
        weighted_error += tl.load(weight_ptr + rows, mask=row_mask, other=0.0) * sq_error
    tl.atomic_add(loss_ptr, tl.sum(weighted_error, axis=0) / batch, sem="relaxed")


@launches_on_input_device
def denoising_loss_forward(
    logits: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    noise_coef: torch.Tensor | None,
    seed: torch.Tensor | None,
    readout: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted denoising loss of all T blocks and each row's squared error, in one launch.

    ``row_sq_error[t, i] = ||readout(logits[t, i]) @ W - W[y_i] - noise_coef[t, i] * eps[t, i]||^2``
    with ``eps[t, i, d] = randn_contract(seed, (t * B + i) * D + d)`` (the noise of the noised latents;
    no noise term when ``noise_coef`` is None) and ``loss = sum(weight * row_sq_error) / B``.

    Args:
        logits: ``[T, B, C]`` (float32, or float16/bfloat16 on CUDA; read as float32).
        W: ``[C, D]``; y: int64 ``[B]``; weight: float32 ``[T, B]``.
        noise_coef: float32 ``[T, B]`` or None; seed: int64 ``[1]`` (used only with ``noise_coef``).
        readout: ``"softmax"`` or ``"linear"``.

    Returns:
        ``(loss, row_sq_error)``: a 0-dim float32 tensor and float32 ``[T, B]``.
    """
    T, B, C = logits.shape
    D = W.shape[1]
    num_rows = T * B
    # the programs add to it; with B = 0 the sum over no examples divided by B is NaN (0 / 0)
    loss = torch.full((), float("nan") if B == 0 else 0.0, dtype=torch.float32, device=logits.device)
    row_sq_error = torch.empty((T, B), dtype=torch.float32, device=logits.device)
    if num_rows:
        tiling = row_tiling(num_rows, C, D, LOSS_FORWARD_TILE)
        _denoising_loss_forward_kernel[(tiling.num_programs,)](
            logits, W, y, weight, noise_coef, seed, loss, row_sq_error,
            num_rows, B, C, D,
            BLOCK_N=tiling.block_rows, BLOCK_C=tiling.block_classes, BLOCK_D=tiling.block_cols,
            TILES_PER_PROGRAM=tiling.tiles_per_program,
            SOFTMAX=readout == "softmax", HAS_NOISE=noise_coef is not None, SINGLE_CHUNK=tiling.single_chunk,
            num_warps=tiling.num_warps,
        )
    return loss, row_sq_error


@triton.jit
def _denoising_loss_backward_kernel(
    grad_loss_ptr, logits_ptr, W_ptr, y_ptr, weight_ptr, noise_coef_ptr, seed_ptr,
    glogits_ptr, gW_ptr,
    num_rows, batch, num_classes, dim,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, TILES_PER_PROGRAM: tl.constexpr,
    SOFTMAX: tl.constexpr, HAS_NOISE: tl.constexpr, NEEDS_W: tl.constexpr, SINGLE_CHUNK: tl.constexpr,
):
    seed = tl.load(seed_ptr) if HAS_NOISE else 0
    grad_scale = tl.load(grad_loss_ptr) * 2.0 / batch  # dL/du_hat[n] = grad_scale * weight[n] * (u_hat - target)
    if SINGLE_CHUNK:  # all of W fits in one chunk: load it once, and sum gW over all the program's tiles
        resident_chunk = load_embedding_chunk(W_ptr, num_classes, dim, tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_D) < dim, BLOCK_C)
        if NEEDS_W:
            gW_acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    for tile in range(TILES_PER_PROGRAM):
        rows = (tl.program_id(0).to(tl.int64) * TILES_PER_PROGRAM + tile) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < num_rows
        class_weights, weights_minus_onehot, noise_coef = _load_row_tile(
            logits_ptr, y_ptr, noise_coef_ptr, rows, row_mask, batch, num_classes, BLOCK_C, SOFTMAX, HAS_NOISE
        )
        row_scale = grad_scale * tl.load(weight_ptr + rows, mask=row_mask, other=0.0)
        grad_class_weights = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        for col_start in range(0, dim, BLOCK_D):
            cols = col_start + tl.arange(0, BLOCK_D)
            col_mask = cols < dim
            if SINGLE_CHUNK:
                embedding_chunk = resident_chunk
            else:
                embedding_chunk = load_embedding_chunk(W_ptr, num_classes, dim, cols, col_mask, BLOCK_C)
            residual = _chunk_residual(
                weights_minus_onehot, embedding_chunk, noise_coef, seed, rows,
                row_mask[:, None] & col_mask[None, :], cols, dim, HAS_NOISE,
            )
            grad_u_hat = row_scale[:, None] * residual
            grad_class_weights += tl.dot(grad_u_hat, tl.trans(embedding_chunk), input_precision=DOT_PRECISION)
            if NEEDS_W:
                # u_hat - W[y] = (P - onehot(y)) @ W, so dL/dW = (P - onehot(y))^T @ G
                grad_W_chunk = tl.dot(tl.trans(weights_minus_onehot), grad_u_hat, input_precision=DOT_PRECISION)
                if SINGLE_CHUNK:
                    gW_acc += grad_W_chunk
                else:
                    add_to_weight_gradient(gW_ptr, grad_W_chunk, num_classes, dim, cols, col_mask, BLOCK_C)
        grad_logits = readout_backward(class_weights, grad_class_weights, SOFTMAX)
        store_class_tile(glogits_ptr, grad_logits, rows, row_mask, num_classes, BLOCK_C)
    if SINGLE_CHUNK and NEEDS_W:
        cols = tl.arange(0, BLOCK_D)
        add_to_weight_gradient(gW_ptr, gW_acc, num_classes, dim, cols, cols < dim, BLOCK_C)


@launches_on_input_device
def denoising_loss_backward(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    noise_coef: torch.Tensor | None,
    seed: torch.Tensor | None,
    readout: str,
    needs_W: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`denoising_loss_forward` for the logits and ``W``, in one launch.

    With ``G[n] = 2 * grad_loss * weight[n] * (u_hat[n] - target[n]) / B`` (recomputed chunk by
    chunk, the noise regenerated from ``seed``): ``dP = G @ W^T``;
    ``glogits = P * (dP - sum(P * dP))`` for the softmax readout, ``dP`` for the linear one; and
    ``gW = sum_n (P[n] - onehot(y_n))^T G[n]``, reduced over a program's rows with ``tl.dot`` and
    added atomically into a float32 buffer: once per program when ``W`` fits in one column chunk,
    once per row tile and chunk otherwise. The gradient of ``weight``
    (``row_sq_error * grad_loss / B``) is not computed here.

    Args:
        grad_loss: 0-dim float32 upstream gradient, on the device (read in-kernel).
        logits, W, y, weight, noise_coef, seed, readout: as in :func:`denoising_loss_forward`.
        needs_W: compute ``gW``.

    Returns:
        ``(glogits [T, B, C] in logits' dtype, gW [C, D] in W's dtype, or an empty tensor when not needed)``.
    """
    T, B, C = logits.shape
    D = W.shape[1]
    num_rows = T * B
    glogits = torch.empty_like(logits)
    gW = torch.zeros((C, D), dtype=torch.float32, device=W.device) if needs_W else W.new_empty(0)
    if num_rows:
        tiling = row_tiling(num_rows, C, D, LOSS_BACKWARD_TILE)
        _denoising_loss_backward_kernel[(tiling.num_programs,)](
            grad_loss, logits, W, y, weight, noise_coef, seed, glogits, gW,
            num_rows, B, C, D,
            BLOCK_N=tiling.block_rows, BLOCK_C=tiling.block_classes, BLOCK_D=tiling.block_cols,
            TILES_PER_PROGRAM=tiling.tiles_per_program,
            SOFTMAX=readout == "softmax", HAS_NOISE=noise_coef is not None,
            NEEDS_W=needs_W, SINGLE_CHUNK=tiling.single_chunk,
            num_warps=tiling.num_warps,
        )
    if needs_W and W.dtype != torch.float32:
        gW = gW.to(W.dtype)
    return glogits, gW
