"""Fuzzing the public op and model signatures (hypothesis): random shapes, dtypes, devices and values.

Every call either computes a result (the fused backends equal to the reference within the dtype's
tolerance, NaN where the reference has NaN) or raises ``ValueError``/``TypeError`` whose message
starts with the argument it is about (``BackendUnavailableError`` when an explicitly chosen fused
backend cannot run the input, saying why). Nothing else may escape: no ``RuntimeError`` from
PyTorch, no ``IndexError``, no crash.
"""

from __future__ import annotations

import re

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import TOLERANCES  # noqa: E402
from noprop import ops  # noqa: E402
from noprop.backends import BackendUnavailableError  # noqa: E402
from noprop.models import MODELS, build_model  # noqa: E402

DEVICES = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
NAMED = re.compile(r"^[A-Za-z_][\w\[\] ,'()-]*:")
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def fused_backends() -> list[str]:
    statuses = ops.available_backends()
    return [name for name, status in statuses.items() if name != "reference" and "cpu" in status.devices]


def assert_named(error: BaseException, names: tuple[str, ...]) -> None:
    message = str(error)
    if isinstance(error, BackendUnavailableError):
        assert "backend" in message, message
        return
    assert NAMED.match(message), f"{type(error).__name__} does not start with an argument name: {message}"
    assert message.split(":")[0].split(" ")[0].strip("'") in names, f"unexpected argument in: {message}"


def tensor(draw, shape, dtype, device, values=st.floats(-3, 3)):
    if dtype in FLOATS:
        special = draw(st.sampled_from([None, None, None, float("nan"), float("inf")]))
        data = torch.tensor(draw(st.lists(values, min_size=int(torch.Size(shape).numel()), max_size=int(torch.Size(shape).numel()))),
                            dtype=torch.float64).reshape(shape)
        if special is not None and data.numel():
            data.view(-1)[0] = special
        result = data.to(dtype)
    else:
        low = 0 if dtype == torch.uint8 else -2
        count = int(torch.Size(shape).numel())
        result = torch.tensor(draw(st.lists(st.integers(low, 5), min_size=count, max_size=count)), dtype=dtype).reshape(shape)
    return result.to(device) if device != "cpu" else result


@st.composite
def op_problem(draw):
    T, B, C, D = draw(st.integers(1, 3)), draw(st.integers(0, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(FLOATS + [torch.int64]))
    device = draw(st.sampled_from(["cpu"] * 6 + DEVICES))
    W = tensor(draw, (C, D), dtype, "cpu")
    y_dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.float32]))
    low, high = (-1 if draw(st.booleans()) else 0), C - 1 + draw(st.integers(0, 1))
    count = B + draw(st.sampled_from([0, 0, 0, 1]))
    y = torch.tensor(draw(st.lists(st.integers(low, high), min_size=count, max_size=count)), dtype=torch.int64).to(y_dtype)
    coefficient_shape = draw(st.sampled_from([(T,), (T, B), (T + 1,), ()]))
    a = tensor(draw, coefficient_shape, draw(st.sampled_from([dtype, torch.float32])), "cpu")
    b = tensor(draw, coefficient_shape, torch.float32, device)
    logits = tensor(draw, (T, B, C + draw(st.sampled_from([0, 0, 0, 1]))), dtype, "cpu")
    z = tensor(draw, (B, D), dtype, "cpu")
    seed = draw(st.sampled_from([0, 7, 2**40, -1]))
    return dict(W=W, y=y, a=a, b=b, logits=logits, z=z, seed=seed, dtype=dtype)


