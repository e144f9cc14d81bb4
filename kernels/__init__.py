"""Triton kernels of the fused ops (installed as ``noprop.kernels``); filled by the fused-ops work."""

import os

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
