"""Fused ops on every backend against the PyTorch reference, and the reference against formulas.

Every comparison draws fresh random inputs, uses upstream gradients that are not 1, and covers
odd shapes (B = 1, D = 7, T = 3, C = 3), per-block ``[T]`` and per-example ``[T, B]``
coefficients and the gradient of the shared ``W`` summed over blocks.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import TOLERANCES, assert_close, fused_backend_or_skip
from noprop import ops, reference, rng
from noprop.ops import BackendUnavailableError

FUSED = ("triton", "cuda")
# (T, B, C, D): odd sizes, the paper's CIFAR-100 class count, a block-boundary-crossing D.
SHAPES = [(3, 1, 3, 7), (2, 5, 10, 20), (4, 17, 100, 33), (10, 12, 10, 130)]


def _inputs(T, B, C, D, per_example: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(C, D, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    coefficient_shape = (T, B) if per_example else (T,)
    a = torch.rand(coefficient_shape, generator=g)
    b = torch.rand(coefficient_shape, generator=g)
    logits = 3 * torch.randn(T, B, C, generator=g)
    return W, y, a, b, logits, g


def _grads(output: torch.Tensor, inputs, upstream: torch.Tensor):
    return torch.autograd.grad(output, inputs, upstream, allow_unused=False)


# ---------------------------------------------------------------------------------------------- noise


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape,offset", [((7,), 0), ((3, 5, 11), 13), ((2, 1000), 2**32 - 500)])
def test_normal_matches_reference(backend, shape, offset):
    fused_backend_or_skip(backend)
    for seed in (0, 1, 2**40 + 17):
        expected = rng.normal(seed, shape, offset=offset)
        actual = ops.normal(seed, shape, offset=offset, backend=backend)
        assert actual.shape == expected.shape and actual.dtype == torch.float32
        assert_close(actual, expected, msg=f"seed={seed}")


@pytest.mark.parametrize("backend", ("reference",) + FUSED)
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


# ---------------------------------------------------------------------------------------------- noised_latents


def test_noised_latents_reference_formula():
    W, y, a, b, _, _ = _inputs(3, 6, 5, 7, per_example=False)
    z = ops.noised_latents(W, y, a, b, 42, backend="reference")
    eps = rng.normal(42, (3, 6, 7))
    expected = a[:, None, None] * W[y][None] + b[:, None, None] * eps
    torch.testing.assert_close(z, expected)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("T,B,C,D", SHAPES)
@pytest.mark.parametrize("per_example", [False, True])
def test_noised_latents_matches_reference(backend, T, B, C, D, per_example):
    fused_backend_or_skip(backend)
    W, y, a, b, _, g = _inputs(T, B, C, D, per_example, seed=T * 1000 + D)
    upstream = torch.randn(T, B, D, generator=g)
    results = {}
    for name in ("reference", backend):
        leaves = [t.clone().requires_grad_() for t in (W, a, b)]
        z = ops.noised_latents(leaves[0], y, leaves[1], leaves[2], 7 + D, backend=name)
        results[name] = (z.detach(), *_grads(z, leaves, upstream))
    for label, expected, actual in zip(("z", "dW", "da", "db"), results["reference"], results[backend]):
        assert_close(actual, expected, msg=label)


@pytest.mark.parametrize("backend", FUSED)
def test_noised_latents_only_requested_gradients(backend):
    """W without grad (one-hot embedding) and a, b with grad: the CT case."""
    fused_backend_or_skip(backend)
    W, y, a, b, _, g = _inputs(1, 9, 10, 10, per_example=True)
    upstream = torch.randn(1, 9, 10, generator=g)
    results = {}
    for name in ("reference", backend):
        leaves = [t.clone().requires_grad_() for t in (a, b)]
        z = ops.noised_latents(W, y, leaves[0], leaves[1], 3, backend=name)
        results[name] = _grads(z, leaves, upstream)
    for expected, actual in zip(results["reference"], results[backend]):
        assert_close(actual, expected)


# ---------------------------------------------------------------------------------------------- denoising_loss


def test_denoising_loss_equals_hand_written_formula():
    """``sum_t sum_i w_t ||softmax(l) @ W - W[y]||^2 / B``, written out with loops."""
    W, y, _, _, logits, g = _inputs(3, 4, 5, 6, per_example=False)
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
    W, y, a, b, logits, g = _inputs(1, 8, 4, 5, per_example=True)
    weight = torch.ones(1, 8)
    loss = ops.denoising_loss(logits, W, y, weight, readout="linear", noise_coef=-torch.ones(1), seed=5, backend="reference")
    eps = rng.normal(5, (1, 8, 5))
    expected = ((logits @ W - (W[y] - eps)) ** 2).sum() / 8
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("T,B,C,D", SHAPES)
@pytest.mark.parametrize("readout,noisy,per_example", [("softmax", False, False), ("softmax", True, True), ("linear", True, False), ("linear", False, True)])
def test_denoising_loss_matches_reference(backend, T, B, C, D, readout, noisy, per_example):
    fused_backend_or_skip(backend)
    W, y, _, _, logits, g = _inputs(T, B, C, D, per_example, seed=31 * T + C)
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
        results[name] = (loss.detach(), rows, *_grads(loss, leaves, upstream))
    for label, expected, actual in zip(("loss", "row errors", "dlogits", "dW", "dweight"), results["reference"], results[backend]):
        assert actual.shape == expected.shape, label
        assert_close(actual, expected, msg=label)


@pytest.mark.parametrize("backend", ("reference",) + FUSED)
@pytest.mark.parametrize("T,B", [(0, 4), (3, 0)])
def test_denoising_loss_over_no_rows(backend, T, B):
    """``sum_{t,i} w ||.||^2 / B`` with no rows: 0 when T = 0, NaN (0 / 0) when B = 0, like a mean
    over nothing; on the CPU and, where there is one, on the GPU (the kernels launch nothing)."""
    devices = ops.available_backends()[backend].devices
    if not devices:
        pytest.skip(f"backend {backend!r} cannot run here: {ops.available_backends()[backend].reason}")
    W, y, _, _, logits, _ = _inputs(T, B, 5, 6, per_example=True)
    for device in devices:
        loss = ops.denoising_loss(logits.to(device), W.to(device), y.to(device), torch.rand(T, B, device=device), backend=backend)
        assert loss.shape == () and (torch.isnan(loss).item() if B == 0 else loss.item() == 0.0), f"{device}: {loss}"


@pytest.mark.parametrize("backend", FUSED)
def test_denoising_loss_logits_only_gradient(backend):
    """One-hot embedding: ``W`` is a constant and only the logits get a gradient."""
    fused_backend_or_skip(backend)
    W = torch.eye(10)
    _, y, _, _, logits, g = _inputs(3, 7, 10, 10, per_example=False)
    weight = torch.rand(3, generator=g)
    results = {}
    for name in ("reference", backend):
        leaf = logits.clone().requires_grad_()
        loss = ops.denoising_loss(leaf, W, y, weight, backend=name)
        (grad,) = _grads(loss, [leaf], torch.tensor(1.7))
        results[name] = (loss.detach(), grad)
    for expected, actual in zip(results["reference"], results[backend]):
        assert_close(actual, expected)


# ---------------------------------------------------------------------------------------------- latent_update


def test_latent_update_reference_formula():
    W, y, _, _, logits, g = _inputs(1, 6, 4, 5, per_example=False)
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
    for label, actual, wanted in zip(("dlogits", "dW", "dz", "dp", "dq", "dr"), _grads(z_new, leaves, upstream), expected):
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


@pytest.mark.parametrize("backend", FUSED)
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
        results[name] = (z_new.detach(), *_grads(z_new, leaves, upstream))
    labels = ("z_new", "dlogits", "dW", "dz") + {"rows": ("dp", "dq", "dr"), "floats": ("dr",), "alpha": ("dalpha",)}[coefficients]
    for label, expected, actual in zip(labels, results["reference"], results[backend], strict=True):
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, label
        assert_close(actual, expected, msg=label)


@pytest.mark.parametrize("backend", FUSED)
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
        results[name] = _grads(z_new, [inputs[needed]], upstream)
    assert_close(results[backend][0], results["reference"][0])


@pytest.mark.parametrize("backend", ("reference",) + FUSED)
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
            grads += _grads(z_new, [coefficient], upstream)
        assert grads[0].shape == ()
        assert_close(grads[0], grads[1].sum(), msg="pqr"[position])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("needs", [(True,) * 6, (False, True, False, True, False, False)])
def test_latent_update_custom_op_passes_opcheck(backend, needs):
    """``noprop::latent_update``: schema, fake kernels (the backward's too, as torch.compile traces
    them) and registered autograd, with every input or only ``W`` and ``p`` needing gradients."""
    fused_backend_or_skip(backend)
    from noprop import _custom_ops

    tensors, _, _ = _latent_update_case((5,), 4, 6, "rows", seed=3)
    args = [t.requires_grad_(needed) for t, needed in zip(tensors, needs)]
    torch.library.opcheck(_custom_ops.latent_update, (*args, rng.as_seed_tensor(1), "softmax", backend))


# ---------------------------------------------------------------------------------------------- reference gradcheck


def test_reference_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    T, B, C, D = 2, 3, 4, 5

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_()

    W, a, b, logits, weight = leaf(C, D), leaf(T, B), leaf(T, B), leaf(T, B, C), leaf(T, B)
    y = torch.randint(0, C, (B,), generator=g)
    seed = rng.as_seed_tensor(4)
    assert torch.autograd.gradcheck(lambda W, a, b: reference.noised_latents(W, y, a, b, seed), (W, a, b))
    for readout, coef in (("softmax", None), ("linear", -torch.ones(T, B, dtype=torch.float64))):
        assert torch.autograd.gradcheck(
            lambda logits, W, weight: reference.denoising_loss(logits, W, y, weight, coef, seed, readout)[0],
            (logits, W, weight),
        )
    row_logits, z, p, q, r = leaf(B, C), leaf(B, D), leaf(B), leaf(B), leaf(B)
    for readout in ("softmax", "linear"):
        assert torch.autograd.gradcheck(
            lambda logits, W, z, p, q, r: reference.latent_update(logits, W, z, p, q, r, seed, readout),
            (row_logits, W, z, p, q, r),
        )


# ---------------------------------------------------------------------------------------------- memory


def _saved_bytes(fn) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("backend", FUSED)
def test_fused_backward_saves_no_noise_tensor(backend):
    """The fused ops save O(T*B + C*D) bytes for backward; the reference saves T*B*D noise tensors."""
    fused_backend_or_skip(backend)
    T, B, C, D = 10, 128, 10, 784
    W, y, a, b, logits, _ = _inputs(T, B, C, D, per_example=False)
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

    fused = _saved_bytes(step(backend))
    ref = _saved_bytes(step("reference"))
    print(f"saved for backward, T={T} B={B} D={D}: reference {ref} bytes, {backend} {fused} bytes")
    assert fused < noise_tensor_bytes // 4
    assert ref >= noise_tensor_bytes


@pytest.mark.parametrize("backend", FUSED)
def test_latent_update_backward_saves_only_its_inputs(backend):
    """The fused step saves its (normalised) inputs and regenerates eps; the reference also saves u_hat and eps."""
    fused_backend_or_skip(backend)
    N, C, D = 64, 10, 784
    tensors, _, _ = _latent_update_case((N,), C, D, "rows", seed=7)
    leaves = [t.requires_grad_() for t in tensors]
    input_bytes = sum(t.numel() * t.element_size() for t in leaves) + 8  # and the int64 seed

    def step(name):
        return lambda: ops.latent_update(*leaves, 3, backend=name)

    fused, ref = _saved_bytes(step(backend)), _saved_bytes(step("reference"))
    print(f"saved for backward, N={N} C={C} D={D}: inputs {input_bytes}, reference {ref}, {backend} {fused} bytes")
    assert fused <= input_bytes
    assert ref >= input_bytes + N * D * 4


# ---------------------------------------------------------------------------------------------- dispatch


def test_auto_on_cpu_picks_reference(monkeypatch):
    monkeypatch.delenv("NOPROP_BACKEND", raising=False)
    assert ops.resolve_backend("auto", torch.device("cpu")) == "reference"


def test_noprop_backend_overrides_auto(monkeypatch):
    monkeypatch.setenv("NOPROP_BACKEND", "reference")
    assert ops.resolve_backend("auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv("NOPROP_BACKEND", "magic")
    with pytest.raises(ValueError, match="NOPROP_BACKEND"):
        ops.resolve_backend("auto", torch.device("cpu"))


def test_unknown_backend_is_named():
    W, y, a, b, _, _ = _inputs(2, 3, 4, 5, per_example=False)
    with pytest.raises(ValueError, match="backend.*'fast'"):
        ops.noised_latents(W, y, a, b, 1, backend="fast")


def test_explicit_backend_that_cannot_run_says_why():
    W, y, a, b, _, _ = _inputs(2, 3, 4, 5, per_example=False)
    for backend, status in ops.available_backends().items():
        if "cpu" in status.devices:
            continue
        with pytest.raises(BackendUnavailableError, match=backend):
            ops.noised_latents(W, y, a, b, 1, backend=backend)
    for backend in FUSED:
        if "cpu" in ops.available_backends()[backend].devices:
            with pytest.raises(BackendUnavailableError, match="float64"):
                ops.noised_latents(W.double(), y, a, b, 1, backend=backend)


def test_fused_backends_present_where_their_toolchain_is():
    """A CI machine with a compiler must have built the extension; Triton must run in the interpreter.

    Without this, a broken build would turn every fused-op test into a silent skip.
    """
    statuses = ops.available_backends()
    if shutil.which("c++") or shutil.which("g++"):
        assert "cpu" in statuses["cuda"].devices, statuses["cuda"].reason
    if shutil.which("nvcc"):
        from noprop import _ext

        assert _ext.has_cuda_kernels(), "nvcc is present but the extension has no CUDA kernels"
    assert "cpu" in statuses["triton"].devices or torch.cuda.is_available(), statuses["triton"].reason


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda W, y, a, b, l: ops.noised_latents(W[0], y, a, b, 1), "W"),
        (lambda W, y, a, b, l: ops.noised_latents(W, y.float(), a, b, 1), "y"),
        (lambda W, y, a, b, l: ops.noised_latents(W, y + 100, a, b, 1), "y"),
        (lambda W, y, a, b, l: ops.noised_latents(W, y, a, b[:1], 1), "b"),
        (lambda W, y, a, b, l: ops.denoising_loss(l[..., :2], W, y, a), "logits"),
        (lambda W, y, a, b, l: ops.denoising_loss(l, W, y[:2], a), "y"),
        (lambda W, y, a, b, l: ops.denoising_loss(l, W, y, a, readout="relu"), "readout"),
        (lambda W, y, a, b, l: ops.denoising_loss(l, W, y, a, noise_coef=a), "seed"),
        (lambda W, y, a, b, l: ops.latent_update(l, W, torch.zeros(3, 5), 1.0, 1.0, 0.0, 1), "logits"),
        (lambda W, y, a, b, l: ops.latent_update(l[0], W, torch.zeros(3, 4), 1.0, 1.0, 0.0, 1), "z"),
        (lambda W, y, a, b, l: ops.latent_update(l[0], W, torch.zeros(3, 5), torch.ones(2), 1.0, 0.0, 1), "p"),
    ],
)
def test_bad_op_inputs_name_the_argument(call, match):
    W, y, a, b, logits, _ = _inputs(2, 3, 4, 5, per_example=False)
    with pytest.raises((ValueError, TypeError), match=match):
        call(W, y, a, b, logits)


# ---------------------------------------------------------------------------------------------- GPU dtypes


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_on_gpu_half_precision_logits(backend, dtype):
    fused_backend_or_skip(backend, "cuda")
    T, B, C, D = 10, 128, 10, 20
    W, y, a, b, logits, g = _inputs(T, B, C, D, per_example=False)
    W, y, a, b = (t.cuda() for t in (W, y, a, b))
    logits = logits.cuda().to(dtype)
    weight = torch.rand(T, device="cuda")
    results = {}
    for name in ("reference", backend):
        leaves = [t.clone().requires_grad_() for t in (logits, W)]
        loss = ops.denoising_loss(leaves[0], leaves[1], y, weight, noise_coef=-torch.ones(T, device="cuda"), seed=3, backend=name)
        results[name] = (loss.detach(), *_grads(loss, leaves, torch.tensor(0.5, device="cuda")))
        z = ops.noised_latents(W, y, a, b, 9, backend=name)
        results[name] += (z,)
    for expected, actual in zip(results["reference"], results[backend]):
        assert_close(actual, expected, dtype=dtype)
    assert results[backend][1].dtype == dtype


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FUSED)
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
            results[name] = (z_new.detach(), *_grads(z_new, leaves, upstream))
        for label, expected, actual in zip(("z_new", "dlogits", "dW", "dz", "dp", "dq", "dr"), results["reference"], results[backend]):
            assert actual.dtype == expected.dtype, label
            assert_close(actual, expected, dtype=dtype, msg=f"{readout} {label}")


def test_import_never_fails_without_triton_or_the_extension():
    """A machine without Triton and without the built extension still imports noprop and runs the reference."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['triton'] = None; sys.modules['noprop._C'] = None\n"
        "import torch, noprop\n"
        "status = noprop.available_backends()\n"
        "assert status['triton'].devices == () and 'triton' in status['triton'].reason, status\n"
        "assert status['cuda'].devices == () and 'not built' in status['cuda'].reason, status\n"
        "W = torch.randn(4, 5); y = torch.tensor([0, 3])\n"
        "z = noprop.ops.noised_latents(W, y, torch.ones(2), torch.ones(2), 1)\n"
        "assert z.shape == (2, 2, 5)\n"
        "try:\n"
        "    noprop.ops.noised_latents(W, y, torch.ones(2), torch.ones(2), 1, backend='cuda')\n"
        "except noprop.ops.BackendUnavailableError as e:\n"
        "    assert 'not built' in str(e)\n"
        "else:\n"
        "    raise AssertionError('expected BackendUnavailableError')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
