"""Checks specific to the C++/CUDA extension ``noprop._C`` (the ``extension`` backend).

The per-op tests (tests/test_<op>.py) compare every backend with the reference through
:mod:`noprop.ops`; this file checks
what only the extension has: its build (CUDA kernels wherever nvcc is), its Philox bit for bit,
its argument errors, determinism, and on a GPU the CUDA kernels against the CPU kernels, the
float16/bfloat16 paths, the large-``C * D`` gradient path and CUDA-graph capture of a training step.
The ops are called directly (``torch.ops.noprop_ext``) with the normalised inputs of
:mod:`noprop._custom_ops`.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import assert_close
from noprop import _ext, rng

_MODULE, _WHY = _ext.load()
pytestmark = pytest.mark.skipif(_MODULE is None, reason=f"noprop._C is not built: {_WHY}")
OPS = ("normal", "noised_latents_forward", "noised_latents_backward", "denoising_loss_forward",
       "denoising_loss_backward", "latent_update", "latent_update_backward", "philox_words")


def ext():
    return torch.ops.noprop_ext


def seed_tensor(seed: int, device="cpu") -> torch.Tensor:
    return torch.tensor([seed], dtype=torch.int64, device=device)


def block_inputs(T, B, C, D, device="cpu", seed=0):
    """Normalised inputs of the training ops: W [C, D], y [B], a, b, weight, noise_coef [T, B], logits [T, B, C],
    and upstream gradients grad_z, grad_z_new [T, B, D]."""
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        W=torch.randn(C, D, generator=g),
        y=torch.randint(0, C, (B,), generator=g),
        a=torch.rand(T, B, generator=g),
        b=torch.rand(T, B, generator=g),
        weight=torch.rand(T, B, generator=g) + 0.1,
        noise_coef=torch.randn(T, B, generator=g),
        logits=3 * torch.randn(T, B, C, generator=g),
        grad_z=torch.randn(T, B, D, generator=g),
        grad_z_new=torch.randn(T, B, D, generator=g),
    )
    return {k: v.to(device) for k, v in inputs.items()}


# ---------------------------------------------------------------------------------------------- build


def test_built_with_cuda_kernels_wherever_nvcc_is():
    """CI compiles the CUDA sources where nvcc is present, GPU or not, and registers them."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on the PATH")
    assert _MODULE.compiled_with_cuda(), "nvcc is on the PATH but noprop._C was built without its CUDA kernels"
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"noprop_ext::{op}", "CUDA"), op


def test_every_op_has_a_cpu_kernel():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"noprop_ext::{op}", "CPU"), op


# ---------------------------------------------------------------------------------------------- noise

SEEDS = (0, 1, 2**40 + 17, 2**63 - 1)
OFFSETS = (0, 2**32 - 3000, 2**62)  # the middle one crosses the 32-bit carry of the counter


@pytest.mark.parametrize("offset", OFFSETS)
def test_philox_words_are_bit_exact(offset):
    counter = torch.arange(offset, offset + 5000)
    for seed in SEEDS:
        words = ext().philox_words(seed_tensor(seed), counter)
        expected = rng.philox(seed_tensor(seed), counter)
        assert torch.equal(words[0], expected[0]) and torch.equal(words[1], expected[1]), f"seed={seed}"


@pytest.mark.parametrize("offset", OFFSETS)
def test_normals_match_rng_up_to_log_cos_rounding(offset):
    """Same Philox words (bit-exact, tested above); the normals agree to the contract's tolerance.

    libm's log/cos and PyTorch's vectorised ones may round differently, and how often they do
    depends on the CPU (79% bit-equal on an AMD EPYC, over 90% on an Intel Xeon), so only the
    tolerance is asserted: a few float32 ulps of values whose magnitude is at most about 6.
    """
    for seed in SEEDS:
        actual = ext().normal(seed_tensor(seed), [20000], offset)
        expected = rng.normal(seed, (20000,), offset=offset)
        torch.testing.assert_close(actual, expected, rtol=2e-6, atol=2e-6)


def test_normal_is_a_pure_function_of_the_counter():
    """Host blocks and thread chunks do not change which counter an element uses."""
    seed = seed_tensor(5)
    whole = ext().normal(seed, [3, 1000], 7)
    assert torch.equal(whole.flatten()[1234:], ext().normal(seed, [1766], 7 + 1234))
    assert ext().normal(seed, [0], 0).shape == (0,)


