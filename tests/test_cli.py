"""The ``noprop`` command line: train, eval, info, and its errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from noprop.cli import main
from test_data import make_idx_folder


def test_info_lists_versions_and_backends(capsys):
    from noprop import backends

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "backends:" in out
    for backend in backends.names():  # every backend x op, from the registry: tests/test_backends.py
        assert f"  {backend} (" in out


def test_train_then_eval_from_a_data_dir(tmp_path, capsys):
    make_idx_folder(tmp_path / "data", n_train=64, n_test=32)
    out = tmp_path / "run"
    argv = ["train", "--method", "dt", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "data"), "--epochs", "1",
            "--T", "2", "--width", "0.125", "--batch-size", "32", "--out", str(out), "--no-progress",
            "--deterministic-inference"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dataset"] == "fashion-mnist" and summary["epoch"] == 1
    for name in ("metrics.json", "curves.png", "checkpoint.pt"):
        assert (out / name).is_file(), name
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the checkpoint reproduces the trained model: with z_0 = 0 inference is deterministic, so eval
    # gives exactly the accuracy the trainer measured after the last epoch (a multiple of 1/32)
    assert result["test_examples"] == 32 and result["test_accuracy"] == summary["test_accuracy"]
    assert (result["test_accuracy"] * 32) == round(result["test_accuracy"] * 32)
    assert result["inference"] == {"steps": None, "solver": None, "deterministic": True}, "eval says how it sampled"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--data-dir", "/no/such/folder", "--no-progress"], "data_dir: /no/such/folder is not a directory"),
        (["train", "--epochs", "0", "--no-progress"], "epochs: expected an int >= 1"),
        (["eval", "--checkpoint", "/no/such/checkpoint.pt"], "checkpoint: /no/such/checkpoint.pt does not exist"),
    ],
)
def test_errors_name_the_argument(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_method_or_dataset_is_refused(capsys):
    for argv in (["train", "--method", "sgd"], ["train", "--dataset", "imagenet"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert "invalid choice" in capsys.readouterr().err


def test_console_script_is_installed():
    executable = shutil.which("noprop") or str(__import__("pathlib").Path(sys.executable).parent / "noprop")
    result = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "noprop" in result.stdout
