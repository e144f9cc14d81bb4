"""The tail of a conv stage, ``y = dropout(relu(maxpool2(x)))``: one forward and one backward launch.

Each program owns ``BLOCK`` output elements in the order the input's layout favours (channels
fastest for a channels-last input, columns fastest otherwise), reads their 2x2 windows, keeps the
maximum and its position (a byte), draws the counter-based dropout mask of :func:`noprop.rng.dropout_keep`
(Philox on ``(e >> 2, row, block, stream)``, word ``e & 3``) and stores ``y``. The backward never
regenerates the mask: ``y > 0`` says an element was kept and positive, so
``grad_x[argmax] = grad_y / (1 - p)`` there and zero elsewhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import launches_on_input_device

BLOCK = 512  # output elements per program


@triton.jit
def _position(idx, K, Ho, Wo, CHANNELS_INNER: tl.constexpr):
    """``(b, k, ho, wo)`` of flat launch index ``idx`` (int64)."""
    if CHANNELS_INNER:  # ((b Ho + ho) Wo + wo) K + k
        k = idx % K
        rest = idx // K
        wo = rest % Wo
        rest = rest // Wo
        ho = rest % Ho
        b = rest // Ho
    else:  # ((b K + k) Ho + ho) Wo + wo
        wo = idx % Wo
        rest = idx // Wo
        ho = rest % Ho
        rest = rest // Ho
        k = rest % K
        b = rest // K
    return b, k, ho, wo


@triton.jit
def _keep(seed, element, row, block, stream, p):
    """The dropout contract: ``uniform(philox(seed, (e >> 2, row, block, stream))[e & 3]) >= p``."""
    c0 = (element >> 2).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, row.to(tl.uint32), block.to(tl.uint32), (c0 * 0 + stream).to(tl.uint32))
    lane = element & 3
    word = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
    return tl.uint_to_uniform_float(word) >= p


@triton.jit
def _conv_epilogue_forward_kernel(
    x_ptr, seed_ptr, y_ptr, argmax_ptr, numel, K, C, Ho, Wo,
    xs_b, xs_k, xs_h, xs_w, ys_b, ys_k, ys_h, ys_w,
    p, scale, row_offset, block_offset, stream,
    POOLED: tl.constexpr, DROPOUT: tl.constexpr, CHANNELS_INNER: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = idx < numel
    b, k, ho, wo = _position(idx, K, Ho, Wo, CHANNELS_INNER)
    if POOLED:
        top_left = x_ptr + b * xs_b + k * xs_k + 2 * ho * xs_h + 2 * wo * xs_w
        best = tl.load(top_left, mask=mask, other=0.0).to(tl.float32)
        index = tl.zeros_like(idx).to(tl.int32)
        for i in tl.static_range(1, 4):
            v = tl.load(top_left + (i // 2) * xs_h + (i % 2) * xs_w, mask=mask, other=0.0).to(tl.float32)
            better = (v > best) | (v != v)  # the first maximum wins a tie; NaN wins
            best = tl.where(better, v, best)
            index = tl.where(better, i, index)
    else:
        best = tl.load(x_ptr + b * xs_b + k * xs_k + ho * xs_h + wo * xs_w, mask=mask, other=0.0).to(tl.float32)
    keep = (best > 0) | (best != best)
    if DROPOUT:
        seed = tl.load(seed_ptr)
        element = (ho * Wo + wo) * C + k % C
        keep = keep & _keep(seed, element, row_offset + b, block_offset + k // C, stream, p)
    y = tl.where(keep, best * scale, 0.0)
    out = b * ys_b + k * ys_k + ho * ys_h + wo * ys_w
    tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=mask)
    if POOLED:
        tl.store(argmax_ptr + out, index.to(tl.uint8), mask=mask)


@triton.jit
def _conv_epilogue_backward_kernel(
    grad_y_ptr, y_ptr, argmax_ptr, grad_x_ptr, numel, K, Ho, Wo,
    gs_b, gs_k, gs_h, gs_w, ys_b, ys_k, ys_h, ys_w, xs_b, xs_k, xs_h, xs_w, scale,
    POOLED: tl.constexpr, CHANNELS_INNER: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = idx < numel
    b, k, ho, wo = _position(idx, K, Ho, Wo, CHANNELS_INNER)
    at_y = b * ys_b + k * ys_k + ho * ys_h + wo * ys_w
    y = tl.load(y_ptr + at_y, mask=mask, other=0.0).to(tl.float32)
    upstream = tl.load(grad_y_ptr + b * gs_b + k * gs_k + ho * gs_h + wo * gs_w, mask=mask, other=0.0).to(tl.float32)
    value = tl.where(y > 0, upstream * scale, 0.0)
    if POOLED:
        index = tl.load(argmax_ptr + at_y, mask=mask, other=0).to(tl.int32)
        top_left = grad_x_ptr + b * xs_b + k * xs_k + 2 * ho * xs_h + 2 * wo * xs_w
        for i in tl.static_range(0, 4):
            target = top_left + (i // 2) * xs_h + (i % 2) * xs_w
            tl.store(target, tl.where(index == i, value, 0.0).to(grad_x_ptr.dtype.element_ty), mask=mask)
    else:
        target = grad_x_ptr + b * xs_b + k * xs_k + ho * xs_h + wo * xs_w
        tl.store(target, value.to(grad_x_ptr.dtype.element_ty), mask=mask)


def _is_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _scale(p: float) -> float:
    """``1 / (1 - p)`` rounded to float32 (0 when ``p = 1``), as the other backends compute it."""
    return float(torch.tensor(1.0 / (1.0 - p) if p < 1 else 0.0, dtype=torch.float32))


@launches_on_input_device
def conv_epilogue_forward(
    x: torch.Tensor, seed: torch.Tensor, p: float, pooled: bool, blocks: int, block_offset: int, row_offset: int,
    stream: int, contiguous_output: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, argmax)`` of ``y = dropout(relu(maxpool2(x)))`` (see :func:`noprop.ops.conv_epilogue`).

    Args:
        x: ``[B, K, H, W]`` contiguous or channels-last; seed: int64 ``[1]``; p: drop probability;
        pooled: 2x2 max-pool first; blocks: blocks in ``K``; block_offset, row_offset, stream: the
        mask's counters; contiguous_output: ``y`` in NCHW even for a channels-last ``x``.

    Returns:
        ``y [B, K, Ho, Wo]`` in ``x``'s dtype and ``argmax`` uint8 of the same shape and strides
        (empty when not pooled).
    """
    B, K, H, W = x.shape
    Ho, Wo = (H // 2, W // 2) if pooled else (H, W)
    fmt = torch.channels_last if _is_channels_last(x) and not contiguous_output else torch.contiguous_format
    y = torch.empty((B, K, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    argmax = torch.empty_like(y, dtype=torch.uint8) if pooled else y.new_empty((0,), dtype=torch.uint8)
    numel = y.numel()
    if numel:
        _conv_epilogue_forward_kernel[(triton.cdiv(numel, BLOCK),)](
            x, seed, y, argmax if pooled else y, numel, K, K // blocks, Ho, Wo,
            *x.stride(), *y.stride(), float(p), _scale(p), row_offset, block_offset, stream,
            POOLED=pooled, DROPOUT=p > 0, CHANNELS_INNER=x.stride(1) == 1 and K > 1, BLOCK_SIZE=BLOCK,
        )
    return y, argmax


@launches_on_input_device
def conv_epilogue_backward(
    grad_y: torch.Tensor, y: torch.Tensor, argmax: torch.Tensor, p: float, pooled: bool, height: int, width: int,
    channels_last: bool,
) -> torch.Tensor:
    """``grad_x [B, K, height, width]`` (channels-last or contiguous) of :func:`conv_epilogue_forward`.

    ``grad_x[window argmax] = grad_y / (1 - p)`` where ``y > 0``, zero elsewhere; ``grad_y`` may have any strides.
    """
    B, K, Ho, Wo = y.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    uncovered = pooled and (height % 2 or width % 2)  # the last row or column no window reaches
    grad_x = torch.empty((B, K, height, width), dtype=y.dtype, device=y.device, memory_format=fmt)
    if uncovered:
        grad_x.zero_()
    numel = y.numel()
    if numel:
        _conv_epilogue_backward_kernel[(triton.cdiv(numel, BLOCK),)](
            grad_y, y, argmax if pooled else y, grad_x, numel, K, Ho, Wo,
            *grad_y.stride(), *y.stride(), *grad_x.stride(), _scale(p),
            POOLED=pooled, CHANNELS_INNER=y.stride(1) == 1 and K > 1, BLOCK_SIZE=BLOCK,
        )
    return grad_x