# ---------------------------------------------------------------------------------------------- argument errors


def _valid_arguments() -> dict[str, dict]:
    """Valid keyword arguments of every op, for small shapes (T, B, C, D) = (2, 3, 4, 5)."""
    x = block_inputs(2, 3, 4, 5)
    s = seed_tensor(1)
    common = dict(W=x["W"], y=x["y"])
    loss = dict(logits=x["logits"], **common, weight=x["weight"], noise_coef=None, seed=None, softmax=True)
    flags = dict(needs_W=True, needs_a=True, needs_b=True)
    update = dict(logits=x["logits"][0], W=x["W"], z=torch.zeros(3, 5), p=torch.ones(3), q=torch.ones(3),
                  r=torch.ones(3), seed=s)
    return {
        "normal": dict(seed=s, shape=[3], offset=0),
        "noised_latents_forward": dict(**common, a=x["a"], b=x["b"], seed=s),
        "noised_latents_backward": dict(grad_z=x["grad_z"], **common, a=x["a"], b=x["b"], seed=s, **flags),
        "denoising_loss_forward": loss,
        "denoising_loss_backward": dict(grad_loss=torch.tensor(1.0), **loss, needs_W=True),
        "latent_update": dict(update, softmax=True),
        "latent_update_backward": dict(grad=x["grad_z_new"][0], **update, softmax=True, needs_logits=True, needs_W=True,
                                       needs_z=True, needs_p=True, needs_q=True, needs_r=True),
    }


# (op, argument, how to break it, expected message)
BAD_ARGUMENTS = [
    ("noised_latents_forward", "W", lambda W: W.double(), "noised_latents_forward: W: expected dtype float32"),
    ("noised_latents_forward", "y", lambda y: y.int(), "y: expected dtype int64"),
    ("noised_latents_forward", "y", lambda y: y + 4, r"y: labels must lie in \[0, 4\)"),
    ("noised_latents_forward", "b", lambda b: b[:1], r"b: expected shape \[2, 3\]"),
    ("noised_latents_forward", "a", lambda a: a.t().contiguous().t(), "a: expected a contiguous tensor"),
    ("noised_latents_forward", "seed", lambda s: s.float(), "seed: expected dtype int64"),
    ("noised_latents_forward", "seed", lambda s: torch.tensor([1, 2]), "seed: expected a tensor with one element"),
    ("noised_latents_backward", "grad_z", lambda g: g[:, :, :2].contiguous(), "grad_z: expected shape"),
    ("denoising_loss_forward", "logits", lambda x: x[..., :3].contiguous(), "logits: expected shape"),
    ("denoising_loss_forward", "logits", lambda x: x.half(), "logits: expected dtype float32 on cpu"),
    ("denoising_loss_forward", "noise_coef", lambda _: torch.ones(2, 3), "seed: required when noise_coef is given"),
    ("denoising_loss_forward", "weight", lambda w: w.double(), "weight: expected dtype float32"),
    ("denoising_loss_backward", "grad_loss", lambda g: g.reshape(1), r"grad_loss: expected shape \[\]"),
    ("latent_update", "z", lambda z: z.double(), "z: expected dtype float32"),
    ("latent_update", "p", lambda p: p[:2], r"p: expected shape \[3\]"),
    ("latent_update_backward", "grad", lambda g: g[:, :4].contiguous(),
     r"latent_update_backward: grad: expected shape \[3, 5\]"),
    ("latent_update_backward", "grad", lambda g: g.double(), "latent_update_backward: grad: expected dtype float32"),
    ("latent_update_backward", "logits", lambda x: x[:2].contiguous(),
     r"latent_update_backward: logits: expected shape \[3, 4\]"),
    ("latent_update_backward", "W", lambda W: W.t(), "latent_update_backward: W: expected a contiguous tensor"),
    ("latent_update_backward", "z", lambda z: z[:, :4].contiguous(),
     r"latent_update_backward: z: expected shape \[N, 5\]"),
    ("latent_update_backward", "q", lambda q: q.double(), "latent_update_backward: q: expected dtype float32"),
    ("latent_update_backward", "r", lambda r: r[:1], r"latent_update_backward: r: expected shape \[3\]"),
    ("latent_update_backward", "seed", lambda s: s.float(), "latent_update_backward: seed: expected dtype int64"),
    ("normal", "offset", lambda _: -1, "offset: expected an int >= 0"),
]


