"""Trust and integrity (issue 9), in process: safe checkpoints, no silent data loss, named errors.

One test (at least) per numbered item of the issue; the hostile command-line suite, which runs
``noprop`` in subprocesses, is ``tests/test_hostile_cli.py``.
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import pytest
import torch

from noprop import checkpoint as ckpt
from noprop.cli import main
from noprop.data import BatchLoader, load_dataset
from noprop.models import MODELS, build_model
from noprop.step import TrainStep
from noprop.train import NonFiniteLossError, TrainConfig, train
from test_data import make_idx_folder
from test_train import config, tiny_digits

SMALL = dict(num_classes=10, in_channels=1, image_size=8, width=0.125)


def small_model(method: str):
    kwargs = dict(SMALL)
    if method in ("dt", "backprop"):
        kwargs["T"] = 2
    if method == "adjoint":
        kwargs["ode_steps"] = 2
    return build_model(method, **kwargs)


def cli_train(tmp_path, data, out, *extra):
    return main(["train", "--method", "dt", "--dataset", "mnist", "--data-dir", str(data), "--epochs", "1", "--T", "2",
                 "--width", "0.125", "--batch-size", "16", "--out", str(out), "--no-progress", *extra])


@pytest.fixture
def idx_data(tmp_path):
    make_idx_folder(tmp_path / "data", n_train=48, n_test=16, size=8)
    return tmp_path / "data"


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A checkpoint of a finished one-epoch DT run (copy it before damaging it)."""
    folder = tmp_path_factory.mktemp("trained")
    train(config(folder, epochs=1), dataset=tiny_digits())
    return folder / "run" / "checkpoint.pt"


# ---------------------------------------------------------------------------------------------- 1


def test_1_checkpoint_loads_weights_only(trained_checkpoint):
    """Everything in a checkpoint (RNG states included) loads with ``torch.load(weights_only=True)``."""
    torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    state = ckpt.load(trained_checkpoint)
    assert state["epoch"] == 1 and set(state["rng"]) == {"torch", "cuda", "python", "numpy", "loader"}


def test_1_crafted_pickle_is_not_executed(tmp_path):
    marker = tmp_path / "owned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT_VERSION, "model": Exploit()}, evil)
    with pytest.raises(ValueError, match=f"checkpoint: {evil}") as refused:
        ckpt.load(evil)
    assert not marker.exists()
    # the message says what was refused and never passes on torch's advice to load it unsafely
    assert "nothing in it was run" in str(refused.value) and "weights_only" not in str(refused.value)


