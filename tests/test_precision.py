"""``--precision {fp32,tf32,bf16}``: the scopes, the trainer and evaluation at each precision, the CLI.

bf16 results are compared with fp32's at the bfloat16 tolerance of ``conftest.TOLERANCES``, and
the tests check that bfloat16 really reached the ops (a spy on the backend registry's
``resolve``, which every op calls with its inputs' dtypes).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import TOLERANCES, assert_close
from noprop import backends
from noprop import checkpoint as ckpt
from noprop.cli import main
from noprop.config import RESUME_MAY_CHANGE
from noprop.models import build_model
from noprop.precision import PRECISIONS, autocast, check_backend, precision_scope, tf32_scope
from noprop.train import TrainConfig, evaluate, train
from test_data import make_idx_folder
from test_train import tiny_digits


def _tf32_flags() -> tuple:
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())


@pytest.fixture
def op_dtypes(monkeypatch):
    """Records ``(op, chosen backend, dtypes)`` of every op dispatched through the registry."""
    calls = []
    resolve = backends.resolve

    def spy(op, backend, device, dtypes=()):
        chosen = resolve(op, backend, device, dtypes)
        calls.append((op, chosen, tuple(dtypes)))
        return chosen

    monkeypatch.setattr(backends, "resolve", spy)
    return calls


def _config(tmp_path, method, precision, **overrides):
    steps = {"T": 3} if method in ("dt", "backprop") else {"inference_steps": 4}
    base = dict(method=method, width=0.125, batch_size=32, epochs=1, out=str(tmp_path / precision), progress=False, precision=precision)
    return TrainConfig(**{**base, **steps, **overrides})


# ---------------------------------------------------------------------------------------------- the scopes


def test_tf32_scope_sets_the_flags_and_restores_them_even_on_error():
    before = _tf32_flags()
    with tf32_scope():
        assert _tf32_flags() == (True, True, "high")
    assert _tf32_flags() == before
    torch.backends.cudnn.allow_tf32 = not before[1]  # a caller's own setting is what comes back
    try:
        with pytest.raises(KeyError), tf32_scope():
            raise KeyError("inside")
        assert _tf32_flags() == (before[0], not before[1], before[2])
    finally:
        torch.backends.cudnn.allow_tf32 = before[1]
    assert _tf32_flags() == before


def test_precision_scope_per_precision():
    before = _tf32_flags()
    with precision_scope("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu") and _tf32_flags() == before
    with precision_scope("tf32", "cpu"):
        assert not torch.is_autocast_enabled("cpu") and _tf32_flags()[0]
    with precision_scope("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
        assert _tf32_flags() == before
    assert not torch.is_autocast_enabled("cpu") and _tf32_flags() == before


@pytest.mark.parametrize("call", [
    lambda: precision_scope("fp16", "cpu"),
    lambda: autocast("bfloat16", "cpu"),
    lambda: TrainConfig(precision="half"),
    lambda: evaluate(build_model("fm", num_classes=10, in_channels=1, image_size=8, width=0.125), torch.zeros(2, 1, 8, 8),
                     torch.zeros(2, dtype=torch.long), steps=2, precision="fp64"),
])
def test_a_bad_precision_is_named(call):
    with pytest.raises(ValueError, match=r"precision: expected one of \('fp32', 'tf32', 'bf16'\)"):
        call()


def test_bf16_with_a_fused_backend_on_the_cpu_is_refused_by_name(tmp_path):
    """The fused backends take float32 only on the CPU (the registry says so); auto and the reference take bf16."""
    for backend in ("triton", "extension"):
        with pytest.raises(ValueError, match=f"precision: 'bf16' runs the blocks in bfloat16, but backend '{backend}' takes float32 on cpu"):
            check_backend("bf16", backend, "cpu")
        check_backend("fp32", backend, "cpu")
        check_backend("bf16", backend, "cuda")  # declared there
    for backend in ("auto", "reference"):
        check_backend("bf16", backend, "cpu")
    with pytest.raises(ValueError, match="precision: 'bf16'.*backend 'extension'"):
        train(_config(tmp_path, "dt", "bf16", backend="extension", device="cpu"), dataset=tiny_digits())


# ---------------------------------------------------------------------------------------------- training and inference


@pytest.mark.parametrize("method", ["dt", "ct"])
def test_bf16_training_is_finite_and_close_to_fp32(tmp_path, method, op_dtypes):
    """Three steps (96 examples, batch 32) and an evaluation at each precision, the same seed."""
    data = tiny_digits()
    history = {}
    for precision in ("fp32", "bf16"):
        op_dtypes.clear()
        history[precision] = train(_config(tmp_path, method, precision), dataset=data).history[0]
        logits_dtypes = {dtypes[0] for op, _, dtypes in op_dtypes if op == "denoising_loss"}
        assert logits_dtypes == {torch.bfloat16 if precision == "bf16" else torch.float32}, (precision, logits_dtypes)
    fp32, bf16 = history["fp32"], history["bf16"]
    for key in ("loss", "l2"):
        value = torch.tensor(bf16[key])
        assert torch.isfinite(value).all(), key
        assert_close(value, torch.tensor(fp32[key]), torch.bfloat16, msg=key)
    assert bf16["loss"] != fp32["loss"]  # bf16 did change the arithmetic


@pytest.mark.parametrize("method", ["dt", "ct", "fm", "backprop"])
def test_autocast_around_the_whole_step_gives_the_forward_only_gradients(method):
    """The trainer runs the whole step under autocast (noprop.precision.precision_scope); backward
    ops follow their forward's dtype either way, so the gradients equal those of autocast around
    the forward and the loss alone."""
    torch.manual_seed(0)
    model = build_model(method, num_classes=10, in_channels=1, image_size=8, width=0.125, **({"T": 3} if method in ("dt", "backprop") else {}))
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    torch.manual_seed(1)
    with autocast("bf16", "cpu"):
        loss = model.loss(x, y)
    loss.backward()
    torch.manual_seed(1)
    with autocast("bf16", "cpu"):
        twin_loss = twin.loss(x, y)
        twin_loss.backward()
    assert loss.dtype == torch.float32 and torch.equal(loss, twin_loss)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert p.dtype == torch.float32 and (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert_close(q.grad, p.grad, msg=name)


def test_bf16_evaluation_agrees_with_fp32():
    """Inference under bf16 autocast: the predicted classes of a model agree with fp32's on most examples."""
    torch.manual_seed(0)
    model = build_model("ct", num_classes=10, in_channels=1, image_size=8, width=0.125)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    predicted = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(2)
        _, predicted[precision] = evaluate(model, x, y, steps=8, deterministic=True, precision=precision)
    assert (predicted["bf16"] == predicted["fp32"]).float().mean() >= 0.9


