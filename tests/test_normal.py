"""``ops.normal``, the noise contract: every registered backend against the PyTorch Philox, moments, purity, seeds."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close, fused_backend_or_skip
from noprop import ops, rng
from op_testing import compared_backends

COMPARED = compared_backends("normal")  # the registry's backends with this op, compared with the reference
ALL = ("reference",) + COMPARED


# ---------------------------------------------------------------------------------------------- noise


@pytest.mark.parametrize("backend", COMPARED)
@pytest.mark.parametrize("shape,offset", [((7,), 0), ((3, 5, 11), 13), ((2, 1000), 2**32 - 500)])
def test_normal_matches_reference(backend, shape, offset):
    fused_backend_or_skip(backend)
    for seed in (0, 1, 2**40 + 17):
        expected = rng.normal(seed, shape, offset=offset)
        actual = ops.normal(seed, shape, offset=offset, backend=backend)
        assert actual.shape == expected.shape and actual.dtype == torch.float32
        assert_close(actual, expected, msg=f"seed={seed}")


@pytest.mark.parametrize("backend", ALL)
def test_normal_moments(backend):
    """Mean 0 and variance 1 within 5 standard errors on 400k draws, and no correlation between seeds."""
    fused_backend_or_skip(backend) if backend != "reference" else None
    n = 400_000
    x = ops.normal(1234, (n,), backend=backend).double()
    mean_se = 1 / n**0.5
    var_se = (2 / n) ** 0.5
    assert abs(x.mean().item()) < 5 * mean_se
    assert abs(x.var().item() - 1) < 5 * var_se
    # fourth moment of a standard normal is 3 (Box-Muller output, not just any unit-variance noise)
    assert abs((x**4).mean().item() - 3) < 5 * (96 / n) ** 0.5
    other = ops.normal(1235, (n,), backend=backend).double()
    assert abs((x * other).mean().item()) < 5 * mean_se


def test_normal_is_a_pure_function_of_seed_and_index():
    whole = rng.normal(99, (4, 250))
    tail = rng.normal(99, (500,), offset=500)
    torch.testing.assert_close(whole.flatten()[500:], tail, rtol=0, atol=0)
    assert not torch.equal(rng.normal(99, (100,)), rng.normal(100, (100,)))


def test_seed_validation():
    with pytest.raises(ValueError, match="seed"):
        rng.normal(-1, (3,))
    with pytest.raises(TypeError, match="seed"):
        rng.normal(torch.tensor([1.0]), (3,))
    with pytest.raises(ValueError, match="seed"):
        rng.normal(torch.tensor([1, 2]), (3,))