@pytest.mark.parametrize("op,name,corrupt,match", BAD_ARGUMENTS, ids=[f"{op}-{name}" for op, name, *_ in BAD_ARGUMENTS])
def test_bad_arguments_raise_errors_that_name_them(op, name, corrupt, match):
    kwargs = _valid_arguments()[op]
    getattr(ext(), op)(**kwargs)  # valid as given
    kwargs[name] = corrupt(kwargs[name])
    with pytest.raises(RuntimeError, match=match):
        getattr(ext(), op)(**kwargs)


# ---------------------------------------------------------------------------------------------- CPU kernels


def test_unneeded_gradients_come_back_empty():
    x = block_inputs(2, 3, 4, 5)
    s = seed_tensor(1)
    gW, ga, gb = ext().noised_latents_backward(x["grad_z"], x["W"], x["y"], x["a"], x["b"], s, False, True, False)
    assert gW.numel() == 0 and gb.numel() == 0 and ga.shape == (2, 3)
    glogits, gW = ext().denoising_loss_backward(
        torch.tensor(1.0), x["logits"], x["W"], x["y"], x["weight"], None, None, True, False
    )
    assert gW.numel() == 0 and glogits.shape == x["logits"].shape
    update = (x["grad_z_new"][0], x["logits"][0], x["W"], x["grad_z"][0], x["a"][0], x["b"][0], x["noise_coef"][0], s,
              True)
    glogits, gW, gz, gp, gq, gr = ext().latent_update_backward(*update, False, True, False, True, False, False)
    assert gW.shape == (4, 5) and gp.shape == (3,) and all(t.numel() == 0 for t in (glogits, gz, gq, gr))


def test_gradients_are_deterministic():
    x = block_inputs(4, 33, 10, 50)
    s = seed_tensor(3)
    args = (torch.tensor(0.7), x["logits"], x["W"], x["y"], x["weight"], x["noise_coef"], s, False, True)
    first, second = ext().denoising_loss_backward(*args), ext().denoising_loss_backward(*args)
    assert all(torch.equal(u, v) for u, v in zip(first, second))
    nl_args = (x["grad_z"], x["W"], x["y"], x["a"], x["b"], s, True, True, True)
    first, second = ext().noised_latents_backward(*nl_args), ext().noised_latents_backward(*nl_args)
    assert all(torch.equal(u, v) for u, v in zip(first, second))
    N = 4 * 33
    lu_args = (x["grad_z_new"].reshape(N, 50), x["logits"].reshape(N, 10), x["W"], x["grad_z"].reshape(N, 50),
               x["a"].reshape(N), x["b"].reshape(N), x["noise_coef"].reshape(N), s, True, *(True,) * 6)
    first, second = ext().latent_update_backward(*lu_args), ext().latent_update_backward(*lu_args)
    assert all(torch.equal(u, v) for u, v in zip(first, second))


def test_loss_is_the_weighted_row_error_sum():
    x = block_inputs(3, 7, 5, 6)
    loss, row_sq_error = ext().denoising_loss_forward(x["logits"], x["W"], x["y"], x["weight"], None, None, True)
    u_hat = torch.softmax(x["logits"], -1) @ x["W"]
    torch.testing.assert_close(row_sq_error, ((u_hat - x["W"][x["y"]]) ** 2).sum(-1))
    torch.testing.assert_close(loss, (x["weight"] * row_sq_error).sum() / 7)


def test_latent_update_without_noise_ignores_the_seed():
    x = block_inputs(1, 6, 4, 9)
    logits, W = x["logits"][0], x["W"]
    z, p, q, r = torch.randn(6, 9), torch.rand(6), torch.rand(6), torch.zeros(6)
    out = ext().latent_update(logits, W, z, p, q, r, seed_tensor(1), False)
    assert torch.equal(out, ext().latent_update(logits, W, z, p, q, r, seed_tensor(2), False))
    torch.testing.assert_close(out, p[:, None] * (logits @ W) + q[:, None] * z)


# ---------------------------------------------------------------------------------------------- CUDA kernels


