"""The step on the latent, ``z_new = p * readout(logits) @ W + q * z + r * eps``: one forward and one backward launch.

The forward serves inference (DT, CT, FM) and the back-propagation baseline's recursion
``z_t = (1 - alpha_t) z_{t-1} + alpha_t u_hat_t``, which trains through it; the backward
regenerates ``eps`` from the seed instead of saving it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    add_to_weight_gradient,
    store_class_tile,
    DOT_PRECISION,
    LATENT_UPDATE_BACKWARD_TILE,
    LATENT_UPDATE_TILE,
    launches_on_input_device,
    load_class_weights,
    load_embedding_chunk,
    randn_contract,
    readout_backward,
    row_tiling,
)


@triton.jit
def _latent_update_kernel(
    logits_ptr, W_ptr, z_ptr, p_ptr, q_ptr, r_ptr, seed_ptr, z_new_ptr,
    num_rows, num_classes, dim,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, TILES_PER_PROGRAM: tl.constexpr,
    SOFTMAX: tl.constexpr, SINGLE_CHUNK: tl.constexpr,
):
    seed = tl.load(seed_ptr)
    if SINGLE_CHUNK:  # all of W fits in one chunk: load it once for all the program's tiles
        resident_chunk = load_embedding_chunk(W_ptr, num_classes, dim, tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_D) < dim, BLOCK_C)
    for tile in range(TILES_PER_PROGRAM):
        rows = (tl.program_id(0).to(tl.int64) * TILES_PER_PROGRAM + tile) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < num_rows
        class_weights = load_class_weights(logits_ptr, rows, row_mask, num_classes, BLOCK_C, SOFTMAX)
        p = tl.load(p_ptr + rows, mask=row_mask, other=0.0)[:, None]
        q = tl.load(q_ptr + rows, mask=row_mask, other=0.0)[:, None]
        r = tl.load(r_ptr + rows, mask=row_mask, other=0.0)[:, None]
        for col_start in range(0, dim, BLOCK_D):
            cols = col_start + tl.arange(0, BLOCK_D)
            col_mask = cols < dim
            mask = row_mask[:, None] & col_mask[None, :]
            if SINGLE_CHUNK:
                embedding_chunk = resident_chunk
            else:
                embedding_chunk = load_embedding_chunk(W_ptr, num_classes, dim, cols, col_mask, BLOCK_C)
            u_hat = tl.dot(class_weights, embedding_chunk, input_precision=DOT_PRECISION)
            index = rows[:, None] * dim + cols[None, :]  # the element's address and its noise counter
            z = tl.load(z_ptr + index, mask=mask, other=0.0).to(tl.float32)
            z_new = p * u_hat + q * z + r * randn_contract(seed, index)
            tl.store(z_new_ptr + index, z_new.to(z_new_ptr.dtype.element_ty), mask=mask)


@launches_on_input_device
def latent_update_forward(
    logits: torch.Tensor,
    W: torch.Tensor,
    z: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    r: torch.Tensor,
    seed: torch.Tensor,
    readout: str,
) -> torch.Tensor:
    """One step on the latent: ``z_new[n] = p[n] * readout(logits[n]) @ W + q[n] * z[n] + r[n] * eps[n]``.

    ``eps[n, d] = randn_contract(seed, n * D + d)``, always drawn (whether ``r`` is zero is not known on
    the host without a synchronisation). Its gradients: :func:`latent_update_backward`.

    Args:
        logits: ``[N, C]``; W: ``[C, D]``; z: ``[N, D]``; p, q, r: float32 ``[N]``; seed: int64 ``[1]``.
        readout: ``"softmax"`` or ``"linear"``.

    Returns:
        ``z_new [N, D]`` in ``z``'s dtype.
    """
    N, C = logits.shape
    D = W.shape[1]
    z_new = torch.empty_like(z)
    if z_new.numel():
        tiling = row_tiling(N, C, D, LATENT_UPDATE_TILE)
        _latent_update_kernel[(tiling.num_programs,)](
            logits, W, z, p, q, r, seed, z_new,
            N, C, D,
            BLOCK_N=tiling.block_rows, BLOCK_C=tiling.block_classes, BLOCK_D=tiling.block_cols,
            TILES_PER_PROGRAM=tiling.tiles_per_program,
            SOFTMAX=readout == "softmax", SINGLE_CHUNK=tiling.single_chunk,
            num_warps=tiling.num_warps,
        )
    return z_new


@triton.jit
def _latent_update_backward_kernel(
    grad_ptr, logits_ptr, W_ptr, z_ptr, p_ptr, q_ptr, seed_ptr,
    glogits_ptr, gW_ptr, gz_ptr, gp_ptr, gq_ptr, gr_ptr,
    num_rows, num_classes, dim,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, TILES_PER_PROGRAM: tl.constexpr,
    SOFTMAX: tl.constexpr, SINGLE_CHUNK: tl.constexpr,
    NEEDS_LOGITS: tl.constexpr, NEEDS_W: tl.constexpr, NEEDS_Z: tl.constexpr,
    NEEDS_P: tl.constexpr, NEEDS_Q: tl.constexpr, NEEDS_R: tl.constexpr,
):
    seed = tl.load(seed_ptr) if NEEDS_R else 0
    if SINGLE_CHUNK:  # all of W fits in one chunk: load it once, and sum gW over all the program's tiles
        resident_chunk = load_embedding_chunk(W_ptr, num_classes, dim, tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_D) < dim, BLOCK_C)
        if NEEDS_W:
            gW_acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    for tile in range(TILES_PER_PROGRAM):
        rows = (tl.program_id(0).to(tl.int64) * TILES_PER_PROGRAM + tile) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < num_rows
        # masked rows read g = 0 and p = 0, so they add nothing to gW
        class_weights = load_class_weights(logits_ptr, rows, row_mask, num_classes, BLOCK_C, SOFTMAX)
        p = tl.load(p_ptr + rows, mask=row_mask, other=0.0)
        q = tl.load(q_ptr + rows, mask=row_mask, other=0.0)
        scaled_weights = p[:, None] * class_weights  # d z_new / d u_hat = p: dW = (p s)^T g
        grad_class_weights = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        gp = tl.zeros([BLOCK_N], dtype=tl.float32)
        gq = tl.zeros([BLOCK_N], dtype=tl.float32)
        gr = tl.zeros([BLOCK_N], dtype=tl.float32)
        for col_start in range(0, dim, BLOCK_D):
            cols = col_start + tl.arange(0, BLOCK_D)
            col_mask = cols < dim
            mask = row_mask[:, None] & col_mask[None, :]
            if SINGLE_CHUNK:
                embedding_chunk = resident_chunk
            else:
                embedding_chunk = load_embedding_chunk(W_ptr, num_classes, dim, cols, col_mask, BLOCK_C)
            index = rows[:, None] * dim + cols[None, :]  # the element's address and its noise counter
            grad = tl.load(grad_ptr + index, mask=mask, other=0.0).to(tl.float32)
            if NEEDS_Z:
                tl.store(gz_ptr + index, (q[:, None] * grad).to(gz_ptr.dtype.element_ty), mask=mask)
            if NEEDS_P:
                u_hat = tl.dot(class_weights, embedding_chunk, input_precision=DOT_PRECISION)
                gp += tl.sum(grad * u_hat, axis=1)
            if NEEDS_Q:
                gq += tl.sum(grad * tl.load(z_ptr + index, mask=mask, other=0.0).to(tl.float32), axis=1)
            if NEEDS_R:
                gr += tl.sum(grad * randn_contract(seed, index), axis=1)
            if NEEDS_LOGITS:
                grad_class_weights += tl.dot(grad, tl.trans(embedding_chunk), input_precision=DOT_PRECISION)
            if NEEDS_W:
                grad_W_chunk = tl.dot(tl.trans(scaled_weights), grad, input_precision=DOT_PRECISION)
                if SINGLE_CHUNK:
                    gW_acc += grad_W_chunk
                else:
                    add_to_weight_gradient(gW_ptr, grad_W_chunk, num_classes, dim, cols, col_mask, BLOCK_C)
        if NEEDS_LOGITS:
            grad_logits = readout_backward(class_weights, p[:, None] * grad_class_weights, SOFTMAX)
            store_class_tile(glogits_ptr, grad_logits, rows, row_mask, num_classes, BLOCK_C)
        if NEEDS_P:
            tl.store(gp_ptr + rows, gp, mask=row_mask)
        if NEEDS_Q:
            tl.store(gq_ptr + rows, gq, mask=row_mask)
        if NEEDS_R:
            tl.store(gr_ptr + rows, gr, mask=row_mask)
    if SINGLE_CHUNK and NEEDS_W:
        cols = tl.arange(0, BLOCK_D)
        add_to_weight_gradient(gW_ptr, gW_acc, num_classes, dim, cols, cols < dim, BLOCK_C)


@launches_on_input_device
def latent_update_backward(
    grad: torch.Tensor,
    logits: torch.Tensor,
    W: torch.Tensor,
    z: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    r: torch.Tensor,
    seed: torch.Tensor,
    readout: str,
    needs_logits: bool,
    needs_W: bool,
    needs_z: bool,
    needs_p: bool,
    needs_q: bool,
    needs_r: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`latent_update` for every input, in one launch.

    With ``g = grad`` (``d loss / d z_new``), ``s = readout(logits)`` and ``u_hat = s @ W``:
    ``gz = q * g``; ``gp[n] = <g[n], u_hat[n]>``, ``gq[n] = <g[n], z[n]>``,
    ``gr[n] = <g[n], eps[n]>`` (``eps`` regenerated from ``seed``, drawn only when ``gr`` is needed);
    ``ds = p * (g @ W^T)`` and ``glogits = s * (ds - sum_c s * ds)`` for the softmax readout, ``ds``
    for the linear one; ``gW = (p * s)^T @ g``, reduced over a program's rows with ``tl.dot`` and
    added atomically into a float32 buffer, once per program when ``W`` fits in one column chunk,
    once per row tile and chunk otherwise. ``r`` itself is not read: no gradient depends on it.

    Args:
        grad: ``[N, D]`` in ``z``'s dtype.
        logits, W, z, p, q, r, seed, readout: as in :func:`latent_update`.
        needs_logits, needs_W, needs_z, needs_p, needs_q, needs_r: which gradients to compute.

    Returns:
        ``(glogits [N, C] in logits' dtype, gW [C, D] in W's dtype, gz [N, D] in z's dtype,
        gp, gq, gr [N] float32)``; an unneeded gradient is an empty tensor.
    """
    N, C = logits.shape
    D = W.shape[1]
    glogits = torch.empty_like(logits) if needs_logits else logits.new_empty(0)
    gW = torch.zeros((C, D), dtype=torch.float32, device=W.device) if needs_W else W.new_empty(0)
    gz = torch.empty_like(z) if needs_z else z.new_empty(0)
    gp, gq, gr = (torch.empty_like(p) if needed else p.new_empty(0) for needed in (needs_p, needs_q, needs_r))
    if N and any((needs_logits, needs_W, needs_z, needs_p, needs_q, needs_r)):
        tiling = row_tiling(N, C, D, LATENT_UPDATE_BACKWARD_TILE)
        _latent_update_backward_kernel[(tiling.num_programs,)](
            grad, logits, W, z, p, q, seed, glogits, gW, gz, gp, gq, gr,
            N, C, D,
            BLOCK_N=tiling.block_rows, BLOCK_C=tiling.block_classes, BLOCK_D=tiling.block_cols,
            TILES_PER_PROGRAM=tiling.tiles_per_program,
            SOFTMAX=readout == "softmax", SINGLE_CHUNK=tiling.single_chunk,
            NEEDS_LOGITS=needs_logits, NEEDS_W=needs_W, NEEDS_Z=needs_z,
            NEEDS_P=needs_p, NEEDS_Q=needs_q, NEEDS_R=needs_r,
            num_warps=tiling.num_warps,
        )
    if needs_W and W.dtype != torch.float32:
        gW = gW.to(W.dtype)
    return glogits, gW, gz, gp, gq, gr
