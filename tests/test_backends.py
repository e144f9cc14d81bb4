"""The backend registry (:mod:`noprop.backends`): dispatch, ``auto``, errors, deprecation, ``noprop info``, a toy backend.

The op tests (tests/test_<op>.py) are parametrised over the registry; here a toy backend is
registered in a few lines and the whole op suite runs against it in a subprocess.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

from noprop import backends, ops, reference, rng
from noprop.backends import BackendUnavailableError
from op_testing import make_inputs

TESTS = pathlib.Path(__file__).resolve().parent
OP_TEST_FILES = [f"tests/test_{op}.py" for op in backends.OPS]



# ---------------------------------------------------------------------------------------------- the registry


def test_every_builtin_backend_declares_its_ops_devices_and_dtypes():
    statuses = ops.available_backends()
    assert list(statuses)[:3] == ["reference", "triton", "extension"]
    for name, status in statuses.items():
        backend = backends.get(name)
        assert set(status.ops) | set(status.lacks) == set(backends.OPS), name
        assert set(status.devices) <= set(status.dtypes) and set(status.why_not) == set(status.dtypes) - set(status.devices)
        assert all(status.why_not.values()), name  # a device it cannot run on always says why
        assert backend.summary and backend.kind in ("autograd", "kernels")
    assert statuses["extension"].lacks["stacked_linear"].startswith("the C++/CUDA extension has no GEMM")
    assert backends.implementing("stacked_linear") == tuple(n for n in backends.names() if n != "extension")


def test_stacked_linear_goes_through_the_registry(monkeypatch):
    x, weight, bias = torch.randn(2, 3, 4), torch.randn(2, 4, 5), torch.randn(2, 5)
    with pytest.raises(BackendUnavailableError, match="'extension' has no stacked_linear: the C\\+\\+/CUDA extension has no GEMM"):
        ops.stacked_linear(x, weight, bias, backend="extension")
    monkeypatch.setenv("NOPROP_BACKEND", "extension")  # names a backend without the op: auto keeps its rule
    assert backends.resolve("stacked_linear", "auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv("NOPROP_BACKEND", "reference")
    monkeypatch.setenv("NOPROP_BACKEND_NORMAL", "extension" if "cpu" in ops.available_backends()["extension"].devices else "reference")
    assert backends.resolve("normal", "auto", torch.device("cpu")) == os.environ["NOPROP_BACKEND_NORMAL"]
    assert backends.resolve("latent_update", "auto", torch.device("cpu")) == "reference"


def test_the_old_name_cuda_still_works_with_a_deprecation_warning(monkeypatch):
    with pytest.warns(DeprecationWarning, match="'cuda' is deprecated.*'extension'"):
        assert backends.canonical("cuda") == "extension"
    if "cpu" in ops.available_backends()["extension"].devices:
        with pytest.warns(DeprecationWarning, match="'cuda' is deprecated"):
            eps = ops.normal(3, (5,), backend="cuda")
        torch.testing.assert_close(eps, ops.normal(3, (5,), backend="extension"), rtol=0, atol=0)
        monkeypatch.setenv("NOPROP_BACKEND", "cuda")
        with pytest.warns(DeprecationWarning, match="NOPROP_BACKEND"):
            assert backends.resolve("normal", "auto", torch.device("cpu")) == "extension"
    from noprop import NoPropDT

    with pytest.warns(DeprecationWarning):
        model = NoPropDT(10, 1, 28, T=2, width=0.125, backend="cuda")
    assert model.backend == "extension" and model.config()["backend"] == "extension"


def test_model_backend_reaches_the_stacked_layers():
    """``NoPropDT(backend="reference")`` runs its stacked layers on the reference, and a later change reaches them."""
    from noprop import NoPropDT
    from noprop.stacked_layers import StackedLinear

    def layer_backends(model):
        return {m.backend for m in model.modules() if isinstance(m, StackedLinear)}

    model = NoPropDT(10, 1, 28, T=2, width=0.125, backend="reference")
    assert layer_backends(model) == {"reference"}
    model.backend = "triton"
    assert layer_backends(model) == {"triton"}
    model.backend = "extension"  # no stacked_linear there: the reference runs it
    assert model.backend == "extension" and layer_backends(model) == {"reference"}
    assert layer_backends(NoPropDT(10, 1, 28, T=2, width=0.125)) == {"auto"}


def test_noprop_info_prints_every_backend_and_op_from_the_registry(capsys):
    from noprop.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name, status in ops.available_backends().items():
        section = out.split(f"  {name} (")[1]
        for op in backends.OPS:
            row = re.search(rf"^    {op} +(.*)$", section, re.M).group(1)
            if op in status.lacks:
                assert row == f"not implemented: {status.lacks[op]}"
                continue
            for device, dtypes in status.dtypes.items():
                if device in status.devices:
                    assert f"{device} [{', '.join(backends.dtype_name(d) for d in dtypes)}]" in row
                else:
                    assert f"{device}: no ({status.why_not[device]})" in row


TOY = """
import torch
from noprop import backends, reference