def _run_all_ops(x, device, softmax, noisy):
    """Every op on the inputs ``x`` moved to ``device``; returns the outputs in float32 on the CPU.

    Order: normal, z, (gW, ga, gb) of noised_latents, (loss, row_sq_error), (glogits, gW) of the
    loss, latent_update, (glogits, gW, gz, gp, gq, gr) of latent_update.
    """
    x = {k: v.to(device) for k, v in x.items()}
    s = seed_tensor(11, device)
    W, y = x["W"], x["y"]
    T, B, C = x["logits"].shape
    N = T * B
    loss_args = dict(logits=x["logits"], W=W, y=y, weight=x["weight"], softmax=softmax,
                     noise_coef=x["noise_coef"] if noisy else None, seed=s if noisy else None)
    outputs = [ext().normal(s, [T, B, 37], 2**32 - 100)]
    outputs.append(ext().noised_latents_forward(W, y, x["a"], x["b"], s))
    outputs += ext().noised_latents_backward(x["grad_z"], W, y, x["a"], x["b"], s, True, True, True)
    outputs += ext().denoising_loss_forward(**loss_args)
    outputs += ext().denoising_loss_backward(grad_loss=torch.tensor(0.37, device=device), **loss_args, needs_W=True)
    z = x["grad_z"].reshape(N, -1)
    p, q, r = x["a"].reshape(N), x["b"].reshape(N), x["noise_coef"].reshape(N)
    outputs.append(ext().latent_update(x["logits"].reshape(N, C), W, z, p, q, r, s, softmax))
    outputs += ext().latent_update_backward(
        x["grad_z_new"].reshape(N, -1), x["logits"].reshape(N, C), W, z, p, q, r, s, softmax, *(True,) * 6
    )
    return [t.float().cpu() for t in outputs]


def _cuda_or_skip():
    if not _MODULE.compiled_with_cuda():
        pytest.skip("noprop._C was built without CUDA kernels")


GPU_SHAPES = [(3, 1, 3, 7), (2, 5, 10, 20), (4, 17, 100, 33), (10, 128, 10, 784), (2, 3000, 10, 20)]


@pytest.mark.gpu
@pytest.mark.parametrize("T,B,C,D", GPU_SHAPES)
@pytest.mark.parametrize("softmax,noisy", [(True, False), (False, True)])
def test_cuda_kernels_match_cpu_kernels(T, B, C, D, softmax, noisy):
    _cuda_or_skip()
    x = block_inputs(T, B, C, D, seed=T + D)
    expected, actual = _run_all_ops(x, "cpu", softmax, noisy), _run_all_ops(x, "cuda", softmax, noisy)
    for index, (e, a) in enumerate(zip(expected, actual)):
        assert_close(a, e, msg=f"output {index}")


