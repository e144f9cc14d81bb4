"""Helpers of the per-op test files (tests/test_<op>.py): the backends an op is tested on, inputs, gradients.

Every op test is parametrised over the registry (:mod:`noprop.backends`), so a backend registered
before collection (tests/conftest.py imports the modules named in ``NOPROP_TEST_BACKEND_MODULES``)
runs the whole op suite: see ``tests/test_backends.py::test_a_registered_toy_backend_runs_the_op_suite``.
"""

from __future__ import annotations

import torch

from noprop import backends

# (T, B, C, D): odd sizes, the paper's CIFAR-100 class count, a block-boundary-crossing D.
SHAPES = [(3, 1, 3, 7), (2, 5, 10, 20), (4, 17, 100, 33), (10, 12, 10, 130)]


def compared_backends(op: str) -> tuple[str, ...]:
    """Every registered backend that implements ``op``, the reference excepted: each is compared with it."""
    return tuple(name for name in backends.implementing(op) if name != "reference")


def kernel_backends(op: str) -> tuple[str, ...]:
    """The ``kind="kernels"`` backends among :func:`compared_backends` (custom ops, regenerated noise)."""
    return tuple(name for name in compared_backends(op) if backends.kind(name) == "kernels")


def make_inputs(T, B, C, D, per_example: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(C, D, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    coefficient_shape = (T, B) if per_example else (T,)
    a = torch.rand(coefficient_shape, generator=g)
    b = torch.rand(coefficient_shape, generator=g)
    logits = 3 * torch.randn(T, B, C, generator=g)
    return W, y, a, b, logits, g


def grad_of(output: torch.Tensor, inputs, upstream: torch.Tensor):
    return torch.autograd.grad(output, inputs, upstream, allow_unused=False)


def saved_bytes(fn) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total
