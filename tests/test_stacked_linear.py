"""``ops.stacked_linear`` (``y[t] = x[t] @ W[t] + b[t]``) on every registered backend against the reference; dispatch, compile.

Every comparison draws fresh random inputs and a random (not all-ones) upstream gradient, and
covers odd shapes (B = 1, in = 7, out = 129, tiles that cross the matrix edges), a slice of a
stacked parameter (the blocks ``2..4`` of 6) and the transposed view of ``x`` that ``BlockStack``
passes. Gradients of the reference come from autograd. On a CPU the Triton kernels run through
the interpreter; GPU-only tests (16-bit inputs, training-sized shapes, the measured ``auto``
choice, CUDA-graph capture) are marked ``gpu``. The Triton tiling is tested in
tests/test_triton_kernels.py.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close, fused_backend_or_skip
from noprop import autotune, ops
from noprop.ops import BackendUnavailableError
from noprop.stack import StackedLinear
from op_testing import compared_backends

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (T, B, in, out): every B in {1, 5, 130}, in in {7, 33, 256}, out in {10, 129} at least once
SHAPES = [(3, 1, 7, 10), (3, 5, 33, 129), (3, 130, 256, 129), (3, 130, 7, 10), (3, 5, 256, 10), (3, 1, 33, 129)]
COMPARED = compared_backends("stacked_linear")  # the registry's backends with this op, compared with the reference


def _inputs(T, B, I, O, seed=0, device=DEVICE, dtype=torch.float32):
    """``x [T, B, I]``, ``weight [T, I, O]`` (nn.Linear's scale), ``bias [T, O]``, fresh for ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, I, generator=g)
    weight = torch.randn(T, I, O, generator=g) / I**0.5
    bias = 0.5 * torch.randn(T, O, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, weight, bias))


