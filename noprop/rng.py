"""The noise contract, in plain PyTorch.

Every backend draws the noise of the fused ops from the same counter-based generator, so the
same ``seed`` gives the same ``eps`` on every backend and a backward pass can regenerate the noise
instead of storing it. Element ``k`` (row-major) of ``normal(seed, shape, offset)`` is the
standard normal that Triton's ``tl.randn(seed, offset + k)`` returns:

1. Philox 4x32-10 on the counter ``(lo32(n), hi32(n), 0, 0)`` with ``n = offset + k`` and the key
   ``(lo32(seed), hi32(seed))``; keep the first two output words ``i1, i2``.
2. Each word to a uniform in ``[0, 1)``: read it as a signed int32 ``x``, take ``~x`` when
   ``x < 0``, and multiply by ``4.6566127342e-10`` in float32.
3. Box-Muller: ``u1 = max(u1, 1e-7)``, ``eps = sqrt(-2 log u1) * cos(2 pi u2)`` in float32.

``kernels/`` draws it with ``tl.randn`` and ``csrc/noprop_math.h`` with a host-and-device
function; they agree with this file up to the float rounding of ``log`` and ``cos``.

Dropout masks (:func:`dropout_keep`) use the same generator with all four counter words, so a
mask is a pure function of ``(seed, row, block, stream, element)`` and is bit-identical on every
backend (integer words and one float32 comparison, no transcendental function):

* the element ``(c, h, w)`` of block ``t``'s feature map ``[C, H, W]`` for global batch row ``r``
  has the within-block index ``e = (h * W + w) * C + c`` (channels fastest);
* Philox runs on the counter ``(e >> 2, r, t, stream)``: one draw serves four consecutive
  elements, and element ``e`` reads output word ``e & 3``;
* the element is kept when ``uniform(word) >= p`` (float32), and a kept value is scaled by
  ``1 / (1 - p)``.

``stream`` tells apart the dropout sites of one block (e.g. the three conv stages of the image
path and of a prototype label path), so no two sites share a mask.

This implementation favours clarity over speed: it is the oracle and the CPU fallback. All
integer arithmetic stays inside int64 without overflow (32x32-bit products are split into 16-bit
halves), so it runs on any device PyTorch supports.
"""

from __future__ import annotations

from typing import Sequence

import torch

PHILOX_ROUNDS = 10
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
UINT_TO_UNIFORM_SCALE = 4.6566127342e-10
BOX_MULLER_MIN_UNIFORM = 1.0e-7
TWO_PI = 6.283185307179586
SEED_LIMIT = 2**63  # seeds live in [0, 2**63)

_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF


def _mul_hi_lo(state: torch.Tensor, constant: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``state * constant`` for ``state, constant < 2**32``.

    The 64-bit product would overflow int64, so ``state`` is split into 16-bit halves and every
    partial product stays below ``2**49``.
    """
    high_half = state >> 16
    low_half = state & _MASK16
    high_partial = high_half * constant  # < 2**48
    low_partial = low_half * constant  # < 2**48
    mul_hi = (high_partial + (low_partial >> 16)) >> 16
    mul_lo = (((high_partial & _MASK16) << 16) + low_partial) & _MASK32
    return mul_hi, mul_lo


def philox_block(
    seed: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, rounds: int = PHILOX_ROUNDS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox 4x32 on the 128-bit counters ``(c0, c1, c2, c3)`` with the key ``(lo32(seed), hi32(seed))``.

    Args:
        seed: int64 tensor with one element, in ``[0, 2**63)``.
        c0, c1, c2, c3: int64 tensors (broadcastable to one shape) holding 32-bit words in ``[0, 2**32)``.

    Returns:
        The four output words, int64 tensors holding values in ``[0, 2**32)``.
    """
    seed = seed.reshape(())
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox(
    seed: torch.Tensor, counter: torch.Tensor, rounds: int = PHILOX_ROUNDS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Philox 4x32 on counters ``(lo32(counter), hi32(counter), 0, 0)`` with key from ``seed``.

    Args:
        seed: int64 tensor with one element, in ``[0, 2**63)``.
        counter: int64 tensor of any shape, values in ``[0, 2**63)``.

    Returns:
        The first two output words ``(i1, i2)``, int64 tensors shaped like ``counter`` holding
        values in ``[0, 2**32)``.
    """
    zero = torch.zeros_like(counter)
    i1, i2, _, _ = philox_block(seed, counter & _MASK32, (counter >> 32) & _MASK32, zero, zero, rounds)
    return i1, i2


def uint32_to_uniform(word: torch.Tensor) -> torch.Tensor:
    """Map 32-bit words (int64 tensor in ``[0, 2**32)``) to float32 uniforms in ``[0, 1)``.

    Triton's rule: ``x = int32(word); x = ~x if x < 0; u = float32(x) * 4.6566127342e-10``.
    """
    folded = torch.where(word >= 2**31, _MASK32 - word, word)  # ~x for negative int32 x
    scale = torch.full((), UINT_TO_UNIFORM_SCALE, dtype=torch.float32, device=word.device)  # no host copy
    return folded.to(torch.float32) * scale


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """Standard normal from two float32 uniforms: ``sqrt(-2 log max(u1, 1e-7)) cos(2 pi u2)``."""
    u1 = torch.clamp_min(u1, BOX_MULLER_MIN_UNIFORM)
    theta = torch.full((), TWO_PI, dtype=torch.float32, device=u2.device) * u2
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return radius * torch.cos(theta)


def as_seed_tensor(seed: int | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Normalise a seed to an int64 tensor of shape ``[1]`` on ``device``.

    An int is range-checked here; a tensor is checked for dtype and size only, because reading its
    value would synchronise with the device.

    Raises:
        TypeError: ``seed`` is neither an int nor an integer tensor.
        ValueError: ``seed`` is an int outside ``[0, 2**63)`` or a tensor with more than one element.
    """
    if isinstance(seed, bool):
        raise TypeError("seed: expected an int or an int64 tensor with one element, got a bool")
    if isinstance(seed, int):
        if not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"seed: expected an int in [0, 2**63), got {seed}")
        return torch.tensor([seed], dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64:
            raise TypeError(f"seed: expected an int64 tensor, got dtype {seed.dtype}")
        if seed.numel() != 1:
            raise ValueError(f"seed: expected a tensor with one element, got shape {tuple(seed.shape)}")
        seed = seed.reshape(1)
        return seed if device is None else seed.to(device, non_blocking=True)
    raise TypeError(f"seed: expected an int or an int64 tensor with one element, got {type(seed).__name__}")


def normal(
    seed: int | torch.Tensor,
    shape: Sequence[int],
    offset: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard normals of the noise contract (see the module docstring).

    Args:
        seed: int in ``[0, 2**63)`` or int64 tensor with one element (read on its own device).
        shape: output shape; element ``k`` in row-major order uses counter ``offset + k``.
        offset: first counter, ``>= 0``.
        device: output device; defaults to the seed tensor's device, else the CPU.

    Returns:
        float32 tensor of ``shape``: ``eps[k] = sqrt(-2 log u1(k)) cos(2 pi u2(k))``.
    """
    if offset < 0:
        raise ValueError(f"offset: expected an int >= 0, got {offset}")
    if device is None:
        device = seed.device if isinstance(seed, torch.Tensor) else torch.device("cpu")
    seed_tensor = as_seed_tensor(seed, device)
    shape = tuple(int(s) for s in shape)
    numel = 1
    for size in shape:
        if size < 0:
            raise ValueError(f"shape: expected non-negative sizes, got {shape}")
        numel *= size
    counter = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    word1, word2 = philox(seed_tensor, counter)
    return box_muller(uint32_to_uniform(word1), uint32_to_uniform(word2)).reshape(shape)


DROPOUT_ELEMENT_LIMIT = 2**32  # within-block elements per row: (e >> 2) must fit Philox's 32-bit counter word


def dropout_keep(
    seed: torch.Tensor,
    p: float,
    shape: Sequence[int],
    row_offset: int = 0,
    block_offset: int = 0,
    stream: int = 0,
) -> torch.Tensor:
    """The dropout keep mask of the contract (see the module docstring) for a batch of feature maps.

    Args:
        seed: int64 tensor with one element (the mask lives on its device).
        p: drop probability in ``[0, 1]``.
        shape: ``(rows, blocks, C, H, W)``: the mask of global rows ``row_offset ..`` and blocks
            ``block_offset ..``.
        row_offset, block_offset: global index of the first row and of the first block.
        stream: the dropout site within the block.

    Returns:
        bool ``[rows, blocks, C, H, W]``: ``uniform(philox(seed, (e >> 2, r, t, stream))[e & 3]) >= p``
        with ``e = (h * W + w) * C + c``.
    """
    rows, blocks, channels, height, width = (int(s) for s in shape)
    if channels * height * width > DROPOUT_ELEMENT_LIMIT:
        raise ValueError(f"shape: at most 2**32 elements per block and row, got {channels}x{height}x{width}")
    device = seed.device
    seed = as_seed_tensor(seed, device)
    c = torch.arange(channels, device=device).view(1, 1, channels, 1, 1)
    h = torch.arange(height, device=device).view(1, 1, 1, height, 1)
    w = torch.arange(width, device=device).view(1, 1, 1, 1, width)
    element = (h * width + w) * channels + c
    row = torch.arange(row_offset, row_offset + rows, device=device).view(rows, 1, 1, 1, 1)
    block = torch.arange(block_offset, block_offset + blocks, device=device).view(1, blocks, 1, 1, 1)
    words = philox_block(seed, element >> 2, row, block, torch.full((), stream, dtype=torch.int64, device=device))
    lane = element & 3
    word = torch.where(lane == 0, words[0], torch.where(lane == 1, words[1], torch.where(lane == 2, words[2], words[3])))
    return uint32_to_uniform(word) >= torch.full((), p, dtype=torch.float32, device=device)