def test_1_files_that_are_not_checkpoints_get_one_clear_error(tmp_path):
    cases = {"empty.pt": b"", "text.pt": b"hello", "zip.pt": b"PK\x03\x04" + b"\x00" * 40}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    torch.save({"format": 1, "epoch": 3}, tmp_path / "old.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    (tmp_path / "folder.pt").mkdir()
    for path in sorted(tmp_path.iterdir()):
        with pytest.raises(ValueError, match=f"checkpoint: {path}"):
            ckpt.load(path)


# ---------------------------------------------------------------------------------------------- 2


def test_2_an_existing_run_is_not_overwritten(tmp_path, idx_data, capsys):
    out = tmp_path / "run"
    assert cli_train(tmp_path, idx_data, out) == 0
    before = (out / "checkpoint.pt").read_bytes(), (out / "metrics.json").read_text()
    assert cli_train(tmp_path, idx_data, out, "--seed", "1") == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--out" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert ((out / "checkpoint.pt").read_bytes(), (out / "metrics.json").read_text()) == before
    assert cli_train(tmp_path, idx_data, out, "--seed", "1", "--overwrite") == 0
    assert (out / "checkpoint.pt").read_bytes() != before[0]


def test_2_library_train_refuses_an_existing_run(tmp_path):
    data = tiny_digits()
    train(config(tmp_path, epochs=1), dataset=data)
    with pytest.raises(ValueError, match="out: .* already holds a run"):
        train(config(tmp_path, epochs=1), dataset=data)
    train(config(tmp_path, epochs=1, overwrite=True), dataset=data)


# ---------------------------------------------------------------------------------------------- 3


def test_3_flipped_bytes_are_detected(tmp_path, trained_checkpoint):
    data = bytearray(trained_checkpoint.read_bytes())
    for position in (len(data) // 3, len(data) // 2, 2 * len(data) // 3):
        damaged = bytearray(data)
        damaged[position] ^= 0x5A
        path = tmp_path / f"flipped-{position}.pt"
        path.write_bytes(bytes(damaged))
        with pytest.raises(ValueError, match=f"checkpoint: {path}"):
            ckpt.load(path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match=f"checkpoint: {truncated}"):
        ckpt.load(truncated)


def test_3_non_finite_tensors_are_refused_on_load(tmp_path, trained_checkpoint):
    state = ckpt.load(trained_checkpoint)
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name][0] = float("nan")
    path = tmp_path / "nan.pt"
    with pytest.raises(ValueError, match=f"model.{name}"):
        ckpt.save_atomic(state, path)  # never written ...
    assert not path.exists()
    ckpt.save_atomic(state, path, check_finite=False)  # ... and, if forced, never loaded
    with pytest.raises(ValueError, match=rf"checkpoint: {path}.*model\.{name}.*NaN or Inf"):
        ckpt.load(path)


# ---------------------------------------------------------------------------------------------- 4


def test_4_non_finite_parameters_stop_training_naming_the_block(tmp_path, monkeypatch):
    original = TrainStep._eager_step

    def poisoned(self, x, y, blocks):
        terms = original(self, x, y, blocks)
        with torch.no_grad():
            self.model.blocks.image.conv1.weight[-1].fill_(float("inf"))  # a row of block 3 (of T = 3)
        return terms

    monkeypatch.setattr(TrainStep, "_eager_step", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"blocks\.image\.conv1\.weight.*block 3"):
        train(config(tmp_path, epochs=1), dataset=tiny_digits())
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ---------------------------------------------------------------------------------------------- 5


@pytest.mark.parametrize("method", ["dt", "backprop"])
def test_5_a_last_batch_of_one_does_not_end_the_epoch(tmp_path, method):
    history = train(config(tmp_path, method=method, epochs=1), dataset=tiny_digits(n_train=65)).history
    assert len(history) == 1 and math.isfinite(history[0]["loss"])


def test_5_the_loader_drops_only_a_last_batch_of_one():
    x, y = torch.zeros(65, 1), torch.arange(65)
    loader = BatchLoader(x, y, 32, shuffle=True, generator=torch.Generator().manual_seed(0), drop_single=True)
    assert [len(b) for _, b in loader] == [32, 32]
    assert [len(b) for _, b in BatchLoader(torch.zeros(66, 1), torch.arange(66), 32, drop_single=True)] == [32, 32, 2]
    assert [len(b) for _, b in BatchLoader(x, y, 32)] == [32, 32, 1]  # the default keeps every example


def test_5_a_training_set_without_a_batch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="train_limit"):
        train(config(tmp_path, epochs=1), dataset=tiny_digits(n_train=1))


# ---------------------------------------------------------------------------------------------- 6


@pytest.mark.parametrize(
    "overrides,name",
    [
        (dict(eta=-0.1), "eta"),
        (dict(eta=0.0), "eta"),
        (dict(eta=float("nan")), "eta"),
        (dict(eta=float("inf")), "eta"),
        (dict(lr=float("nan")), "lr"),
        (dict(lr=float("inf")), "lr"),
        (dict(width=float("nan")), "width"),
        (dict(width=float("inf")), "width"),
        (dict(weight_decay=float("nan")), "weight_decay"),
        (dict(weight_decay=float("inf")), "weight_decay"),
        (dict(grad_clip=float("nan")), "grad_clip"),
        (dict(grad_clip=-1.0), "grad_clip"),
        (dict(train_limit=0), "train_limit"),
        (dict(eval_limit=-1), "eval_limit"),
        (dict(block_chunk=0), "block_chunk"),
        (dict(method="ct", block_chunk=2), "block_chunk"),
    ],
)
def test_6_nonsense_hyper_parameters_are_named(tmp_path, overrides, name):
    with pytest.raises(ValueError, match=rf"^{name}( \(|:)"):
        config(tmp_path, **overrides)


