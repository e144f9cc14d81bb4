"""noprop: NoProp training (Li, Teh, Pascanu 2025) with fused Triton and CUDA kernels."""

from noprop import ops
from noprop.ops import available_backends

__all__ = ["ops", "available_backends"]
__version__ = "0.1.0"
