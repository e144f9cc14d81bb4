"""``ops.latent_update`` (``z_new = p readout(logits) @ W + q z + r eps``) on every registered backend.

Values and every gradient against the reference and the hand-written formulas, coefficients as
rows, floats and 0-dim tensors, the custom op's opcheck, what the kernel backends save for the
backward, and (GPU) 16-bit inputs.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close, fused_backend_or_skip
from noprop import ops, rng
from op_testing import compared_backends, grad_of, kernel_backends, make_inputs, saved_bytes, SHAPES

COMPARED = compared_backends("latent_update")  # the registry's backends with this op, compared with the reference
ALL = ("reference",) + COMPARED
KERNELS = kernel_backends("latent_update")  # those run as noprop::* custom ops


# ---------------------------------------------------------------------------------------------- latent_update


def test_latent_update_reference_formula():
    W, y, _, _, logits, g = make_inputs(1, 6, 4, 5, per_example=False)
    z = torch.randn(6, 5, generator=g)
    p, q, r = torch.rand(6, generator=g), 0.3, torch.tensor(0.7)
    z_new = ops.latent_update(logits[0], W, z, p, q, r, 8, backend="reference")
    expected = p[:, None] * (torch.softmax(logits[0], -1) @ W) + 0.3 * z + 0.7 * rng.normal(8, (6, 5))
    torch.testing.assert_close(z_new, expected)


def test_latent_update_reference_gradients_follow_the_formula():
    """Autograd through the reference gives the hand-written gradients of ``p s @ W + q z + r eps``."""
    N, C, D = 6, 4, 5
    g = torch.Generator().manual_seed(12)
    logits, W, z = 3 * torch.randn(N, C, generator=g), torch.randn(C, D, generator=g), torch.randn(N, D, generator=g)
    p, q, r = (torch.rand(N, generator=g) for _ in range(3))
    upstream = torch.randn(N, D, generator=g)
    leaves = [t.clone().requires_grad_() for t in (logits, W, z, p, q, r)]
    z_new = ops.latent_update(*leaves, 8, backend="reference")
    s = torch.softmax(logits, -1)
    eps = rng.normal(8, (N, D))
    ds = p[:, None] * (upstream @ W.T)
    expected = (
        s * (ds - (s * ds).sum(-1, keepdim=True)),  # dlogits
        (p[:, None] * s).T @ upstream,  # dW
        q[:, None] * upstream,  # dz
        (upstream * (s @ W)).sum(-1),  # dp
        (upstream * z).sum(-1),  # dq
        (upstream * eps).sum(-1),  # dr
    )
    for label, actual, wanted in zip(("dlogits", "dW", "dz", "dp", "dq", "dr"), grad_of(z_new, leaves, upstream), expected):
        torch.testing.assert_close(actual, wanted, msg=label)


# (leading shape of z, C, D): one row (N = 1), D = 7, C = 3, C = 100, D = 130, [N] and [T, B] rows.
LATENT_SHAPES = [((1,), 3, 7), ((7,), 100, 130), ((2, 5), 10, 20), ((4, 17), 100, 33), ((10, 12), 3, 130)]
# How p, q, r are passed: one value per row (r != 0); Python floats p, q and a 0-dim r != 0; the
# back-propagation baseline p = alpha, q = 1 - alpha from one 0-dim alpha, r = 0.
COEFFICIENTS = ("rows", "floats", "alpha")


def _latent_update_case(lead, C, D, coefficients: str, seed: int):
    """``(tensors, coefficients_of, upstream)``: the tensors ``logits, W, z`` and the coefficient
    leaves, a function from the coefficient leaves to the ``(p, q, r)`` arguments, and ``dL/dz_new``."""
    g = torch.Generator().manual_seed(seed)
    tensors = [3 * torch.randn(*lead, C, generator=g), torch.randn(C, D, generator=g), torch.randn(*lead, D, generator=g)]
    upstream = torch.randn(*lead, D, generator=g)
    if coefficients == "rows":
        tensors += [torch.rand(lead, generator=g) + 0.1 for _ in range(3)]
        return tensors, lambda p, q, r: (p, q, r), upstream
    if coefficients == "floats":
        tensors.append(torch.tensor(0.6))
        return tensors, lambda r: (0.8, 0.3, r), upstream
    tensors.append(torch.tensor(0.35))
    return tensors, lambda alpha: (alpha, 1 - alpha, 0.0), upstream


@pytest.mark.parametrize("backend", COMPARED)
@pytest.mark.parametrize("lead,C,D", LATENT_SHAPES)
@pytest.mark.parametrize("readout", ["softmax", "linear"])
@pytest.mark.parametrize("coefficients", COEFFICIENTS)
def test_latent_update_matches_reference(backend, lead, C, D, readout, coefficients):
    """Values and the gradients of logits, W, z and every tensor coefficient, upstream gradient random."""
    fused_backend_or_skip(backend)
    tensors, coefficients_of, upstream = _latent_update_case(lead, C, D, coefficients, seed=C * 1000 + D)
    results = {}
    for name in ("reference", backend):
        leaves = [t.clone().requires_grad_() for t in tensors]
        logits, W, z, *coefficient_leaves = leaves
        z_new = ops.latent_update(logits, W, z, *coefficients_of(*coefficient_leaves), 77, readout=readout, backend=name)
        results[name] = (z_new.detach(), *grad_of(z_new, leaves, upstream))
    labels = ("z_new", "dlogits", "dW", "dz") + {"rows": ("dp", "dq", "dr"), "floats": ("dr",), "alpha": ("dalpha",)}[coefficients]
    for label, expected, actual in zip(labels, results["reference"], results[backend], strict=True):
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, label
        assert_close(actual, expected, msg=label)


@pytest.mark.parametrize("backend", COMPARED)
@pytest.mark.parametrize("needed", ["logits", "W", "z", "p", "q", "r"])
def test_latent_update_only_requested_gradients(backend, needed):
    """One input needs a gradient (the others are constants): the kernels skip the other gradients."""
    fused_backend_or_skip(backend)
    tensors, _, upstream = _latent_update_case((3, 7), 10, 20, "rows", seed=5)
    results = {}
    for name in ("reference", backend):
        inputs = dict(zip(("logits", "W", "z", "p", "q", "r"), (t.clone() for t in tensors)))
        inputs[needed].requires_grad_()
        z_new = ops.latent_update(*inputs.values(), 9, readout="linear", backend=name)
        results[name] = grad_of(z_new, [inputs[needed]], upstream)
    assert_close(results[backend][0], results["reference"][0])


@pytest.mark.parametrize("backend", ALL)
def test_latent_update_scalar_coefficient_gradient_is_the_row_sum(backend):
    """A 0-dim ``p`` (or ``q``, ``r``) is expanded to one value per row: its gradient sums theirs."""
    if backend != "reference":
        fused_backend_or_skip(backend)
    tensors, _, upstream = _latent_update_case((4, 6), 5, 9, "rows", seed=6)
    logits, W, z = tensors[:3]
    for position in range(3):
        scalar = torch.tensor(0.45, requires_grad=True)
        rows = torch.full((4, 6), 0.45, requires_grad=True)
        grads = []
        for coefficient in (scalar, rows):
            coefficients = [0.7, 0.2, 0.3]
            coefficients[position] = coefficient
            z_new = ops.latent_update(logits, W, z, *coefficients, 4, backend=backend)
            grads += grad_of(z_new, [coefficient], upstream)
        assert grads[0].shape == ()
        assert_close(grads[0], grads[1].sum(), msg="pqr"[position])


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("needs", [(True,) * 6, (False, True, False, True, False, False)])
def test_latent_update_custom_op_passes_opcheck(backend, needs):
    """``noprop::latent_update``: schema, fake kernels (the backward's too, as torch.compile traces
    them) and registered autograd, with every input or only ``W`` and ``p`` needing gradients."""
    fused_backend_or_skip(backend)
    from noprop import _custom_ops

    tensors, _, _ = _latent_update_case((5,), 4, 6, "rows", seed=3)
    args = [t.requires_grad_(needed) for t, needed in zip(tensors, needs)]
    torch.library.opcheck(_custom_ops.latent_update, (*args, rng.as_seed_tensor(1), "softmax", backend))


@pytest.mark.parametrize("backend", KERNELS)
def test_latent_update_backward_saves_only_its_inputs(backend):
    """The fused step saves its (normalised) inputs and regenerates eps; the reference also saves u_hat and eps."""
    fused_backend_or_skip(backend)
    N, C, D = 64, 10, 784
    tensors, _, _ = _latent_update_case((N,), C, D, "rows", seed=7)
    leaves = [t.requires_grad_() for t in tensors]
    input_bytes = sum(t.numel() * t.element_size() for t in leaves) + 8  # and the int64 seed

    def step(name):
        return lambda: ops.latent_update(*leaves, 3, backend=name)

    fused, ref = saved_bytes(step(backend)), saved_bytes(step("reference"))
    print(f"saved for backward, N={N} C={C} D={D}: inputs {input_bytes}, reference {ref}, {backend} {fused} bytes")
    assert fused <= input_bytes
    assert ref >= input_bytes + N * D * 4


@pytest.mark.gpu
@pytest.mark.parametrize("backend", COMPARED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,C,D", [((10, 128), 10, 20), ((300,), 100, 130)])
def test_latent_update_gradients_on_gpu(backend, dtype, lead, C, D):
    """CUDA tensors: logits, W, z and the upstream gradient in ``dtype``, per-row float32 p, q, r.

    In float32 the upstream gradient is that of a mean over the rows (random / N), so the W
    gradient, a sum over up to 1280 rows, stays of order 1, where the float32 tolerance is stated;
    in bfloat16 it stays of order 1 itself, so every gradient is large against bfloat16's tolerance.
    """
    fused_backend_or_skip(backend, "cuda")
    tensors, _, upstream = _latent_update_case(lead, C, D, "rows", seed=C + D)
    tensors = [t.cuda().to(dtype) if k < 3 else t.cuda() for k, t in enumerate(tensors)]
    if dtype == torch.float32:
        upstream = upstream / upstream[..., 0].numel()
    upstream = upstream.cuda().to(dtype)
    for readout in ("softmax", "linear"):
        results = {}
        for name in ("reference", backend):
            leaves = [t.clone().requires_grad_() for t in tensors]
            z_new = ops.latent_update(*leaves, 21, readout=readout, backend=name)
            results[name] = (z_new.detach(), *grad_of(z_new, leaves, upstream))
        for label, expected, actual in zip(("z_new", "dlogits", "dW", "dz", "dp", "dq", "dr"), results["reference"], results[backend]):
            assert actual.dtype == expected.dtype, label
            assert_close(actual, expected, dtype=dtype, msg=f"{readout} {label}")
