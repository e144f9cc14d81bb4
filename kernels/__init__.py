"""Triton kernels of the fused ops (installed as ``noprop.kernels``), one module per op family.

* :mod:`.noised_latents`: :func:`normal`, :func:`noised_latents_forward`, :func:`noised_latents_backward`;
* :mod:`.denoising_loss`: :func:`denoising_loss_forward`, :func:`denoising_loss_backward`;
* :mod:`.latent_update`: :func:`latent_update_forward`, :func:`latent_update_backward`;
* :mod:`.stacked_linear`: :func:`stacked_linear_forward`, :func:`stacked_linear_backward` (batched
  GEMM of T linear layers, bias fused);
* :mod:`.conv_epilogue`: :func:`conv_epilogue_forward`, :func:`conv_epilogue_backward` (the tail of a
  conv stage, ``dropout(relu(maxpool2(x)))``, with the counter-based dropout mask);
* :mod:`._common`: tile-size heuristics and the tile helpers the kernels share.

Together they implement :class:`noprop.backends.KernelImplementation`, the ``triton`` backend.
The functions take the protocol's normalised inputs (tensors on one device,
contiguous except for the stacked-linear ones, which read any strides; float32 ``[T, B]`` or
``[N]`` coefficients, int64 labels, the seed as an int64 ``[1]`` tensor that the kernels read on
the device) and launch without reading tensor values on the host,
so a training step that uses them can be captured in a CUDA graph.

:data:`INTERPRETER` is True when ``TRITON_INTERPRET=1`` was set before this package was imported:
the kernels then run on CPU tensors through Triton's interpreter.
"""

import os

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

from .conv_epilogue import conv_epilogue_backward, conv_epilogue_forward  # noqa: E402
from .denoising_loss import denoising_loss_backward, denoising_loss_forward  # noqa: E402
from .latent_update import latent_update_backward, latent_update_forward  # noqa: E402
from .noised_latents import noised_latents_backward, noised_latents_forward, normal  # noqa: E402
from .stacked_linear import stacked_linear_backward, stacked_linear_forward  # noqa: E402

__all__ = [
    "INTERPRETER",
    "normal",
    "noised_latents_forward",
    "noised_latents_backward",
    "denoising_loss_forward",
    "denoising_loss_backward",
    "latent_update_forward",
    "latent_update_backward",
    "stacked_linear_forward",
    "stacked_linear_backward",
    "conv_epilogue_forward",
    "conv_epilogue_backward",
]