@pytest.mark.gpu
def test_cuda_philox_words_are_bit_exact():
    _cuda_or_skip()
    counter = torch.arange(2**32 - 5000, 2**32 + 5000, device="cuda")
    for seed in SEEDS:
        words = ext().philox_words(seed_tensor(seed, "cuda"), counter)
        expected = rng.philox(seed_tensor(seed), counter.cpu())
        assert torch.equal(words[0].cpu(), expected[0]) and torch.equal(words[1].cpu(), expected[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_logits_and_latents(dtype):
    """Half-precision logits give the float32 results of their upcast values; gradients keep their dtype."""
    _cuda_or_skip()
    x = block_inputs(4, 64, 10, 20)
    half = dict(x, logits=x["logits"].to(dtype))
    expected = _run_all_ops(dict(x, logits=half["logits"].float()), "cpu", True, True)
    actual = _run_all_ops(half, "cuda", True, True)
    for index in (5, 6, 7, 8, *range(10, 16)):  # loss, row_sq_error, glogits, gW; latent_update's gradients
        assert_close(actual[index], expected[index], dtype=dtype, msg=f"output {index}")
    x = {k: v.cuda() for k, v in half.items()}
    glogits, _ = ext().denoising_loss_backward(
        torch.tensor(1.0, device="cuda"), x["logits"], x["W"], x["y"], x["weight"], None, None, True, True
    )
    assert glogits.dtype == dtype
    z, coef = x["grad_z"].reshape(256, 20).to(dtype), torch.rand(256, device="cuda")
    z_new = ext().latent_update(x["logits"].reshape(256, 10), x["W"], z, coef, coef, coef, seed_tensor(1, "cuda"), True)
    assert z_new.dtype == dtype and z_new.shape == z.shape
    glogits, gW, gz, *_ = ext().latent_update_backward(
        z_new, x["logits"].reshape(256, 10), x["W"].to(dtype), z, coef, coef, coef, seed_tensor(1, "cuda"), True,
        *(True,) * 6
    )
    assert glogits.dtype == gW.dtype == gz.dtype == dtype and gz.shape == z.shape


@pytest.mark.gpu
def test_cuda_W_gradient_when_partial_sums_exceed_shared_memory():
    """C * D too large for per-block partial sums in shared memory: the kernels add to gW atomically."""
    _cuda_or_skip()
    x = block_inputs(2, 9, 64, 4096)
    expected = _run_all_ops(x, "cpu", True, False)
    actual = _run_all_ops(x, "cuda", True, False)
    for index in (2, 8, 11):  # gW of noised_latents_backward, denoising_loss_backward and latent_update_backward
        assert_close(actual[index], expected[index], msg=f"output {index}")


@pytest.mark.gpu
def test_cuda_training_step_is_graph_capturable():
    """Seed and upstream gradient are read on the device: a captured step replays with a new seed."""
    _cuda_or_skip()
    x = {k: v.cuda() for k, v in block_inputs(10, 128, 10, 20).items()}
    seed, grad_loss = seed_tensor(1, "cuda"), torch.tensor(1.0, device="cuda")
    W, y, a, b = x["W"], x["y"], x["a"], x["b"]
    loss_args = dict(logits=x["logits"], W=W, y=y, weight=x["weight"], noise_coef=x["noise_coef"], seed=seed,
                     softmax=False)

    def step():
        z = ext().noised_latents_forward(W, y, a, b, seed)
        loss, _ = ext().denoising_loss_forward(**loss_args)
        glogits, gW = ext().denoising_loss_backward(grad_loss=grad_loss, **loss_args, needs_W=True)
        return (z, loss, glogits, gW, *ext().noised_latents_backward(z, W, y, a, b, seed, True, True, True))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    seed.fill_(2)
    graph.replay()
    eager = step()
    for expected, actual in zip(eager, captured):
        torch.testing.assert_close(actual, expected)


@pytest.fixture
def restore_philox_isa():
    chosen = _MODULE.philox_isa()
    yield
    _MODULE.set_philox_isa(chosen)


# (B, K, H, W, blocks): 4, 32 and 64 channels per block (groups of four aligned), 5 and 7 (groups
# straddling pixels), one block to eleven (lane tables of 2..176 lanes, padded to 16).
ISA_SHAPES = [(3, 5 * 7, 9, 7, 5), (2, 3 * 32, 6, 6, 3), (2, 2 * 64, 5, 5, 2), (2, 11 * 4, 3, 5, 11), (1, 7, 4, 4, 1)]


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("pooled", [True, False])
def test_every_instruction_set_draws_the_contract_mask(isa, pooled, restore_philox_isa):
    """The CPU dropout draws (philox_lanes: portable C++, AVX2, AVX-512) give the reference's mask and values bit for bit."""
    if isa not in _MODULE.supported_philox_isas():
        pytest.skip(f"this CPU lacks {isa} (it has {_MODULE.supported_philox_isas()})")
    from noprop import ops

    _MODULE.set_philox_isa(isa)
    assert _MODULE.philox_isa() == isa
    for i, (B, K, H, W, blocks) in enumerate(ISA_SHAPES):
        x = torch.randn(B, K, H, W, generator=torch.Generator().manual_seed(i)).contiguous(memory_format=torch.channels_last)
        kwargs = dict(pooled=pooled, p=0.3, seed=2**40 + 17 * i, blocks=blocks, block_offset=3, row_offset=9, stream=2)
        expected = ops.conv_epilogue(x, backend="reference", **kwargs)
        y = ops.conv_epilogue(x, backend="extension", **kwargs)
        assert torch.equal(y != 0, expected != 0), (isa, (B, K, H, W, blocks))
        assert_close(y, expected)


def test_an_unknown_or_unsupported_instruction_set_is_refused(restore_philox_isa):
    with pytest.raises(RuntimeError, match="isa: expected one of portable, avx2, avx512, got 'sse9'"):
        _MODULE.set_philox_isa("sse9")
    assert _MODULE.supported_philox_isas()[0] == "portable" and _MODULE.philox_isa() in _MODULE.supported_philox_isas()
