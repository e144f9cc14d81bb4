"""``stacked_linear`` on Triton: batched GEMM of T independent linear layers, bias fused: ``y[t] = x[t] @ W[t] + b[t]``.

Shapes: ``x [T, B, I]`` (any strides), ``W [T, I, O]``, ``b [T, O]``, ``y [T, B, O]``. Three
kernels, each a tiled GEMM batched over ``t`` (the launch grid is ``(output tiles, T)``), float32
accumulation whatever the input dtype:

* forward: ``y[t] = x[t] @ W[t] + b[t]``; the bias add runs in the epilogue, on the float32
  accumulator, before the one cast and store;
* input gradient: ``dx[t] = g[t] @ W[t]^T``;
* weight gradient: ``dW[t] = x[t]^T @ g[t]`` and ``db[t] = sum_i g[t, i]`` in the same pass (the
  bias gradient is the column sum of the operand the weight gradient already streams over ``B``),

with ``g`` the upstream gradient: nothing of size ``T * B * O`` is written besides the gradients.
(No activation is fused: every stacked linear layer of the paper's block feeds a BatchNorm before
its ReLU, or is the output layer.) Transposed operands (``W^T``, ``x^T``) are read through strides, so
no operand is copied; ``dx`` takes ``x``'s strides (``torch.empty_like``), so its consumer gets the
layout it produced.

Tiles come from the shapes alone (:func:`gemm_tiling`), never from autotuning. Float32 products
run as ``tf32x3`` (close to float32, see :mod:`._common`), or as one TF32 pass when
``torch.get_float32_matmul_precision()`` is ``"high"`` or ``"medium"``, as PyTorch's own matmuls do.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import DOT_PRECISION, MIN_DOT_SIZE, launches_on_input_device

MAX_TILE = 128  # widest output tile side: a 128 x 128 float32 accumulator is 64 registers per thread at 8 warps
MIN_SHRUNK_TILE = 64  # tiles shrink toward the SM count no further: wgmma works on 64-row slabs, and
# smaller tiles re-read both operands from L2 more often than they gain in parallelism
MAX_STRIDE = 2**31 // 64  # the K loop advances its pointers by BLOCK_K (<= 64) strides, an int32
GROUP_M: tl.constexpr = tl.constexpr(8)  # row tiles that consecutive programs share (L2 reuse of the right operand)


@dataclass(frozen=True)
class GemmTiling:
    """Tiles of one batched product ``[T, M, K] @ [T, K, N]``.

    Attributes:
        block_m, block_n: output tile (``BLOCK_M x BLOCK_N``), powers of two in ``[16, MAX_TILE]``.
        block_k: reduction step (``BLOCK_K``): 32 for float32 (tf32x3 holds three products' operands
            in registers), 64 for 16-bit inputs; at most the padded ``K``.
        num_warps, num_stages: launch parameters (software-pipelined loads of ``num_stages`` K steps).
        grid: ``(output tiles per matrix, T)``.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    grid: tuple[int, int]


def _padded_extent(n: int, cap: int) -> int:
    return min(cap, max(MIN_DOT_SIZE, triton.next_power_of_2(n)))


def gemm_tiling(batch: int, M: int, N: int, K: int, element_size: int, num_sms: int) -> GemmTiling:
    """Tiles for ``batch`` products ``[M, K] @ [K, N]`` of ``element_size``-byte inputs on ``num_sms`` SMs.

    The output tile starts at ``min(MAX_TILE, next_pow2(dim))`` per side (at least 16); while the
    ``batch * tiles`` programs would not cover ``num_sms``, the longer side (N on a tie) halves, down
    to ``MIN_SHRUNK_TILE``. ``num_sms = 1`` (the interpreter) keeps the largest tiles.
    """
    block_m, block_n = _padded_extent(M, MAX_TILE), _padded_extent(N, MAX_TILE)

    def programs(bm: int, bn: int) -> int:
        return batch * triton.cdiv(M, bm) * triton.cdiv(N, bn)

    while programs(block_m, block_n) < num_sms and max(block_m, block_n) > MIN_SHRUNK_TILE:
        if block_n >= block_m:
            block_n //= 2
        else:
            block_m //= 2
    block_k = _padded_extent(K, 32 if element_size == 4 else 64)
    return GemmTiling(
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        num_warps=8 if block_m * block_n >= 128 * 128 else 4,
        num_stages=3 if element_size == 4 else 4,
        grid=(triton.cdiv(M, block_m) * triton.cdiv(N, block_n), batch),
    )


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tiling(x: torch.Tensor, batch: int, M: int, N: int, K: int) -> GemmTiling:
    return gemm_tiling(batch, M, N, K, x.element_size(), _sm_count(x.device))