def _upstream(x, weight, seed=1):
    """A random upstream gradient ``[T, B, O]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape[0], x.shape[1], weight.shape[2], generator=g).to(x)


def _value_and_grads(backend, x, weight, bias, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    y = ops.stacked_linear(*leaves, backend=backend)
    return (y.detach(), *torch.autograd.grad(y, leaves, upstream))


@pytest.fixture(params=COMPARED)
def backend(request):
    """Every registered backend with stacked_linear but the reference, where it runs on ``DEVICE``."""
    return fused_backend_or_skip(request.param, DEVICE)


@pytest.fixture
def triton_backend():
    return fused_backend_or_skip("triton", DEVICE)


# ---------------------------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("T,B,I,O", SHAPES)
def test_stacked_linear_matches_reference(backend, T, B, I, O):
    x, weight, bias = _inputs(T, B, I, O, seed=B * I + O)
    upstream = _upstream(x, weight)
    expected = _value_and_grads("reference", x, weight, bias, upstream)
    actual = _value_and_grads(backend, x, weight, bias, upstream)
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), actual, expected):
        assert a.shape == e.shape, name
        assert_close(a, e, msg=f"{name} for T={T} B={B} in={I} out={O}")


def test_a_slice_of_stacked_parameters_gets_gradients_only_in_its_blocks(backend):
    """Blocks 2..4 of a 6-block parameter, as ``StackedLinear`` slices it; ``x`` needs no gradient."""
    x, _, _ = _inputs(3, 9, 40, 24, seed=3)
    _, weight, bias = _inputs(6, 1, 40, 24, seed=4)
    upstream = _upstream(x, weight[2:5])
    grads = {}
    for name in ("reference", backend):
        W, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        y = ops.stacked_linear(x, W[2:5], b[2:5], backend=name)
        grads[name] = (y.detach(), *torch.autograd.grad(y, (W, b), upstream))
    for actual, expected in zip(grads[backend], grads["reference"]):
        assert_close(actual, expected)
    for blocks_not_used in (grads[backend][1][[0, 1, 5]], grads[backend][2][[0, 1, 5]]):
        assert torch.count_nonzero(blocks_not_used) == 0


def test_transposed_input_view_as_block_stack_passes_it(backend):
    """``x = h.reshape(B, k, in).transpose(0, 1)`` (strides ``(in, k * in, 1)``) through ``StackedLinear``."""
    k, B, I, O = 3, 6, 20, 17
    h = torch.randn(B, k * I, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    layer = StackedLinear(5, I, O).to(DEVICE)
    upstream = torch.randn(k, B, O, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    results = {}
    for name in ("reference", backend):
        layer.backend = name
        h_leaf = h.clone().requires_grad_()
        x = h_leaf.reshape(B, k, I).transpose(0, 1)
        assert not x.is_contiguous()
        y = layer(x, range(1, 4))
        results[name] = (y.detach(), *torch.autograd.grad(y, (h_leaf, layer.weight, layer.bias), upstream))
    for actual, expected in zip(results[backend], results["reference"]):
        assert_close(actual, expected)


def test_stacked_linear_keeps_its_state_dict_and_validates_its_backend():
    layer = StackedLinear(4, 3, 2, backend="triton")
    assert list(layer.state_dict()) == ["weight", "bias"]
    assert layer.backend == "triton"
    with pytest.raises(ValueError, match="backend"):
        StackedLinear(4, 3, 2, backend="extension")
    with pytest.raises(ValueError, match="backend"), pytest.warns(DeprecationWarning):
        StackedLinear(4, 3, 2, backend="cuda")


def test_empty_batch_runs_without_a_launch(backend):
    x, weight, bias = _inputs(2, 0, 5, 4)
    y = ops.stacked_linear(x, weight, bias, backend=backend)
    assert y.shape == (2, 0, 4)


# ---------------------------------------------------------------------------------------------- dispatch


def _record_backends(monkeypatch) -> list[str]:
    chosen = []
    run = ops._run_stacked_linear

    def recording(backend, *args):
        chosen.append(backend)
        return run(backend, *args)

    monkeypatch.setattr(ops, "_run_stacked_linear", recording)
    return chosen


def test_auto_on_cpu_is_the_reference_and_the_environment_overrides_it(monkeypatch):
    x, weight, bias = _inputs(2, 3, 4, 5, device="cpu")
    chosen = _record_backends(monkeypatch)
    monkeypatch.delenv(ops.STACKED_LINEAR_ENV, raising=False)
    ops.stacked_linear(x, weight, bias)
    assert chosen == ["reference"]
    if "cpu" in ops.available_backends()["triton"].devices:
        monkeypatch.setenv(ops.STACKED_LINEAR_ENV, "triton")
        ops.stacked_linear(x, weight, bias)
        assert chosen == ["reference", "triton"]
    monkeypatch.setenv(ops.STACKED_LINEAR_ENV, "cuda")
    with pytest.raises(ValueError, match=ops.STACKED_LINEAR_ENV):
        ops.stacked_linear(x, weight, bias)
    monkeypatch.setenv(ops.STACKED_LINEAR_ENV, "reference")
    monkeypatch.setenv("NOPROP_BACKEND", "cuda")  # the other ops' switch does not reach this one
    ops.stacked_linear(x, weight, bias)
    assert chosen[-1] == "reference"


def test_backends_that_cannot_run_say_why():
    x, weight, bias = _inputs(2, 3, 4, 5, device="cpu")
    with pytest.raises(BackendUnavailableError, match="'extension' has no stacked_linear"):
        ops.stacked_linear(x, weight, bias, backend="extension")
    with pytest.raises(BackendUnavailableError, match="'extension' has no stacked_linear"), pytest.warns(DeprecationWarning):
        ops.stacked_linear(x, weight, bias, backend="cuda")
    with pytest.raises(ValueError, match="backend.*'fast'"):
        ops.stacked_linear(x, weight, bias, backend="fast")
    if "cpu" in ops.available_backends()["triton"].devices:
        with pytest.raises(BackendUnavailableError, match="float64"):
            ops.stacked_linear(x.double(), weight.double(), bias.double(), backend="triton")


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda x, w, b: ops.stacked_linear(x[0], w, b), ValueError, "x: expected shape"),
        (lambda x, w, b: ops.stacked_linear(x.long(), w, b), TypeError, "x: expected a floating"),
        (lambda x, w, b: ops.stacked_linear(x, w[:1], b), ValueError, r"weight: expected shape \[2, 4, out\]"),
        (lambda x, w, b: ops.stacked_linear(x, w[:, :3], b), ValueError, "weight: expected shape"),
        (lambda x, w, b: ops.stacked_linear(x, w, b[:, :4]), ValueError, r"bias: expected shape \[2, 5\]"),
        (lambda x, w, b: ops.stacked_linear(x, w.double(), b), TypeError, "weight: expected dtype torch.float32"),
        (lambda x, w, b: ops.stacked_linear(x, w, "b"), TypeError, "bias: expected a torch.Tensor"),
    ],
)
def test_bad_inputs_name_the_argument(call, error, match):
    x, weight, bias = _inputs(2, 3, 4, 5, device="cpu")
    with pytest.raises(error, match=match):
        call(x, weight, bias)


def test_autocast_casts_the_inputs_as_baddbmm_would():
    x, weight, bias = _inputs(2, 3, 4, 5, device="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.stacked_linear(x, weight, bias, backend="reference")
    assert y.dtype == torch.bfloat16
    assert_close(y, torch.baddbmm(bias.unsqueeze(1), x, weight), dtype=torch.bfloat16)


def test_compiled_fullgraph_keeps_the_triton_op(triton_backend):
    """``torch.compile(fullgraph=True)`` traces the custom op (fake kernel) and its registered backward.

    The input is a transposed view, as in ``BlockStack``; inductor runs the op on the interpreter.
    """
    torch._dynamo.reset()
    x, weight, bias = _inputs(3, 5, 33, 10, seed=7)
    upstream = _upstream(x, weight)

    def forward(h, weight, bias):  # h [B, T, in]
        return ops.stacked_linear(h.transpose(0, 1), weight, bias, backend="triton")

    compiled = torch.compile(forward, fullgraph=True)
    results = []
    for run in (forward, compiled):
        leaves = [t.clone().requires_grad_() for t in (x.transpose(0, 1).contiguous(), weight, bias)]
        y = run(*leaves)
        results.append((y.detach(), *torch.autograd.grad(y, leaves, upstream)))
    for actual, expected in zip(results[1], results[0]):
        assert_close(actual, expected)


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,B,I,O", [(10, 128, 2048, 256), (10, 128, 512, 256), (10, 128, 128, 10), (3, 130, 33, 129)])
def test_gpu_dtypes_and_training_shapes(T, B, I, O, dtype):
    """16-bit inputs (float32 accumulation) and the model's shapes.

    The oracle is the float32 reference on the same (rounded) input values, so the comparison sees
    only the summation order and the final rounding of the outputs to ``dtype``.
    """
    low = [t.to(dtype) for t in _inputs(T, B, I, O, seed=O, device="cuda")]
    exact = [t.float() for t in low]
    upstream = _upstream(exact[0], exact[1]).to(dtype)
    expected = _value_and_grads("reference", *exact, upstream.float())
    actual = _value_and_grads("triton", *low, upstream)
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), actual, expected):
        assert a.dtype == dtype, name
        assert_close(a, e, dtype=dtype, msg=f"{name} {dtype} T={T} B={B} in={I} out={O}")


@pytest.mark.gpu
def test_auto_measures_once_per_problem_and_caches(monkeypatch):
    monkeypatch.delenv(ops.STACKED_LINEAR_ENV, raising=False)
    ops.clear_stacked_linear_choices()
    timed = []
    time_backend = autotune._time_stacked_linear

    def recording(run, backend, *args):
        timed.append(backend)
        return time_backend(run, backend, *args)

    monkeypatch.setattr(autotune, "_time_stacked_linear", recording)
    x, weight, bias = (t.requires_grad_() for t in _inputs(10, 128, 256, 256, device="cuda"))
    state = torch.cuda.get_rng_state()
    ops.stacked_linear(x, weight, bias)
    assert torch.equal(torch.cuda.get_rng_state(), state)  # measuring draws no random numbers
    assert sorted(timed) == ["reference", "triton"]
    ops.stacked_linear(x, weight, bias)
    assert len(timed) == 2  # cached
    with torch.no_grad():
        ops.stacked_linear(x, weight, bias)  # inference is another problem: forward only
    (entry, inference) = ops.stacked_linear_choices()
    assert entry["backend"] in autotune.CANDIDATES and set(entry["median_ms"]) == {"reference", "triton"}
    assert entry["grads"] == (True, True, True) and inference["grads"] == (False, False, False)
    assert entry["backend"] == min(entry["median_ms"], key=entry["median_ms"].get)
    ops.clear_stacked_linear_choices()


@pytest.mark.gpu
def test_auto_does_not_measure_during_cuda_graph_capture(monkeypatch):
    monkeypatch.delenv(ops.STACKED_LINEAR_ENV, raising=False)
    ops.clear_stacked_linear_choices()
    chosen = _record_backends(monkeypatch)
    x, weight, bias = _inputs(4, 64, 96, 48, device="cuda")
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, with a fixed backend: nothing measured
        ops.stacked_linear(x, weight, bias, backend="reference")
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        y = ops.stacked_linear(x, weight, bias)
    assert chosen[-1] == "reference" and ops.stacked_linear_choices() == []
    graph.replay()
    assert_close(y, torch.baddbmm(bias.unsqueeze(1), x, weight))


@pytest.mark.gpu
def test_triton_forward_and_backward_capture_in_a_cuda_graph():
    x, weight, bias = (t.requires_grad_() for t in _inputs(10, 128, 256, 128, device="cuda"))
    upstream = _upstream(x, weight)

    def step():
        y = ops.stacked_linear(x, weight, bias, backend="triton")
        return (y.detach(), *torch.autograd.grad(y, (x, weight, bias), upstream))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        expected = step()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for actual, e in zip(captured, expected):
        assert_close(actual, e)
