"""Numeric precision of a run: ``fp32``, ``tf32`` or ``bf16`` (``noprop train/eval --precision``).

* ``fp32``: PyTorch's defaults, untouched: float32 parameters, activations and gradients, and
  whatever TF32 setting the caller has (PyTorch's default: no TF32 in matmuls, TF32 in cuDNN
  convolutions).
* ``tf32``: float32 tensors, but matmuls and convolutions on an Ampere or later GPU may round
  their float32 inputs to TensorFloat-32 (10-bit mantissa; float32 accumulation).
  :func:`tf32_scope` sets ``torch.backends.cuda.matmul.allow_tf32`` and
  ``torch.backends.cudnn.allow_tf32`` inside it (each training step and evaluation) and puts
  every TF32 setting back as it was afterwards. The Triton GEMM of :func:`noprop.ops.stacked_linear` follows, since it reads
  ``torch.get_float32_matmul_precision()``. No effect on the CPU.
* ``bf16``: :func:`autocast` is ``torch.autocast(device_type, dtype=torch.bfloat16)`` around
  each training step and around inference (``predict``); parameters, gradients, optimizer state
  and the loss stay float32 (see :func:`precision_scope` for what runs in bfloat16).

:func:`precision_scope` is the one context for both, entered by :func:`noprop.train.train` around
every step and by :func:`noprop.train.evaluate` around its predictions.

What reaches the fused ops (:mod:`noprop.ops`) under bf16 autocast: the blocks' logits come out
of ``nn.Linear`` (or a ``stacked_linear``, which casts to the autocast dtype itself) as bfloat16;
the embedding ``W``, the latents ``z`` and every coefficient stay float32, so the ops see mixed
dtypes. The fused backends (:mod:`noprop.backends`) declare bfloat16 on CUDA and read it natively
with float32 accumulation: on a GPU they run in bf16. On the CPU they declare float32 only, so
``backend="auto"`` runs the reference there (which computes in float32 from the bfloat16
logits), and an explicitly named fused backend cannot take the input: :func:`check_backend`
refuses that combination before a run starts, naming ``precision``.

Tolerances: a bf16 loss or prediction is compared with float32's at the bfloat16 tolerance of
``tests/conftest.py``'s ``TOLERANCES`` (the one table of tolerances per dtype).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator

import torch

from noprop import backends
from noprop.validation import check_choice

PRECISIONS = ("fp32", "tf32", "bf16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16}  # precision -> the dtype autocast computes in


def check_precision(value: object, name: str = "precision") -> str:
    """``value`` if it is one of :data:`PRECISIONS`, else ``ValueError`` naming ``name``."""
    return check_choice(name, value, PRECISIONS)


def autocast(precision: str, device: torch.device | str, *, cache_enabled: bool = True) -> ContextManager:
    """The context a forward pass at ``precision`` runs in on ``device``.

    ``bf16``: ``torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)``;
    ``fp32`` and ``tf32``: a context that changes nothing. ``cache_enabled=False`` stops autocast
    from reusing its bfloat16 copy of a weight within one context: needed when the context spans
    optimizer steps (the copy would go stale) or a CUDA-graph capture (the copy would be made
    outside the graph and freed when the context ends).
    """
    precision = check_precision(precision)
    if precision in AUTOCAST_DTYPES:
        device_type = torch.device(device).type
        return torch.autocast(device_type, dtype=AUTOCAST_DTYPES[precision], cache_enabled=cache_enabled)
    return contextlib.nullcontext()


def _legacy_tf32_flags() -> tuple[bool, bool] | None:
    """``(cuda.matmul.allow_tf32, cudnn.allow_tf32)``, or None where PyTorch refuses to read them
    (PyTorch >= 2.9 does after the caller set the newer ``fp32_precision`` strings)."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32), bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        return None


def _fp32_precision_strings() -> tuple[str, str, str] | None:
    """The ``fp32_precision`` strings of cuBLAS matmuls, cuDNN convolutions and RNNs (PyTorch >= 2.9), else None."""
    cudnn = torch.backends.cudnn
    if not (hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(cudnn, "conv")):
        return None
    return torch.backends.cuda.matmul.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision


def tf32_state() -> tuple:
    """The TF32 settings now in force, hashable (what a captured CUDA graph baked in: part of its cache key)."""
    return _legacy_tf32_flags(), _fp32_precision_strings()


def _restore_tf32_settings(flags: tuple[bool, bool] | None, strings: tuple[str, str, str] | None) -> None:
    """Put the TF32 settings back through the API the caller used: the flags where they were
    readable (setting the strings instead would make PyTorch refuse to read the flags), else the strings."""
    if flags is not None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    elif strings is not None:
        matmul, conv, rnn = strings
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.backends.cudnn.conv.fp32_precision = conv
        torch.backends.cudnn.rnn.fp32_precision = rnn


@contextlib.contextmanager
def tf32_scope() -> Iterator[None]:
    """TF32 in cuBLAS matmuls and cuDNN convolutions inside the block; every TF32 setting restored after.

    Set through ``allow_tf32`` (so ``torch.get_float32_matmul_precision()`` reads ``"high"``
    inside) and restored through the API the caller used (the ``allow_tf32`` flags, or the
    ``fp32_precision`` strings of PyTorch >= 2.9), so the caller reads back what it set.
    """
    flags, strings = _legacy_tf32_flags(), _fp32_precision_strings()
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        yield
    finally:
        _restore_tf32_settings(flags, strings)


def precision_scope(precision: str, device: torch.device | str, *, cache_enabled: bool = True) -> ContextManager:
    """The context a training step or an inference call at ``precision`` runs in on ``device``.

    ``tf32``: :func:`tf32_scope`; ``bf16``: :func:`autocast` (``cache_enabled`` as there);
    ``fp32``: a context that changes nothing.

    The trainer runs each whole step (forward, loss, backward, optimizer) inside it. Under
    autocast a backward op runs in the dtype autocast chose for its forward op, and the optimizer
    works on the float32 parameters and gradients (autocast casts only the ops it lists:
    matmuls and convolutions), so this computes what autocast around the forward and the loss
    alone computes (a test compares the gradients), with one exception: the adjoint baseline's
    backward pass re-runs its block to solve the adjoint ODE, and does so in bfloat16 here too.
    """
    if check_precision(precision) == "tf32":
        return tf32_scope()
    return autocast(precision, device, cache_enabled=cache_enabled)


def check_backend(precision: str, backend: str, device: torch.device | str) -> None:
    """Refuse ``bf16`` with an explicitly named backend that does not take bfloat16 on ``device``.

    Under bf16 autocast the blocks' logits reach the fused ops as bfloat16; the registry
    (:mod:`noprop.backends`) says which backends take that where (the fused ones: CUDA only).
    ``"auto"`` and the reference take any float dtype.

    Raises:
        ValueError: naming ``precision`` and the backend, with what would work instead.
    """
    if check_precision(precision) not in AUTOCAST_DTYPES:
        return
    name = backends.canonical(backend, allow_auto=True)
    if name == "auto":
        return
    device_type = torch.device(device).type
    dtype = AUTOCAST_DTYPES[precision]
    allowed = backends.get(name).dtypes.get(device_type, ())
    if dtype not in allowed:
        supported = ", ".join(backends.dtype_name(d) for d in allowed) or "nothing"
        raise ValueError(
            f"precision: {precision!r} runs the blocks in {backends.dtype_name(dtype)}, but backend {name!r} takes "
            f"{supported} on {device_type}; use backend 'auto' or 'reference' there, or precision 'fp32'"
        )
