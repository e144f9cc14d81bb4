"""noprop: NoProp training (Li, Teh, Pascanu 2025) with fused Triton and CUDA kernels.

Models: :class:`NoPropDT`, :class:`NoPropCT`, :class:`NoPropFM` and the paper's baselines
:class:`Backprop` (discrete time) and :class:`Adjoint` (a neural ODE). Fused ops and their backends: :mod:`noprop.ops`. Training: :mod:`noprop.train` and the
``noprop`` command line. Any block in place of the paper's: ``block=factory`` (:mod:`noprop.user_blocks`,
examples in :mod:`noprop.zoo`).
"""

from noprop import ops, zoo
from noprop.blocks import BlockConfig, DTBlock, TimeBlock
from noprop.embeddings import LabelEmbedding
from noprop.models import METHODS, Adjoint, Backprop, NoPropCT, NoPropDT, NoPropFM, NoPropModel, build_model
from noprop.ops import available_backends
from noprop.schedules import CosineSchedule, LearnableSchedule
from noprop.stack import BlockList, BlockStack
from noprop.user_blocks import FuncBlockStack

__version__ = "0.1.0"

__all__ = [
    "Adjoint",
    "Backprop",
    "BlockConfig",
    "BlockList",
    "BlockStack",
    "CosineSchedule",
    "DTBlock",
    "FuncBlockStack",
    "LabelEmbedding",
    "LearnableSchedule",
    "METHODS",
    "NoPropCT",
    "NoPropDT",
    "NoPropFM",
    "NoPropModel",
    "TimeBlock",
    "available_backends",
    "build_model",
    "ops",
    "zoo",
]
