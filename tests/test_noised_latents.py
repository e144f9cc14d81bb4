"""``ops.noised_latents`` (``z = a W[y] + b eps``) on every registered backend against the reference: values and gradients."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close, fused_backend_or_skip
from noprop import ops, rng
from op_testing import compared_backends, grad_of, make_inputs, SHAPES

COMPARED = compared_backends("noised_latents")  # the registry's backends with this op, compared with the reference


# ---------------------------------------------------------------------------------------------- noised_latents


def test_noised_latents_reference_formula():
    W, y, a, b, _, _ = make_inputs(3, 6, 5, 7, per_example=False)
    z = ops.noised_latents(W, y, a, b, 42, backend="reference")
    eps = rng.normal(42, (3, 6, 7))
    expected = a[:, None, None] * W[y][None] + b[:, None, None] * eps
    torch.testing.assert_close(z, expected)


@pytest.mark.parametrize("backend", COMPARED)
@pytest.mark.parametrize("T,B,C,D", SHAPES)
@pytest.mark.parametrize("per_example", [False, True])
def test_noised_latents_matches_reference(backend, T, B, C, D, per_example):
    fused_backend_or_skip(backend)
    W, y, a, b, _, g = make_inputs(T, B, C, D, per_example, seed=T * 1000 + D)
    upstream = torch.randn(T, B, D, generator=g)
    results = {}
    for name in ("reference", backend):
        leaves = [t.clone().requires_grad_() for t in (W, a, b)]
        z = ops.noised_latents(leaves[0], y, leaves[1], leaves[2], 7 + D, backend=name)
        results[name] = (z.detach(), *grad_of(z, leaves, upstream))
    for label, expected, actual in zip(("z", "dW", "da", "db"), results["reference"], results[backend]):
        assert_close(actual, expected, msg=label)


@pytest.mark.parametrize("backend", COMPARED)
def test_noised_latents_only_requested_gradients(backend):
    """W without grad (one-hot embedding) and a, b with grad: the CT case."""
    fused_backend_or_skip(backend)
    W, y, a, b, _, g = make_inputs(1, 9, 10, 10, per_example=True)
    upstream = torch.randn(1, 9, 10, generator=g)
    results = {}
    for name in ("reference", backend):
        leaves = [t.clone().requires_grad_() for t in (a, b)]
        z = ops.noised_latents(W, y, leaves[0], leaves[1], 3, backend=name)
        results[name] = grad_of(z, leaves, upstream)
    for expected, actual in zip(results["reference"], results[backend]):
        assert_close(actual, expected)
