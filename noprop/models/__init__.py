"""NoProp models (DT, CT, FM), the back-propagation baseline, and ``build_model`` by method name."""

from __future__ import annotations

from noprop.models.backprop import Backprop
from noprop.models.base import NoPropModel
from noprop.models.ct import NoPropCT
from noprop.models.dt import NoPropDT
from noprop.models.fm import NoPropFM
from noprop.validation import check_choice

MODELS = {"dt": NoPropDT, "ct": NoPropCT, "fm": NoPropFM, "backprop": Backprop}
METHODS = tuple(MODELS)


def build_model(method: str, **config) -> NoPropModel:
    """The model of ``method`` (``"dt"``, ``"ct"``, ``"fm"`` or ``"backprop"``) built from its config dict."""
    return MODELS[check_choice("method", method, METHODS)](**config)


__all__ = ["Backprop", "NoPropCT", "NoPropDT", "NoPropFM", "NoPropModel", "MODELS", "METHODS", "build_model"]
