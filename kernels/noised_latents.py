"""Noise kernels: the noise contract's normals and the noised latents, forward and backward.

``eps[n, d] = randn_contract(seed, n * D + d)`` is drawn where it is used and never stored: the forward
of the noised latents draws it to build ``z``, the backward draws the same values again for the
gradient of the noise coefficient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    class_block,
    example_tiling,
    launches_on_input_device,
    randn_contract,
    store_or_accumulate,
)

NORMAL_BLOCK = 1024  # elements per program of the element-wise kernels (8 per thread with 4 warps)


@triton.jit
def _normal_kernel(out_ptr, seed_ptr, numel, offset, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(seed_ptr)
    tl.store(out_ptr + index, randn_contract(seed, offset + index), mask=index < numel)


@launches_on_input_device
def normal(seed: torch.Tensor, shape: tuple[int, ...], offset: int) -> torch.Tensor:
    """Standard normals of the noise contract: ``out.flatten()[k] = randn_contract(seed, offset + k)``.

    Args:
        seed: int64 ``[1]`` on the output's device (read in-kernel).
        shape: output shape.
        offset: first counter, ``>= 0`` (counters are int64, so ``offset + numel`` may pass ``2**32``).

    Returns:
        float32 tensor of ``shape``.
    """
    out = torch.empty(shape, dtype=torch.float32, device=seed.device)
    numel = out.numel()
    if numel:
        _normal_kernel[(triton.cdiv(numel, NORMAL_BLOCK),)](out, seed, numel, offset, BLOCK=NORMAL_BLOCK, num_warps=4)
    return out


@triton.jit
def _noised_latents_forward_kernel(
    z_ptr, W_ptr, y_ptr, a_ptr, b_ptr, seed_ptr,
    batch, slice_numel,
    DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    # Program (p, t) writes elements [p * BLOCK, (p + 1) * BLOCK) of block t's slice z[t], a
    # row-major [B, D] run of B * D elements: a flat tile wastes no lanes on padding, and the
    # division by the compile-time DIM is a multiply and a shift.
    t = tl.program_id(1).to(tl.int64)
    element = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = element < slice_numel
    example = element // DIM
    col = element - example * DIM
    row = t * batch + example
    label = tl.load(y_ptr + example, mask=mask, other=0)
    signal = tl.load(W_ptr + label * DIM + col, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + row, mask=mask, other=0.0)
    b = tl.load(b_ptr + row, mask=mask, other=0.0)
    index = t * slice_numel + element  # = row * D + col: the element's address and its noise counter
    eps = randn_contract(tl.load(seed_ptr), index)
    tl.store(z_ptr + index, (a * signal + b * eps).to(z_ptr.dtype.element_ty), mask=mask)


@launches_on_input_device
def noised_latents_forward(
    W: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, seed: torch.Tensor
) -> torch.Tensor:
    """Noised label embeddings ``z[t, i, :] = a[t, i] * W[y_i, :] + b[t, i] * eps[t, i, :]``.

    ``eps[t, i, d] = randn_contract(seed, (t * B + i) * D + d)``; the rows of ``W`` are gathered and the
    noise drawn in-kernel, nothing but ``z`` is written. One launch.

    Args:
        W: ``[C, D]``; y: int64 ``[B]``; a, b: float32 ``[T, B]``; seed: int64 ``[1]``.

    Returns:
        ``z [T, B, D]`` in ``W``'s dtype.
    """
    (T, B), D = a.shape, W.shape[1]
    z = torch.empty((T, B, D), dtype=W.dtype, device=W.device)
    slice_numel = B * D
    if slice_numel > 2**31 - NORMAL_BLOCK:
        raise ValueError(f"noised_latents: B * D = {slice_numel} elements per block; the Triton kernel indexes a block in int32")
    if z.numel():
        grid = (triton.cdiv(slice_numel, NORMAL_BLOCK), T)
        _noised_latents_forward_kernel[grid](z, W, y, a, b, seed, B, slice_numel, DIM=D, BLOCK=NORMAL_BLOCK, num_warps=4)
    return z


@triton.jit
def _noised_latents_backward_kernel(
    grad_z_ptr, W_ptr, y_ptr, a_ptr, seed_ptr,
    gW_ptr, ga_ptr, gb_ptr,
    steps, batch, num_classes, dim, step_groups,
    BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    NEEDS_W: tl.constexpr, NEEDS_A: tl.constexpr, NEEDS_B: tl.constexpr,
    CLASS_REDUCE: tl.constexpr, ACCUMULATE_ROW_GRADS: tl.constexpr,
):
    # Program (e, c, g) owns examples tile e and columns tile c, and walks t = g, g + step_groups, ...
    examples = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    example_mask = examples < batch
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    mask = example_mask[:, None] & col_mask[None, :]
    labels = tl.load(y_ptr + examples, mask=example_mask, other=0)
    if NEEDS_A:
        signal = tl.load(W_ptr + labels[:, None] * dim + cols[None, :], mask=mask, other=0.0).to(tl.float32)  # W[y_i]
    if NEEDS_B:
        seed = tl.load(seed_ptr)
    if NEEDS_W:
        weighted_grad = tl.zeros([BLOCK_I, BLOCK_D], dtype=tl.float32)  # sum_t a[t, i] * grad_z[t, i]
    for t in range(tl.program_id(2), steps, step_groups):
        rows = (t * batch + examples).to(tl.int64)  # T * B < 2**31; the element index needs int64
        index = rows[:, None] * dim + cols[None, :]
        grad = tl.load(grad_z_ptr + index, mask=mask, other=0.0).to(tl.float32)
        if NEEDS_W:
            weighted_grad += tl.load(a_ptr + rows, mask=example_mask, other=0.0)[:, None] * grad
        if NEEDS_A:
            store_or_accumulate(ga_ptr + rows, tl.sum(grad * signal, axis=1), example_mask, ACCUMULATE_ROW_GRADS)
        if NEEDS_B:
            eps = randn_contract(seed, index)
            store_or_accumulate(gb_ptr + rows, tl.sum(grad * eps, axis=1), example_mask, ACCUMULATE_ROW_GRADS)
    if NEEDS_W:
        if CLASS_REDUCE:
            # Sum the tile's rows per class first (one-hot^T @ rows), then one atomic per class
            # present in the tile and column.
            classes = tl.arange(0, BLOCK_C)
            onehot = ((labels[:, None] == classes[None, :]) & example_mask[:, None]).to(tl.float32)
            # exact float32: the one-hot operand needs no tf32x3 split, and Triton 3.1/3.2 cannot
            # compile tf32x3 on a transposed operand; this product runs once per program
            per_class = tl.dot(tl.trans(onehot), weighted_grad, input_precision="ieee")
            present = tl.max(onehot, axis=0) > 0
            tl.atomic_add(
                gW_ptr + classes[:, None] * dim + cols[None, :], per_class,
                mask=present[:, None] & col_mask[None, :], sem="relaxed",
            )
        else:
            tl.atomic_add(gW_ptr + labels[:, None] * dim + cols[None, :], weighted_grad, mask=mask, sem="relaxed")


@launches_on_input_device
def noised_latents_backward(
    grad_z: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    seed: torch.Tensor,
    needs_W: bool,
    needs_a: bool,
    needs_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`noised_latents_forward`, regenerating the noise from ``seed``.

    ``gW[c] = sum_{t, i: y_i = c} a[t, i] * grad_z[t, i]``, ``ga[t, i] = <grad_z[t, i], W[y_i]>``,
    ``gb[t, i] = <grad_z[t, i], eps[t, i]>``. One launch (plus zero-filling the accumulated
    outputs): each program sums its steps and its examples per class before adding to ``gW``.

    Args:
        grad_z: ``[T, B, D]`` in ``W``'s dtype; W: ``[C, D]``; y: int64 ``[B]``; a, b: float32 ``[T, B]``;
        seed: int64 ``[1]``; needs_*: which gradients to compute.

    Returns:
        ``(gW [C, D] in W's dtype, ga [T, B], gb [T, B])`` float32 for ``ga, gb``; a gradient that
        is not needed is an empty tensor and is not computed.
    """
    (T, B), (C, D) = a.shape, W.shape
    tiling = example_tiling(T, B, D)
    accumulate_row_grads = tiling.grid[1] > 1  # several column tiles add to each row's dot product
    row_grad = torch.zeros if accumulate_row_grads else torch.empty
    gW = torch.zeros((C, D), dtype=torch.float32, device=W.device) if needs_W else W.new_empty(0)
    ga = row_grad((T, B), dtype=torch.float32, device=W.device) if needs_a else a.new_empty(0)
    gb = row_grad((T, B), dtype=torch.float32, device=W.device) if needs_b else b.new_empty(0)
    if grad_z.numel() and (needs_W or needs_a or needs_b):
        block_classes = class_block(C)
        _noised_latents_backward_kernel[tiling.grid](
            grad_z, W, y, a, seed, gW, ga, gb,
            T, B, C, D, tiling.step_groups,
            BLOCK_I=tiling.block_examples, BLOCK_D=tiling.block_cols, BLOCK_C=block_classes,
            NEEDS_W=needs_W, NEEDS_A=needs_a, NEEDS_B=needs_b,
            CLASS_REDUCE=block_classes <= tiling.block_examples,
            ACCUMULATE_ROW_GRADS=accumulate_row_grads,
            num_warps=4,
        )
    if needs_W and W.dtype != torch.float32:
        gW = gW.to(W.dtype)
    return gW, ga, gb