def _float32_precision() -> str:
    """``DOT_PRECISION`` under PyTorch's ``"highest"`` float32 matmul precision (or on ROCm), else one TF32 pass."""
    if torch.version.hip or torch.get_float32_matmul_precision() == "highest":
        return DOT_PRECISION.value
    return "tf32"


# ---------------------------------------------------------------------------------------------- device helpers


@triton.jit
def _tile_coordinates(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(tile_m, tile_n)``: the row and column tile of this program's output tile.

    Programs walk the tiles in groups of ``GROUP_M`` row tiles, column by column, so programs that
    run together share the same few columns of the right-hand operand in L2.
    """
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def _span(tile, BLOCK: tl.constexpr):
    """Indices ``tile * BLOCK + [0, BLOCK)``, int64 (so ``index * stride`` cannot overflow)."""
    return tile.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _mma(a, b, acc, F32_PRECISION: tl.constexpr):
    """``acc + a @ b``: float32 operands at ``F32_PRECISION``, 16-bit ones natively; float32 accumulator."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=F32_PRECISION)
    return tl.dot(a, b, acc)


# ---------------------------------------------------------------------------------------------- kernels


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr,
    M, N, K,
    stride_at, stride_am, stride_ak,
    stride_bt, stride_bk, stride_bn,
    stride_biast, stride_biasn,
    stride_ct, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, F32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``c[t, rows, cols] = a[t, rows, :] @ b[t, :, cols] (+ bias[t, cols])`` for ``t = program_id(1)``.

    The forward (``a = x``, ``b = W``, with the bias; M = B, N = O, K = I) and the input gradient
    (``a = g``, ``b = W^T`` read through strides, no bias; M = B, N = I, K = O).
    """
    t = tl.program_id(1).to(tl.int64)
    tile_m, tile_n = _tile_coordinates(M, N, BLOCK_M, BLOCK_N)
    rows, cols = _span(tile_m, BLOCK_M), _span(tile_n, BLOCK_N)
    row_mask, col_mask = rows < M, cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + t * stride_at + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + t * stride_bt + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_mask = ks < K - k_start
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = _mma(a, b, acc, F32_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_BIAS:
        bias = tl.load(bias_ptr + t * stride_biast + cols * stride_biasn, mask=col_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    c_ptrs = c_ptr + t * stride_ct + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _grad_params_kernel(
    x_ptr, g_ptr, dw_ptr, db_ptr,
    M, N, K,  # M = I (inputs), N = O (outputs), K = B (examples)
    stride_xt, stride_xk, stride_xm,
    stride_gt, stride_gk, stride_gn,
    stride_dwt, stride_dwm, stride_dwn,
    stride_dbt, stride_dbn,
    F32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``dW[t, rows, cols] = x[t, :, rows]^T @ g[t, :, cols]``.

    The programs of the first row tile also write ``db[t, cols] = sum_i g[t, i, cols]``.
    """
    t = tl.program_id(1).to(tl.int64)
    tile_m, tile_n = _tile_coordinates(M, N, BLOCK_M, BLOCK_N)
    rows, cols = _span(tile_m, BLOCK_M), _span(tile_n, BLOCK_N)
    row_mask, col_mask = rows < M, cols < N
    writes_bias = tile_m == 0
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + t * stride_xt + rows[:, None] * stride_xm + ks[None, :] * stride_xk
    g_ptrs = g_ptr + t * stride_gt + ks[:, None] * stride_gk + cols[None, :] * stride_gn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_mask = ks < K - k_start
        g = tl.load(g_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        acc = _mma(x, g, acc, F32_PRECISION)
        if writes_bias:
            bias_acc += tl.sum(g.to(tl.float32), axis=0)
        x_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_gk
    dw_ptrs = dw_ptr + t * stride_dwt + rows[:, None] * stride_dwm + cols[None, :] * stride_dwn
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
    if writes_bias:
        tl.store(db_ptr + t * stride_dbt + cols * stride_dbn, bias_acc.to(db_ptr.dtype.element_ty), mask=col_mask)


# ---------------------------------------------------------------------------------------------- host functions


def _launch_options(tiling: GemmTiling) -> dict:
    return dict(
        BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n, BLOCK_K=tiling.block_k,
        num_warps=tiling.num_warps, num_stages=tiling.num_stages,
    )


def _check_supported(**tensors: torch.Tensor) -> None:
    """Every dimension >= 1, and row and column strides below ``MAX_STRIDE`` (see there)."""
    for name, tensor in tensors.items():
        if tensor.numel() == 0:
            raise ValueError(
                f"{name}: the Triton kernels need every dimension >= 1, got shape {list(tensor.shape)} "
                "(noprop.ops.stacked_linear runs empty problems on the reference)"
            )
        if max(abs(s) for s in tensor.stride()[1:]) >= MAX_STRIDE:
            raise ValueError(f"{name}: row and column strides must be below {MAX_STRIDE}, got {tensor.stride()}")


@launches_on_input_device
def stacked_linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``y[t] = x[t] @ weight[t] + bias[t]``.

    Args:
        x: ``[T, B, I]``, any strides; weight: ``[T, I, O]``; bias: ``[T, O]``; one dtype and device;
            every dimension >= 1, row and column strides below ``MAX_STRIDE``.

    Returns:
        ``y [T, B, O]``, contiguous, in ``x``'s dtype.
    """
    _check_supported(x=x, weight=weight)
    T, B, I = x.shape
    O = weight.shape[2]
    y = x.new_empty((T, B, O))
    tiling = _tiling(x, T, B, O, I)
    _gemm_kernel[tiling.grid](
        x, weight, bias, y,
        B, O, I,
        *x.stride(), *weight.stride(), *bias.stride(), *y.stride(),
        HAS_BIAS=True, F32_PRECISION=_float32_precision(),
        **_launch_options(tiling),
    )
    return y


@launches_on_input_device
def stacked_linear_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    needs_input: bool,
    needs_params: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`stacked_linear_forward` for the upstream gradient ``g = grad_y``.

    ``dx[t] = g[t] @ weight[t]^T``, ``dW[t] = x[t]^T @ g[t]``, ``db[t] = sum_i g[t, i]``.

    Args:
        grad_y: ``[T, B, O]``, any strides; x: ``[T, B, I]``, any strides; weight: ``[T, I, O]``;
            every dimension >= 1, row and column strides below ``MAX_STRIDE``.
        needs_input: compute ``dx``; needs_params: compute ``dW`` and ``db`` (one pass gives both).

    Returns:
        ``(dx [T, B, I] with x's strides, dW [T, I, O], db [T, O])`` in the inputs' dtype; a gradient
        that is not needed is an empty tensor.
    """
    _check_supported(grad_y=grad_y, x=x, weight=weight)
    T, B, I = x.shape
    O = weight.shape[2]
    precision = _float32_precision()
    dx = torch.empty_like(x) if needs_input else x.new_empty((0,))
    dW = weight.new_empty((T, I, O)) if needs_params else x.new_empty((0,))
    db = weight.new_empty((T, O)) if needs_params else x.new_empty((0,))
    if needs_input:
        tiling = _tiling(x, T, B, I, O)
        stride_wt, stride_wi, stride_wo = weight.stride()
        _gemm_kernel[tiling.grid](
            grad_y, weight, weight, dx,  # b = W[t]^T: element (o, i) at stride_wo * o + stride_wi * i; no bias
            B, I, O,
            *grad_y.stride(),
            stride_wt, stride_wo, stride_wi,
            0, 0,
            *dx.stride(),
            HAS_BIAS=False, F32_PRECISION=precision,
            **_launch_options(tiling),
        )
    if needs_params:
        tiling = _tiling(x, T, I, O, B)
        _grad_params_kernel[tiling.grid](
            x, grad_y, dW, db,
            I, O, B,
            *x.stride(), *grad_y.stride(), *dW.stride(), *db.stride(),
            F32_PRECISION=precision,
            **_launch_options(tiling),
        )
    return dx, dW, db