def test_tf32_run_leaves_no_global_state_and_matches_fp32_on_the_cpu(tmp_path):
    before = _tf32_flags()
    data = tiny_digits()
    fp32 = train(_config(tmp_path, "dt", "fp32"), dataset=data).history[0]
    tf32 = train(_config(tmp_path, "dt", "tf32"), dataset=data).history[0]
    assert _tf32_flags() == before
    assert tf32["loss"] == fp32["loss"]  # TF32 changes GPU matmuls only


# ---------------------------------------------------------------------------------------------- CLI and checkpoints


def test_cli_precision_round_trip(tmp_path, capsys):
    """--precision is recorded in metrics.json and the checkpoint, may change on resume, and eval takes it too."""
    assert "precision" in RESUME_MAY_CHANGE
    make_idx_folder(tmp_path / "data", n_train=64, n_test=32, size=8)
    out = tmp_path / "run"
    common = ["--no-progress", "--data-dir", str(tmp_path / "data")]
    argv = ["train", "--method", "dt", "--dataset", "fashion-mnist", "--epochs", "1", "--T", "2", "--width", "0.125",
            "--batch-size", "32", "--out", str(out), "--precision", "bf16", *common]
    assert main(argv) == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["precision"] == "bf16"
    assert ckpt.load(out / "checkpoint.pt")["config"]["precision"] == "bf16"
    capsys.readouterr()
    assert main(["train", "--resume", str(out / "checkpoint.pt"), "--epochs", "2", "--precision", "tf32", *common]) == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["precision"] == "tf32"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--data-dir", str(tmp_path / "data")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["precision"] == "tf32"  # the run's by default
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--data-dir", str(tmp_path / "data"), "--precision", "bf16"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["precision"] == "bf16"
    for command in (["train"], ["eval", "--checkpoint", str(out / "checkpoint.pt")]):
        with pytest.raises(SystemExit):
            main([*command, "--precision", "fp16"])
        assert "--precision: invalid choice: 'fp16'" in capsys.readouterr().err
    assert PRECISIONS == ("fp32", "tf32", "bf16")


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["dt", "ct", "fm"])
def test_bf16_training_on_the_gpu_runs_the_fused_ops_in_bf16(tmp_path, method, op_dtypes):
    """On CUDA, auto picks a fused backend for the bfloat16 logits, and bf16 training stays close to fp32's."""
    data = tiny_digits()
    history = {}
    for precision in ("fp32", "bf16"):
        op_dtypes.clear()
        history[precision] = train(_config(tmp_path, method, precision, device="cuda"), dataset=data).history[0]
        logits = torch.bfloat16 if precision == "bf16" else torch.float32
        for name in ("denoising_loss", "latent_update"):  # training's loss; inference's steps
            fused = {(chosen != "reference", dtypes[0]) for op, chosen, dtypes in op_dtypes if op == name}
            assert fused == {(True, logits)}, (name, precision, fused)
    for key in ("loss", "l2"):
        value = torch.tensor(history["bf16"][key])
        assert torch.isfinite(value).all(), key
        torch.testing.assert_close(value, torch.tensor(history["fp32"][key]), **TOLERANCES[torch.bfloat16])
