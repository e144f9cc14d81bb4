"""The ``extension`` backend: the kernel protocol (:class:`noprop.backends.KernelImplementation`) on the C++/CUDA extension.

``noprop._C`` is built from ``csrc/`` by ``setup.py``. It registers its ops in the
``torch.ops.noprop_ext`` namespace with a CPU kernel (host loops) and, when compiled with nvcc, a
CUDA kernel; both run the same per-element code from ``csrc/noprop_math.h``. The functions here
take the protocol's normalised inputs and forward them; the one translation is ``readout``, which
the C++ schemas take as ``bool softmax`` (``readout == "softmax"``). It has no ``stacked_linear``
(no GEMM): the registry declares that.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
from torch import Tensor


@functools.lru_cache(maxsize=None)
def load() -> tuple[ModuleType | None, str]:
    """Import the extension once. Returns ``(module, "")`` or ``(None, why it failed)``."""
    try:
        from noprop import _C  # type: ignore[attr-defined]
    except ImportError as error:
        return None, str(error) or "ImportError"
    return _C, ""


def has_cuda_kernels() -> bool:
    """True if the extension was compiled with its CUDA kernels (nvcc present at build time)."""
    module, _ = load()
    return module is not None and bool(module.compiled_with_cuda())


def ops():
    """``torch.ops.noprop_ext``; raises ``RuntimeError`` saying why if the extension is not built."""
    module, error = load()
    if module is None:
        raise RuntimeError(f"the C++/CUDA extension noprop._C is not built: {error}")
    return torch.ops.noprop_ext


def normal(seed: Tensor, shape: tuple[int, ...], offset: int) -> Tensor:
    """float32 normals of the noise contract, element ``k`` from counter ``offset + k``."""
    return ops().normal(seed, list(shape), offset)


def noised_latents_forward(W: Tensor, y: Tensor, a: Tensor, b: Tensor, seed: Tensor) -> Tensor:
    """``z [T, B, D]`` with ``z[t, i] = a[t, i] W[y_i] + b[t, i] eps[t, i]``."""
    return ops().noised_latents_forward(W, y, a, b, seed)


def noised_latents_backward(
    grad_z: Tensor, W: Tensor, y: Tensor, a: Tensor, b: Tensor, seed: Tensor, needs_W: bool, needs_a: bool, needs_b: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(gW [C, D], ga [T, B], gb [T, B])``; unneeded ones may be empty."""
    return ops().noised_latents_backward(grad_z, W, y, a, b, seed, needs_W, needs_a, needs_b)


def denoising_loss_forward(
    logits: Tensor, W: Tensor, y: Tensor, weight: Tensor, noise_coef: Tensor | None, seed: Tensor | None, readout: str
) -> tuple[Tensor, Tensor]:
    """``(loss [], row_sq_error [T, B])`` of the weighted denoising loss."""
    return ops().denoising_loss_forward(logits, W, y, weight, noise_coef, seed, readout == "softmax")


def denoising_loss_backward(
    grad_loss: Tensor,
    logits: Tensor,
    W: Tensor,
    y: Tensor,
    weight: Tensor,
    noise_coef: Tensor | None,
    seed: Tensor | None,
    readout: str,
    needs_W: bool,
) -> tuple[Tensor, Tensor]:
    """``(glogits [T, B, C], gW [C, D])``; ``gW`` may be empty when not needed."""
    return ops().denoising_loss_backward(grad_loss, logits, W, y, weight, noise_coef, seed, readout == "softmax", needs_W)


def latent_update_forward(
    logits: Tensor, W: Tensor, z: Tensor, p: Tensor, q: Tensor, r: Tensor, seed: Tensor, readout: str
) -> Tensor:
    """``z_new [N, D] = p readout(logits) @ W + q z + r eps``."""
    return ops().latent_update(logits, W, z, p, q, r, seed, readout == "softmax")


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
    needs_logits: bool,
    needs_W: bool,
    needs_z: bool,
    needs_p: bool,
    needs_q: bool,
    needs_r: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(glogits [N, C], gW [C, D], gz [N, D], gp, gq, gr [N])`` of :func:`latent_update`; unneeded ones are empty."""
    needs = (needs_logits, needs_W, needs_z, needs_p, needs_q, needs_r)
    return ops().latent_update_backward(grad, logits, W, z, p, q, r, seed, readout == "softmax", *needs)


def conv_epilogue_forward(
    x: Tensor, seed: Tensor, p: float, pooled: bool, blocks: int, block_offset: int, row_offset: int, stream: int,
    contiguous_output: bool,
) -> tuple[Tensor, Tensor]:
    """``(y, argmax)`` of ``y = dropout(relu(maxpool2(x)))`` with the counter-based mask (see :func:`noprop.ops.conv_epilogue`)."""
    return ops().conv_epilogue_forward(x, seed, p, pooled, blocks, block_offset, row_offset, stream, contiguous_output)


def conv_epilogue_backward(
    grad_y: Tensor, y: Tensor, argmax: Tensor, p: float, pooled: bool, height: int, width: int, channels_last: bool
) -> Tensor:
    """``grad_x [B, K, height, width]`` from the saved ``y`` and ``argmax`` (no mask regeneration)."""
    return ops().conv_epilogue_backward(grad_y, y, argmax, p, pooled, height, width, channels_last)