CALLS = {
    "noised_latents": (lambda p, backend: ops.noised_latents(p["W"], p["y"], p["a"], p["b"], p["seed"], backend=backend),
                       ("W", "y", "a", "b", "seed")),
    "denoising_loss": (lambda p, backend: ops.denoising_loss(p["logits"], p["W"], p["y"], p["b"], backend=backend),
                       ("logits", "W", "y", "weight", "seed")),
    "denoising_loss_fm": (lambda p, backend: ops.denoising_loss(p["logits"], p["W"], p["y"], p["a"], readout="linear",
                                                                noise_coef=p["b"], seed=p["seed"], backend=backend),
                          ("logits", "W", "y", "weight", "noise_coef", "seed")),
    "latent_update": (lambda p, backend: ops.latent_update(p["logits"][0], p["W"], p["z"], p["a"], p["b"], 0.1, p["seed"],
                                                           backend=backend),
                      ("logits", "W", "z", "p", "q", "r", "seed")),
}


@pytest.mark.parametrize("op", sorted(CALLS))
@FUZZ
@given(problem=op_problem())
def test_ops_compute_the_reference_or_name_an_argument(op, problem):
    call, names = CALLS[op]
    try:
        expected = call(problem, "reference")
    except (ValueError, TypeError, BackendUnavailableError) as error:
        assert_named(error, names)
        expected = None
    for backend in fused_backends():
        try:
            got = call(problem, backend)
        except (ValueError, TypeError, BackendUnavailableError) as error:
            assert_named(error, names)
            continue
        assert expected is not None, f"{backend} computed a result where the reference raised"
        if problem["dtype"] in FLOATS and expected.device.type == "cpu":
            tolerance = TOLERANCES[problem["dtype"]] if problem["dtype"] != torch.float64 else TOLERANCES[torch.float32]
            torch.testing.assert_close(got.float(), expected.float(), equal_nan=True, **tolerance)


def test_latent_update_checks_the_device_of_its_row_coefficients():
    """Found by the fuzz test: a coefficient on another device used to let PyTorch's device error escape."""
    logits, W, z = torch.zeros(3, 2), torch.eye(2), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="^q: "):
        ops.latent_update(logits, W, z, 0.5, torch.zeros(3, device="meta"), 0.0, 0, backend="reference")
    with pytest.raises(ValueError, match="^p: "):
        ops.latent_update(logits, W, z, torch.zeros((), device="meta"), 0.5, 0.0, 0, backend="reference")


@pytest.fixture(scope="module")
def models():
    built = {}
    for method in sorted(MODELS):
        kwargs = dict(num_classes=4, in_channels=1, image_size=8, width=0.125)
        if method in ("dt", "backprop"):
            kwargs["T"] = 2
        if method == "adjoint":
            kwargs["ode_steps"] = 2
        built[method] = build_model(method, **kwargs)
    return built


@st.composite
def model_inputs(draw):
    B = draw(st.integers(0, 3))
    shape = (B, draw(st.sampled_from([1, 1, 1, 2])), draw(st.sampled_from([8, 8, 8, 7])), 8)
    dtype = draw(st.sampled_from(FLOATS + [torch.int64, torch.uint8]))
    device = draw(st.sampled_from(["cpu"] * 6 + DEVICES))
    x = tensor(draw, shape, dtype, device, values=st.floats(-2, 2))
    y_dtype = draw(st.sampled_from([torch.int64, torch.int64, torch.int32, torch.float32]))
    y = torch.randint(draw(st.sampled_from([0, 0, -1])), 4 + draw(st.sampled_from([0, 0, 1])), (B + draw(st.sampled_from([0, 0, 0, 1])),)).to(y_dtype)
    return x, y


@pytest.mark.parametrize("method", sorted(MODELS))
@FUZZ
@given(inputs=model_inputs(), training=st.booleans())
def test_models_compute_or_name_x_or_y(models, method, inputs, training):
    model = models[method].train(training)
    x, y = inputs
    try:
        loss = model.loss(x, y)
        assert loss.dim() == 0 and torch.isfinite(loss), loss
    except (ValueError, TypeError) as error:
        assert_named(error, ("x", "y"))
    model.eval()
    try:
        logits = model.predict(x, steps=2, deterministic=True)
        assert logits.shape == (x.shape[0], 4) and torch.isfinite(logits).all()
    except (ValueError, TypeError) as error:
        assert_named(error, ("x",))