@pytest.mark.parametrize(
    "overrides,name",
    [
        (dict(method="fm", eta=0.5), "eta"),
        (dict(method="backprop", eta=0.5), "eta"),
        (dict(method="ct", T=3), "T"),
        (dict(method="ct", ode_steps=5), "ode_steps"),
        (dict(method="dt", inference_steps=5), "inference_steps"),
    ],
)
def test_6_options_that_do_not_apply_are_named_and_dropped(tmp_path, overrides, name):
    with pytest.warns(UserWarning, match=rf"^{name} \(--"):
        made = config(tmp_path, **overrides)
    assert getattr(made, name) is None


def test_6_the_command_line_rejects_options_that_do_not_apply(tmp_path, capsys):
    for extra, flag in ((["--method", "fm", "--eta", "0.5"], "--eta"), (["--method", "ct", "--T", "4"], "--T"),
                        (["--eta", "-1"], "eta")):
        assert main(["train", "--out", str(tmp_path / "never"), "--no-progress", *extra]) == 2
        assert flag in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_6_options_that_do_not_apply_are_not_recorded(tmp_path):
    ct = config(tmp_path, method="ct")
    assert ct.T is None and ct.ode_steps is None and ct.eta == 1.0  # CT's eta is the paper's, filled in
    assert config(tmp_path, method="fm").eta is None
    dt = config(tmp_path, method="dt")
    assert dt.T == 3 and dt.ode_steps is None and dt.inference_steps is None


def test_6_resume_rejects_options_that_conflict_with_the_checkpoint(tmp_path):
    data = tiny_digits()
    train(config(tmp_path, epochs=1), dataset=data)
    resume = str(tmp_path / "run" / "checkpoint.pt")
    for overrides, name in ((dict(lr=0.01), "lr"), (dict(method="ct"), "method"), (dict(T=4), "T"),
                            (dict(batch_size=16), "batch_size"), (dict(seed=5), "seed")):
        with pytest.raises(ValueError, match=rf"^resume: {name} "):
            train(config(tmp_path, epochs=2, resume=resume, **overrides), dataset=data)
    with pytest.raises(ValueError, match="epochs"):
        train(config(tmp_path, epochs=1, resume=resume), dataset=data)
    # the checkpoint's own values and the options that may change are fine
    history = train(config(tmp_path, epochs=2, lr=1e-3, resume=resume, block_chunk=1), dataset=data).history
    assert [r["epoch"] for r in history] == [1, 2]


# ---------------------------------------------------------------------------------------------- 7


def test_7_eval_normalises_with_the_checkpoint_statistics(tmp_path, monkeypatch, capsys):
    import noprop.train as train_module

    first, second = tmp_path / "a", tmp_path / "b"
    make_idx_folder(first, n_train=48, n_test=16, size=8)
    make_idx_folder(second, n_train=48, n_test=16, size=8)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):  # the same test set ...
        (second / name).write_bytes((first / name).read_bytes())
    make_idx_folder(tmp_path / "other", n_train=20, n_test=16, size=8, seed=7)  # ... other training images
    (second / "train-images-idx3-ubyte.gz").write_bytes((tmp_path / "other" / "train-images-idx3-ubyte.gz").read_bytes())
    (second / "train-labels-idx1-ubyte.gz").write_bytes((tmp_path / "other" / "train-labels-idx1-ubyte.gz").read_bytes())
    assert cli_train(tmp_path, first, tmp_path / "run") == 0
    seen = []
    original = train_module.evaluate
    monkeypatch.setattr(train_module, "evaluate", lambda model, x, y, **kw: seen.append(x.clone()) or original(model, x, y, **kw))
    checkpoint = str(tmp_path / "run" / "checkpoint.pt")
    assert main(["eval", "--checkpoint", checkpoint]) == 0
    assert main(["eval", "--checkpoint", checkpoint, "--data-dir", str(second)]) == 0
    torch.testing.assert_close(seen[0], seen[1], rtol=0, atol=0)
    stored = ckpt.load(checkpoint)["dataset"]
    expected = load_dataset("mnist", data_dir=first)
    assert stored["mean"] == expected.mean and stored["std"] == expected.std


# ---------------------------------------------------------------------------------------------- 8