backends.register(backends.Backend(
    "toy", "autograd", "the reference under another name", load=lambda: reference,
    probe=lambda: {"cpu": ""}, dtypes={"cpu": (torch.float32,)},
))
"""


def test_registering_a_backend_adds_it_everywhere():
    namespace: dict = {}
    exec(TOY, namespace)
    try:
        assert "toy" in backends.names() and "toy" in backends.implementing("stacked_linear")
        assert ops.available_backends()["toy"].devices == ("cpu",)
        W, y, a, b, _, _ = make_inputs(2, 3, 4, 5, per_example=False)
        torch.testing.assert_close(ops.noised_latents(W, y, a, b, 1, backend="toy"), ops.noised_latents(W, y, a, b, 1, backend="reference"))
        with pytest.raises(BackendUnavailableError, match="supports float32 on cpu, got float64"):
            ops.noised_latents(W.double(), y, a, b, 1, backend="toy")
        with pytest.raises(ValueError, match="taken"):
            exec(TOY, {})
    finally:
        backends.unregister("toy")
    assert "toy" not in backends.names()


def test_a_registered_toy_backend_runs_the_op_suite(tmp_path):
    """The toy (the reference under another name, registered in the lines of ``TOY``) runs every op test file."""
    (tmp_path / "toy_backend.py").write_text(TOY)
    env = dict(os.environ, NOPROP_TEST_BACKEND_MODULES="toy_backend", PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "not gpu", "-k", "toy", *OP_TEST_FILES]
    result = subprocess.run(command, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=900)
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= 50 and not re.search(r"failed|error|skipped", summary), summary  # 78 when written
    for path in OP_TEST_FILES:  # every op's tests ran on the toy
        assert re.search(rf"^{re.escape(path)}::\S+\[\S*toy\S*\] PASSED", result.stdout, re.M), path


# ---------------------------------------------------------------------------------------------- dispatch


def test_auto_on_cpu_picks_reference(monkeypatch):
    monkeypatch.delenv("NOPROP_BACKEND", raising=False)
    assert backends.resolve("noised_latents", "auto", torch.device("cpu")) == "reference"


def test_noprop_backend_overrides_auto(monkeypatch):
    monkeypatch.setenv("NOPROP_BACKEND", "reference")
    assert backends.resolve("noised_latents", "auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv("NOPROP_BACKEND", "magic")
    with pytest.raises(ValueError, match="NOPROP_BACKEND"):
        backends.resolve("noised_latents", "auto", torch.device("cpu"))


def test_unknown_backend_is_named():
    W, y, a, b, _, _ = make_inputs(2, 3, 4, 5, per_example=False)
    with pytest.raises(ValueError, match="backend.*'fast'"):
        ops.noised_latents(W, y, a, b, 1, backend="fast")


def test_explicit_backend_that_cannot_run_says_why():
    W, y, a, b, _, _ = make_inputs(2, 3, 4, 5, per_example=False)
    for backend, status in ops.available_backends().items():
        if "cpu" in status.devices:
            continue
        with pytest.raises(BackendUnavailableError, match=backend):
            ops.noised_latents(W, y, a, b, 1, backend=backend)
    for backend in backends.names():
        status = ops.available_backends()[backend]
        if "cpu" in status.devices and torch.float64 not in status.dtypes["cpu"]:
            with pytest.raises(BackendUnavailableError, match="float64"):
                ops.noised_latents(W.double(), y, a, b, 1, backend=backend)


def test_fused_backends_present_where_their_toolchain_is():
    """A CI machine with a compiler must have built the extension; Triton must run in the interpreter.

    Without this, a broken build would turn every fused-op test into a silent skip.
    """
    statuses = ops.available_backends()
    if shutil.which("c++") or shutil.which("g++"):
        assert "cpu" in statuses["extension"].devices, statuses["extension"].reason
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
    W, y, a, b, logits, _ = make_inputs(2, 3, 4, 5, per_example=False)
    with pytest.raises((ValueError, TypeError), match=match):
        call(W, y, a, b, logits)


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


def test_import_never_fails_without_triton_or_the_extension():
    """A machine without Triton and without the built extension still imports noprop and runs the reference."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['triton'] = None; sys.modules['noprop._C'] = None\n"
        "import torch, noprop\n"
        "status = noprop.available_backends()\n"
        "assert status['triton'].devices == () and 'triton' in status['triton'].reason, status\n"
        "assert status['extension'].devices == () and 'not built' in status['extension'].reason, status\n"
        "W = torch.randn(4, 5); y = torch.tensor([0, 3])\n"
        "z = noprop.ops.noised_latents(W, y, torch.ones(2), torch.ones(2), 1)\n"
        "assert z.shape == (2, 2, 5)\n"
        "try:\n"
        "    noprop.ops.noised_latents(W, y, torch.ones(2), torch.ones(2), 1, backend='extension')\n"
        "except noprop.ops.BackendUnavailableError as e:\n"
        "    assert 'not built' in str(e)\n"
        "else:\n"
        "    raise AssertionError('expected BackendUnavailableError')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
