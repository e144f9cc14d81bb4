"""``ops.denoising_loss`` on every registered backend against the reference and hand-written formulas.

Covers odd shapes, per-block and per-example weights, both readouts, the FM noise target, no rows,
upstream gradients that are not 1, what the kernel backends save for the backward, and (GPU)
half-precision logits.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close, fused_backend_or_skip
from noprop import ops, rng
from op_testing import compared_backends, grad_of, kernel_backends, make_inputs, saved_bytes, SHAPES

COMPARED = compared_backends("denoising_loss")  # the registry's backends with this op, compared with the reference
ALL = ("reference",) + COMPARED
KERNELS = kernel_backends("denoising_loss")  # those run as noprop::* custom ops


# ---------------------------------------------------------------------------------------------- denoising_loss


def test_denoising_loss_equals_hand_written_formula():
    """``sum_t sum_i w_t ||softmax(l) @ W - W[y]||^2 / B``, written out with loops."""
    W, y, _, _, logits, g = make_inputs(3, 4, 5, 6, per_example=False)
    weight = torch.rand(3, generator=g)
    loss = ops.denoising_loss(logits, W, y, weight, backend="reference")
    expected = 0.0
    for t in range(3):
        for i in range(4):
            u_hat = torch.softmax(logits[t, i], dim=0) @ W
            expected += weight[t] * ((u_hat - W[y[i]]) ** 2).sum()
    torch.testing.assert_close(loss, expected / 4)


def test_denoising_loss_flow_matching_target():
    """With ``noise_coef = -1`` and the linear readout the target is ``u_y - eps`` (FM's velocity)."""
    W, y, a, b, logits, g = make_inputs(1, 8, 4, 5, per_example=True)
    weight = torch.ones(1, 8)
    loss = ops.denoising_loss(logits, W, y, weight, readout="linear", noise_coef=-torch.ones(1), seed=5, backend="reference")
    eps = rng.normal(5, (1, 8, 5))
    expected = ((logits @ W - (W[y] - eps)) ** 2).sum() / 8
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("backend", COMPARED)
@pytest.mark.parametrize("T,B,C,D", SHAPES)
@pytest.mark.parametrize("readout,noisy,per_example", [("softmax", False, False), ("softmax", True, True), ("linear", True, False), ("linear", False, True)])
def test_denoising_loss_matches_reference(backend, T, B, C, D, readout, noisy, per_example):
    fused_backend_or_skip(backend)
    W, y, _, _, logits, g = make_inputs(T, B, C, D, per_example, seed=31 * T + C)
    weight_shape = (T, B) if per_example else (T,)
    weight = torch.rand(weight_shape, generator=g) + 0.1
    noise_coef = (torch.randn(weight_shape, generator=g) if noisy else None)
    upstream = torch.tensor(0.37)
    results = {}
    for name in ("reference", backend):
        leaves = [t.clone().requires_grad_() for t in (logits, W, weight)]
        loss, rows = ops.denoising_loss(
            *leaves[:2], y, leaves[2], readout=readout, noise_coef=noise_coef, seed=11, backend=name, return_row_errors=True
        )
        results[name] = (loss.detach(), rows, *grad_of(loss, leaves, upstream))
    for label, expected, actual in zip(("loss", "row errors", "dlogits", "dW", "dweight"), results["reference"], results[backend]):
        assert actual.shape == expected.shape, label
        assert_close(actual, expected, msg=label)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("T,B", [(0, 4), (3, 0)])
def test_denoising_loss_over_no_rows(backend, T, B):
    """``sum_{t,i} w ||.||^2 / B`` with no rows: 0 when T = 0, NaN (0 / 0) when B = 0, like a mean
    over nothing; on the CPU and, where there is one, on the GPU (the kernels launch nothing)."""
    devices = ops.available_backends()[backend].devices
    if not devices:
        pytest.skip(f"backend {backend!r} cannot run here: {ops.available_backends()[backend].reason}")
    W, y, _, _, logits, _ = make_inputs(T, B, 5, 6, per_example=True)
    for device in devices:
        loss = ops.denoising_loss(logits.to(device), W.to(device), y.to(device), torch.rand(T, B, device=device), backend=backend)
        assert loss.shape == () and (torch.isnan(loss).item() if B == 0 else loss.item() == 0.0), f"{device}: {loss}"


@pytest.mark.parametrize("backend", COMPARED)
def test_denoising_loss_logits_only_gradient(backend):
    """One-hot embedding: ``W`` is a constant and only the logits get a gradient."""
    fused_backend_or_skip(backend)
    W = torch.eye(10)
    _, y, _, _, logits, g = make_inputs(3, 7, 10, 10, per_example=False)
    weight = torch.rand(3, generator=g)
    results = {}
    for name in ("reference", backend):
        leaf = logits.clone().requires_grad_()
        loss = ops.denoising_loss(leaf, W, y, weight, backend=name)
        (grad,) = grad_of(loss, [leaf], torch.tensor(1.7))
        results[name] = (loss.detach(), grad)
    for expected, actual in zip(results["reference"], results[backend]):
        assert_close(actual, expected)


@pytest.mark.parametrize("backend", KERNELS)
def test_fused_backward_saves_no_noise_tensor(backend):
    """The fused ops save O(T*B + C*D) bytes for backward; the reference saves T*B*D noise tensors."""
    fused_backend_or_skip(backend)
    T, B, C, D = 10, 128, 10, 784
    W, y, a, b, logits, _ = make_inputs(T, B, C, D, per_example=False)
    W.requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    logits.requires_grad_()
    noise_tensor_bytes = T * B * D * 4

    def step(name):
        def run():
            z = ops.noised_latents(W, y, a, b, 1, backend=name)
            loss = ops.denoising_loss(logits, W, y, a.detach(), readout="linear", noise_coef=-torch.ones(T), seed=1, backend=name)
            return z, loss
        return run

    fused = saved_bytes(step(backend))
    ref = saved_bytes(step("reference"))
    print(f"saved for backward, T={T} B={B} D={D}: reference {ref} bytes, {backend} {fused} bytes")
    assert fused < noise_tensor_bytes // 4
    assert ref >= noise_tensor_bytes


# ---------------------------------------------------------------------------------------------- GPU dtypes


@pytest.mark.gpu
@pytest.mark.parametrize("backend", COMPARED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_on_gpu_half_precision_logits(backend, dtype):
    fused_backend_or_skip(backend, "cuda")
    T, B, C, D = 10, 128, 10, 20
    W, y, a, b, logits, g = make_inputs(T, B, C, D, per_example=False)
    W, y, a, b = (t.cuda() for t in (W, y, a, b))
    logits = logits.cuda().to(dtype)
    weight = torch.rand(T, device="cuda")
    results = {}
    for name in ("reference", backend):
        leaves = [t.clone().requires_grad_() for t in (logits, W)]
        loss = ops.denoising_loss(leaves[0], leaves[1], y, weight, noise_coef=-torch.ones(T, device="cuda"), seed=3, backend=name)
        results[name] = (loss.detach(), *grad_of(loss, leaves, torch.tensor(0.5, device="cuda")))
        z = ops.noised_latents(W, y, a, b, 9, backend=name)
        results[name] += (z,)
    for expected, actual in zip(results["reference"], results[backend]):
        assert_close(actual, expected, dtype=dtype)
    assert results[backend][1].dtype == dtype