def test_8_resume_after_the_shell_and_the_data_move(tmp_path, idx_data, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_train(tmp_path, pathlib.Path("data"), pathlib.Path("run")) == 0
    state = ckpt.load(tmp_path / "run" / "checkpoint.pt")
    assert state["config"]["data_dir"] == str(idx_data.resolve())
    assert state["config"]["out"] == str((tmp_path / "run").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    checkpoint = str(tmp_path / "run" / "checkpoint.pt")
    assert main(["train", "--resume", checkpoint, "--epochs", "2", "--no-progress"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"][-1]["epoch"] == 2
    moved = tmp_path / "moved"
    idx_data.rename(moved)
    assert main(["train", "--resume", checkpoint, "--epochs", "3", "--no-progress"]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert main(["train", "--resume", checkpoint, "--epochs", "3", "--no-progress", "--data-dir", str(moved)]) == 0
    assert ckpt.load(checkpoint)["config"]["data_dir"] == str(moved)


def test_8_other_data_under_the_same_name_is_refused_on_resume(tmp_path, idx_data, capsys):
    assert cli_train(tmp_path, idx_data, tmp_path / "run") == 0
    make_idx_folder(tmp_path / "other", n_train=48, n_test=16, size=8, seed=3)
    argv = ["train", "--resume", str(tmp_path / "run" / "checkpoint.pt"), "--epochs", "2", "--no-progress",
            "--data-dir", str(tmp_path / "other")]
    assert main(argv) == 2
    assert "data_dir" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 9


@pytest.mark.parametrize("method", sorted(MODELS))
def test_9_an_empty_batch_is_one_clear_error(method):
    model = small_model(method)
    x, y = torch.randn(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="^x: .*empty batch"):
        model.loss(x, y)
    model.eval()
    with pytest.raises(ValueError, match="^x: .*empty batch"):
        model.predict(x, steps=2)


# ---------------------------------------------------------------------------------------------- 10


def test_10_stale_temporary_files_are_removed(tmp_path):
    data = tiny_digits()
    run = tmp_path / "run"
    run.mkdir()
    stale = [run / ".checkpoint.pt.abc123.tmp", run / ".metrics.json.tmp"]
    for path in stale:
        path.write_bytes(b"x" * 1000)
    (run / "notes.tmp").write_text("mine")  # not ours: kept
    train(config(tmp_path, epochs=1), dataset=data)
    assert not any(path.exists() for path in stale) and (run / "notes.tmp").exists()


def test_10_metrics_never_list_an_epoch_without_a_checkpoint(tmp_path, monkeypatch):
    original = ckpt.save_atomic

    def crash_on_epoch_2(payload, path, **kwargs):
        if payload["epoch"] == 2:
            raise OSError("disk full")
        return original(payload, path, **kwargs)

    monkeypatch.setattr(ckpt, "save_atomic", crash_on_epoch_2)
    with pytest.raises(OSError, match="disk full"):
        train(config(tmp_path, epochs=2), dataset=tiny_digits())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["epochs"]] == [1] == [ckpt.load(tmp_path / "run" / "checkpoint.pt")["epoch"]]


# ---------------------------------------------------------------------------------------------- also


@pytest.mark.parametrize("method", ["dt", "ct"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_inputs_in_another_float_dtype_are_cast(method, dtype):
    model = small_model(method).eval()
    x = torch.randn(4, 1, 8, 8)
    expected = model.predict(x, steps=2, deterministic=True)
    got = model.predict(x.to(dtype), steps=2, deterministic=True)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, model.predict(x.to(dtype).float(), steps=2, deterministic=True))
    model.train()
    assert torch.isfinite(model.loss(x.to(dtype), torch.arange(4)))


def test_integer_images_and_other_devices_name_x():
    model = small_model("fm")
    with pytest.raises(TypeError, match="^x: "):
        model.loss(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.arange(2))
    with pytest.raises(ValueError, match="^x: "):
        model.loss(torch.zeros(2, 1, 8, 8, device="meta"), torch.arange(2))


def test_a_training_batch_of_one_is_named_for_batchnorm_models():
    model = small_model("dt")
    with pytest.raises(ValueError, match="^x: .*BatchNorm"):
        model.loss(torch.randn(1, 1, 8, 8), torch.tensor([3]))
    assert torch.isfinite(small_model("fm").loss(torch.randn(1, 1, 8, 8), torch.tensor([3])))
