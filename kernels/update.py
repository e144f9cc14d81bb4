"""The inference step on the latent, ``z_new = p * readout(logits) @ W + q * z + r * eps``, in one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    DOT_PRECISION,
    LATENT_UPDATE_TILE,
    launches_on_input_device,
    load_class_weights,
    load_embedding_chunk,
    randn_contract,
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
def latent_update(
    logits: torch.Tensor,
    W: torch.Tensor,
    z: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    r: torch.Tensor,
    seed: torch.Tensor,
    readout: str,
) -> torch.Tensor:
    """One inference step: ``z_new[n] = p[n] * readout(logits[n]) @ W + q[n] * z[n] + r[n] * eps[n]``.

    ``eps[n, d] = randn_contract(seed, n * D + d)``, always drawn (whether ``r`` is zero is not known on
    the host without a synchronisation). Inference only: no backward.

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
