"""NoProp models (DT, CT, FM), the paper's two back-propagation baselines, and ``build_model`` by method name."""

from __future__ import annotations

from noprop.models.adjoint import Adjoint
from noprop.models.backprop import Backprop
from noprop.models.base import NoPropModel
from noprop.models.ct import NoPropCT
from noprop.models.dt import NoPropDT
from noprop.models.fm import NoPropFM
from noprop.validation import check_choice

MODELS = {"dt": NoPropDT, "ct": NoPropCT, "fm": NoPropFM, "backprop": Backprop, "adjoint": Adjoint}
METHODS = tuple(MODELS)


def build_model(method: str, **config) -> NoPropModel:
    """The model of ``method`` (``"dt"``, ``"ct"``, ``"fm"``, ``"backprop"`` or ``"adjoint"``) built from its config dict."""
    return MODELS[check_choice("method", method, METHODS)](**config)


__all__ = ["Adjoint", "Backprop", "NoPropCT", "NoPropDT", "NoPropFM", "NoPropModel", "MODELS", "METHODS", "build_model"]
