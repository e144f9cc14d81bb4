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
    seed = seed.reshape(())
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0 = counter & _MASK32
    c1 = (counter >> 32) & _MASK32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0, c1


def uint32_to_uniform(word: torch.Tensor) -> torch.Tensor:
    """Map 32-bit words (int64 tensor in ``[0, 2**32)``) to float32 uniforms in ``[0, 1)``.

    Triton's rule: ``x = int32(word); x = ~x if x < 0; u = float32(x) * 4.6566127342e-10``.
    """
    folded = torch.where(word >= 2**31, _MASK32 - word, word)  # ~x for negative int32 x
    scale = torch.tensor(UINT_TO_UNIFORM_SCALE, dtype=torch.float32, device=word.device)
    return folded.to(torch.float32) * scale


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """Standard normal from two float32 uniforms: ``sqrt(-2 log max(u1, 1e-7)) cos(2 pi u2)``."""
    u1 = torch.clamp_min(u1, BOX_MULLER_MIN_UNIFORM)
    theta = torch.tensor(TWO_PI, dtype=torch.float32, device=u2.device) * u2
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
