"""Pieces shared by the Triton kernels: tile-size heuristics (host side) and tile helpers (device side).

Conventions of every kernel in this package:

* The ``T`` blocks and ``B`` examples of a ``[T, B, ...]`` tensor are flattened into rows
  ``n = t * B + i``; a row's label is ``y[n % B]``.
* The noise of element ``(n, d)`` of a ``[rows, D]`` latent is ``randn_contract(seed, n * D + d)``
  (``tl.randn`` of Triton >= 3.4, on every release): its counter is the element's row-major
  index, in int64 (``T * B * D`` can exceed ``2**31``).
* Class and column tiles are powers of two; classes are padded to at least 16 so that
  ``readout(logits) @ W`` and the weight-gradient reductions run as ``tl.dot``.
* Every sum is accumulated in float32, whatever the dtype of the inputs.

Tile sizes are chosen from the shapes alone by the functions below (never from tensor values, so
launches need no host synchronisation and stay CUDA-graph capturable) and never by autotuning,
which would be far too slow under the interpreter.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import triton
import triton.language as tl

# "tf32x3" splits each float32 operand into a high and a low TF32 part and runs three tensor-core
# products: about 1e-6 relative error, close to float32 and far faster than the FMA path of
# "ieee". ROCm has no tf32x3, so there the dot stays in exact float32.
DOT_PRECISION: tl.constexpr = tl.constexpr("ieee" if torch.version.hip else "tf32x3")

MIN_DOT_SIZE = 16  # the smallest extent tl.dot accepts along each dimension
MAX_COLUMN_CHUNK = 128  # widest chunk of the embedding dimension a program handles at once
DOT_OPERAND_ELEMENTS = 4096  # float32 elements of an embedding chunk [classes, cols] fed to tl.dot
CLASS_TILE_ELEMENTS = 2048  # float32 elements of a [rows, classes] tile (probabilities, their gradient)
FILL_PROGRAMS = 256  # enough programs to occupy every SM of a large GPU; tiles shrink to reach it
MAX_PROGRAMS = 1024  # past this, a program loops over several row tiles to cut partial-sum atomics
MAX_TILES_PER_PROGRAM = 32

# Budgets, in elements of a program's [rows, cols] tile, that keep each kernel at roughly 120-250
# registers per thread without spills on sm_90 (ptxas -v on the compiled kernels): the noise
# draw and the three products of the loss backward cost the most registers per element.
LOSS_FORWARD_TILE = 4096
LOSS_BACKWARD_TILE = 2048
LATENT_UPDATE_TILE = 1024
# Not tuned on a GPU yet. Compiled offline for sm_90 (cuobjdump -res-usage), the latent-update
# backward with every gradient needed takes 158 registers at D = 20 but 255 registers and 512 bytes
# of stack at D = 784 (16 x 128 tiles, the smallest row_tiling makes there); without the noise
# gradient (the back-propagation baseline) 128 registers at D = 20, 424 bytes of stack at D = 784.
LATENT_UPDATE_BACKWARD_TILE = 1024
NOISED_LATENTS_BACKWARD_TILE = 1024


def _power_of_2_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def class_block(num_classes: int) -> int:
    """Padded class tile: the next power of two ``>= num_classes``, at least 16 (for ``tl.dot``)."""
    return max(MIN_DOT_SIZE, triton.next_power_of_2(num_classes))


def column_chunk(dim: int, widest: int) -> int:
    """Width of the chunks a program walks the embedding dimension ``dim`` in.

    A power of two in ``[16, widest]``: the widest whose padded total ``ceil(dim / w) * w`` is at
    most 25% above the tightest padding any allowed width achieves (e.g. 784 -> 128, 130 -> 32,
    20 -> 32, 3072 -> ``widest``).
    """
    widths = []
    width = MIN_DOT_SIZE
    while width <= max(MIN_DOT_SIZE, min(widest, triton.next_power_of_2(dim))):
        widths.append(width)
        width *= 2
    padded = {w: triton.cdiv(dim, w) * w for w in widths}
    tightest = min(padded.values())
    return max(w for w in widths if 4 * padded[w] <= 5 * tightest)


def _rows_for(work_items: int, budget_rows: int) -> int:
    """Rows (or examples) per tile: ``budget_rows``, shrunk while fewer than FILL_PROGRAMS tiles would exist, >= 16."""
    return max(MIN_DOT_SIZE, min(budget_rows, triton.next_power_of_2(triton.cdiv(work_items, FILL_PROGRAMS))))


@dataclass(frozen=True)
class RowTiling:
    """How a row-tiled kernel covers ``num_rows`` rows of ``C`` classes and ``D`` embedding columns.

    Attributes:
        block_rows: rows per tile (``BLOCK_N``), a power of two >= 16.
        block_classes: padded class tile (``BLOCK_C``).
        block_cols: embedding-column chunk (``BLOCK_D``); a program loops over ``ceil(D / block_cols)`` chunks.
        single_chunk: ``D <= block_cols``: a program loads ``W`` once for all its tiles.
        tiles_per_program: row tiles one program handles in turn (it sums its partial results first).
        num_programs: the launch grid (one dimension).
        num_warps: warps per program.
    """

    block_rows: int
    block_classes: int
    block_cols: int
    single_chunk: bool
    tiles_per_program: int
    num_programs: int
    num_warps: int


def row_tiling(num_rows: int, num_classes: int, dim: int, tile_elements: int) -> RowTiling:
    """Tiles for the kernels that read one logits row per output row (denoising loss, latent update).

    The embedding chunk ``[block_classes, block_cols]`` stays within ``DOT_OPERAND_ELEMENTS``, the
    ``[block_rows, block_classes]`` tiles within ``CLASS_TILE_ELEMENTS`` and the
    ``[block_rows, block_cols]`` tile within ``tile_elements`` (the kernel's register budget);
    rows per tile shrink (down to 16) while fewer than ``FILL_PROGRAMS`` programs would exist, and
    programs take several tiles once more than ``MAX_PROGRAMS`` would.
    """
    block_classes = class_block(num_classes)
    block_cols = column_chunk(dim, min(MAX_COLUMN_CHUNK, DOT_OPERAND_ELEMENTS // block_classes))
    block_rows = _rows_for(num_rows, min(128, tile_elements // block_cols, CLASS_TILE_ELEMENTS // block_classes))
    num_tiles = triton.cdiv(num_rows, block_rows)
    tiles_per_program = min(MAX_TILES_PER_PROGRAM, _power_of_2_at_most(num_tiles // MAX_PROGRAMS))
    wide = block_classes >= 64 or block_rows * block_cols >= 4096
    return RowTiling(
        block_rows=block_rows,
        block_classes=block_classes,
        block_cols=block_cols,
        single_chunk=dim <= block_cols,
        tiles_per_program=tiles_per_program,
        num_programs=triton.cdiv(num_tiles, tiles_per_program),
        num_warps=8 if wide else 4,
    )


@dataclass(frozen=True)
class ExampleTiling:
    """How the noised-latents backward covers ``[T, B, D]``: tiles of examples x columns, looping over t.

    Attributes:
        block_examples: examples per tile (``BLOCK_I``), a power of two >= 16.
        block_cols: embedding columns per tile (``BLOCK_D``).
        step_groups: programs that share the ``T`` steps of one tile (program ``g`` takes ``t = g, g + step_groups, ...``).
        grid: the launch grid ``(example tiles, column tiles, step_groups)``.
    """

    block_examples: int
    block_cols: int
    step_groups: int
    grid: tuple[int, int, int]


def example_tiling(steps: int, batch: int, dim: int) -> ExampleTiling:
    """Tiles for the noised-latents backward: ``[block_examples, block_cols]`` within ``NOISED_LATENTS_BACKWARD_TILE``.

    The steps are split over programs only while fewer than ``FILL_PROGRAMS`` programs would
    exist: each program sums its steps before it adds to the weight gradient.
    """
    block_cols = column_chunk(dim, MAX_COLUMN_CHUNK)
    block_examples = _rows_for(steps * batch, min(64, NOISED_LATENTS_BACKWARD_TILE // block_cols))
    tiles = (triton.cdiv(batch, block_examples), triton.cdiv(dim, block_cols))
    step_groups = max(1, min(steps, triton.cdiv(FILL_PROGRAMS, max(1, tiles[0] * tiles[1]))))
    return ExampleTiling(block_examples, block_cols, step_groups, (*tiles, step_groups))


HostFunction = TypeVar("HostFunction", bound=Callable)


def launches_on_input_device(host_function: HostFunction) -> HostFunction:
    """Run a host function with the current CUDA device set to that of its first tensor argument.

    Triton launches on the *current* device, not the tensors' one: without this a model on
    ``cuda:1`` would launch on ``cuda:0`` with ``cuda:1`` pointers. CPU tensors (the interpreter)
    pass straight through.
    """

    @functools.wraps(host_function)
    def wrapper(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None or first.device.type != "cuda":
            return host_function(*args, **kwargs)
        with torch.cuda.device(first.device):
            return host_function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- device helpers


@triton.jit
def load_class_weights(logits_ptr, rows, row_mask, num_classes, BLOCK_C: tl.constexpr, SOFTMAX: tl.constexpr):
    """``readout(logits[rows])`` as float32 ``[BLOCK_N, BLOCK_C]``: softmax over the classes, or the logits.

    Padded classes get 0 (so they add nothing to ``@ W``); masked rows hold finite values that the
    caller must not store.
    """
    classes = tl.arange(0, BLOCK_C)
    class_mask = classes < num_classes
    logits = tl.load(
        logits_ptr + rows[:, None] * num_classes + classes[None, :],
        mask=row_mask[:, None] & class_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    if SOFTMAX:
        logits = tl.where(class_mask[None, :], logits, float("-inf"))
        exps = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        return exps / tl.sum(exps, axis=1)[:, None]
    return logits


@triton.jit
def readout_backward(class_weights, grad_class_weights, SOFTMAX: tl.constexpr):
    """``d loss / d logits`` from ``ds = d loss / d readout(logits)`` ``[BLOCK_N, BLOCK_C]``.

    Softmax: ``s * (ds - sum_c s * ds)`` with ``s = class_weights``; linear: ``ds``. Padded classes
    (``s = 0``) get 0 from the softmax.
    """
    if SOFTMAX:
        inner = tl.sum(class_weights * grad_class_weights, axis=1)
        return class_weights * (grad_class_weights - inner[:, None])
    return grad_class_weights


@triton.jit
def load_embedding_chunk(W_ptr, num_classes, dim, cols, col_mask, BLOCK_C: tl.constexpr):
    """``W[:, cols]`` as float32 ``[BLOCK_C, BLOCK_D]``, zero in padded classes and columns."""
    classes = tl.arange(0, BLOCK_C)
    mask = (classes < num_classes)[:, None] & col_mask[None, :]
    return tl.load(W_ptr + classes[:, None] * dim + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_or_accumulate(ptr, value, mask, ACCUMULATE: tl.constexpr):
    """Write ``value``, or add it atomically when several programs contribute to the same outputs."""
    if ACCUMULATE:
        tl.atomic_add(ptr, value, mask=mask, sem="relaxed")
    else:
        tl.store(ptr, value, mask=mask)


@triton.jit
def randn_contract(seed, index):
    """``eps`` of the noise contract for int64 ``index``: Philox-4x32-10 on ``(lo32(index), hi32(index), 0, 0)``.

    Equal to ``tl.randn(seed, index)`` on Triton >= 3.4; older releases run 64-bit Philox for an
    int64 offset (different numbers), so the counter is split here explicitly.
    """
    lo = index.to(tl.uint32)
    hi = (index >> 32).to(tl.uint32)
    zero = lo * 0
    i1, i2, _, _ = tl.philox(seed, lo, hi, zero, zero)
    eps, _ = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(i1), tl.uint_to_uniform_float(i2))
    return eps


@triton.jit
def add_to_weight_gradient(gW_ptr, value, num_classes, dim, cols, col_mask, BLOCK_C: tl.constexpr):
    """``gW[:, cols] += value`` atomically (``value`` float32 ``[BLOCK_C, BLOCK_D]``; padded classes and columns skipped)."""
    classes = tl.arange(0, BLOCK_C)
    tl.atomic_add(
        gW_ptr + classes[:, None] * dim + cols[None, :], value,
        mask=(classes < num_classes)[:, None] & col_mask[None, :], sem="relaxed",
    )


@triton.jit
def store_class_tile(ptr, value, rows, row_mask, num_classes, BLOCK_C: tl.constexpr):
    """Store a ``[BLOCK_N, BLOCK_C]`` tile into the ``[rows, num_classes]`` tensor at ``ptr`` (cast to its dtype)."""
    classes = tl.arange(0, BLOCK_C)
    tl.store(
        ptr + rows[:, None] * num_classes + classes[None, :],
        value.to(ptr.dtype.element_ty),
        mask=row_mask[:, None] & (classes < num_classes)[None, :],
    )

