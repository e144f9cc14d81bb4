"""Shared test configuration: Triton's interpreter on CPU-only machines, tolerances, data paths."""

from __future__ import annotations

import os
import pathlib

import torch

# Triton kernels run on CPU tensors through the interpreter; the switch must be set before
# noprop.kernels is imported (the @triton.jit decorators read it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import pytest  # noqa: E402

# Extra backends to register before collection, so that every op test (parametrised over the
# registry) runs on them too: a comma-separated list of importable modules that call
# noprop.backends.register on import (tests/test_backends.py runs the op suite on a toy this way).
BACKEND_MODULES_ENV = "NOPROP_TEST_BACKEND_MODULES"
for _module in filter(None, os.environ.get(BACKEND_MODULES_ENV, "").split(",")):
    importlib.import_module(_module.strip())

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"

# Tolerances of fused-vs-reference comparisons, per dtype of the compared tensors. fp32 differs
# only by summation order and the float rounding of log/cos in the noise.
TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32, msg: str = "") -> None:
    """``torch.testing.assert_close`` with the tolerance of ``dtype`` from :data:`TOLERANCES`."""
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCES[dtype], msg=msg or None)


def fused_backend_or_skip(backend: str, device: str = "cpu") -> str:
    """Return ``backend`` if it runs on ``device`` here, else skip the test with the reason."""
    from noprop import backends

    status = backends.statuses()[backend]
    if device not in status.devices:
        pytest.skip(f"backend {backend!r} cannot run on {device}: {status.reason}")
    return backend


@pytest.fixture(scope="session")
def shared_mnist() -> pathlib.Path:
    """The real MNIST test set (IDX files) beside the checkout; skips if it is missing."""
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"the MNIST test set is not at {SHARED_MNIST}")
    return SHARED_MNIST


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` when no CUDA device is present, with the reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
