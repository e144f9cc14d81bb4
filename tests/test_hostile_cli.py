"""The ``noprop`` command against hostile-but-realistic input, run as a user runs it (subprocesses).

Damaged IDX and CIFAR files, damaged and crafted checkpoints, an existing output folder, moved
data, and signals during a checkpoint write. Every failure must be one line on stderr that names
the file or the option, exit status 2 (130 / 143 for SIGINT / SIGTERM), and no traceback. Each
run is tiny (8x8 images, T = 2, an eighth of the paper's width, one or two epochs).
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from noprop import checkpoint as ckpt
from test_data import make_idx_folder

# about 30 subprocesses of 3-8 s each (interpreter and torch start-up): part of the full suite, not of -m "not slow"
pytestmark = pytest.mark.slow

TRAIN = ["--method", "dt", "--dataset", "mnist", "--T", "2", "--width", "0.125", "--batch-size", "16", "--no-progress"]


def noprop(*argv, cwd=None, driver: str | None = None) -> subprocess.CompletedProcess:
    """Run ``noprop ARGV`` (or ``python -c DRIVER ARGV``, a script that ends by calling the CLI) in a subprocess."""
    command = [sys.executable, "-c", driver, *argv] if driver else [sys.executable, "-m", "noprop.cli", *argv]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str, status: int = 2) -> None:
    err = result.stderr.strip()
    assert result.returncode == status, (result.returncode, err)
    assert "Traceback" not in err, err
    last = err.splitlines()[-1] if err else ""
    assert last.startswith("noprop "), err
    for fragment in fragments:
        assert fragment in last, (fragment, err)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("idx")
    make_idx_folder(folder, n_train=48, n_test=16, size=8)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    """A finished one-epoch run: its folder holds checkpoint.pt and metrics.json (copy before damaging)."""
    out = tmp_path_factory.mktemp("run") / "run"
    result = noprop("train", *TRAIN, "--data-dir", str(data), "--epochs", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_damaged_idx_files(tmp_path, data):
    damages = {
        "truncated gzip": lambda raw: raw[: len(raw) // 2],
        "not gzip at all": lambda raw: b"this is not a gzip stream" * 4,
        "flipped bytes": lambda raw: raw[:20] + bytes(b ^ 0xFF for b in raw[20:40]) + raw[40:],
        "bad magic": lambda raw: gzip.compress(b"\x01\x02\x08\x03" + gzip.decompress(raw)[4:]),
        "wrong size": lambda raw: gzip.compress(gzip.decompress(raw)[:-5]),
        "empty": lambda raw: b"",
    }
    for what, damage in damages.items():
        folder = tmp_path / what.replace(" ", "-")
        shutil.copytree(data, folder)
        target = folder / "train-images-idx3-ubyte.gz"
        target.write_bytes(damage(target.read_bytes()))
        result = noprop("train", *TRAIN, "--data-dir", str(folder), "--epochs", "1", "--out", str(tmp_path / "out"))
        assert_one_line_error(result, str(target))
    assert not (tmp_path / "out").exists()


def test_the_real_mnist_test_set_damaged(tmp_path, shared_mnist):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(shared_mnist / name, folder / name)
        shutil.copy(shared_mnist / name, folder / name.replace("t10k", "train"))
    target = folder / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)  # a zeroed stretch inside the deflate stream
    target.write_bytes(bytes(raw))
    result = noprop("eval", "--checkpoint", str(tmp_path / "none.pt"), "--data-dir", str(folder))
    assert_one_line_error(result, "none.pt")
    result = noprop("train", *TRAIN, "--data-dir", str(folder), "--epochs", "1", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, str(target))


def test_damaged_and_crafted_cifar_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, 4))}
        (folder / name).write_bytes(pickle.dumps(batch))
    marker = tmp_path / "owned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    good = (folder / "data_batch_2").read_bytes()
    for what, content in {
        "truncated": good[: len(good) // 2],
        "garbage": b"\x00garbage",
        "crafted": pickle.dumps({"data": Exploit(), "labels": [1]}),
        "wrong shape": pickle.dumps({"data": np.zeros((4, 100), dtype=np.uint8), "labels": [1, 2, 3, 4]}),
        "no labels": pickle.dumps({"data": np.zeros((4, 3072), dtype=np.uint8)}),
    }.items():
        (folder / "data_batch_2").write_bytes(content)
        result = noprop("train", *TRAIN, "--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out"))
        assert_one_line_error(result, str(folder / "data_batch_2"))
        assert not marker.exists(), what


def test_crafted_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "owned"
    evil = tmp_path / "evil.pt"
    script = textwrap.dedent(f"""
        import os, torch
        class Exploit:
            def __reduce__(self):
                return (os.system, ("touch {marker}",))
        torch.save({{"format": 1, "config": {{}}, "model": Exploit()}}, "{evil}")
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert_one_line_error(noprop("eval", "--checkpoint", str(evil)), str(evil))
    assert_one_line_error(noprop("train", "--resume", str(evil), "--epochs", "2", "--no-progress"), str(evil))
    assert not marker.exists()


def test_damaged_checkpoints(tmp_path, run):
    raw = (run / "checkpoint.pt").read_bytes()
    state = ckpt.load(run / "checkpoint.pt")
    nan_state = {**state, "model": {k: v.clone() for k, v in state["model"].items()}}
    name = next(k for k, v in nan_state["model"].items() if v.is_floating_point())
    nan_state["model"][name].view(-1)[0] = float("nan")
    ckpt.save_atomic(nan_state, tmp_path / "nan.pt", check_finite=False)
    crafted = {**state, "model_config": {**state["model_config"], "T": 7}}  # valid hash, wrong shapes
    ckpt.save_atomic(crafted, tmp_path / "shapes.pt")
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x01
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) - 100])
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    for name, fragment in (("nan.pt", "NaN"), ("shapes.pt", ""), ("flipped.pt", ""), ("truncated.pt", ""), ("foreign.pt", "")):
        path = str(tmp_path / name)
        assert_one_line_error(noprop("eval", "--checkpoint", path), path, fragment)
    assert_one_line_error(noprop("train", "--resume", str(tmp_path / "flipped.pt"), "--epochs", "2", "--no-progress"), "flipped.pt")


def test_existing_output_folder_is_kept(tmp_path, run, data):
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    result = noprop("train", *TRAIN, "--data-dir", str(data), "--epochs", "1", "--out", str(run))
    assert_one_line_error(result, "--resume", "--out", "--overwrite")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_resume_after_moving_data_and_shell(tmp_path, data):
    shutil.copytree(data, tmp_path / "data")
    result = noprop("train", *TRAIN, "--data-dir", "data", "--epochs", "1", "--out", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (tmp_path / "data").rename(tmp_path / "moved")
    checkpoint = str(tmp_path / "run" / "checkpoint.pt")
    result = noprop("train", "--resume", checkpoint, "--epochs", "2", "--no-progress", cwd="/")
    assert_one_line_error(result, "--data-dir")
    result = noprop("train", "--resume", checkpoint, "--epochs", "2", "--no-progress", "--data-dir", str(tmp_path / "moved"), cwd="/")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["epoch"] == 2
    result = noprop("eval", "--checkpoint", checkpoint, "--data-dir", str(tmp_path / "moved"), cwd="/")
    assert result.returncode == 0, result.stderr


def test_resume_rejects_conflicting_options(run):
    checkpoint = str(run / "checkpoint.pt")
    for option, value in (("--lr", "0.01"), ("--method", "ct"), ("--T", "3"), ("--seed", "4")):
        result = noprop("train", "--resume", checkpoint, "--epochs", "2", "--no-progress", option, value)
        assert_one_line_error(result, option)


SIGNAL_DRIVER = textwrap.dedent("""
    import os, signal, sys
    import torch
    sig = getattr(signal, os.environ["NOPROP_TEST_SIGNAL"])
    where = os.environ["NOPROP_TEST_WHERE"]
    real_save = torch.save
    def save(*args, **kwargs):  # the first torch.save call is inside the first checkpoint write
        if where == "write" and not getattr(save, "sent", False):
            save.sent = True
            os.kill(os.getpid(), sig)
        return real_save(*args, **kwargs)
    torch.save = save
    import noprop.train
    real_epoch = noprop.train._run_epoch
    def run_epoch(model, step, loader, config, epoch, device):
        if where == "epoch" and epoch == 2:
            os.kill(os.getpid(), sig)
        return real_epoch(model, step, loader, config, epoch, device)
    noprop.train._run_epoch = run_epoch
    from noprop.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("name,where", [("SIGTERM", "write"), ("SIGINT", "write"), ("SIGINT", "epoch"), ("SIGTERM", "epoch")])
def test_signals_during_training_and_checkpoint_writes(tmp_path, data, monkeypatch, name, where):
    monkeypatch.setenv("NOPROP_TEST_SIGNAL", name)
    monkeypatch.setenv("NOPROP_TEST_WHERE", where)
    out = tmp_path / "run"
    result = noprop("train", *TRAIN, "--data-dir", str(data), "--epochs", "3", "--out", str(out), driver=SIGNAL_DRIVER)
    signum = getattr(signal, name)
    assert_one_line_error(result, "interrupted", name, str(out / "checkpoint.pt"), status=128 + signum)
    # a signal during the first write lets it finish; one in epoch 2 keeps epoch 1's checkpoint
    state = ckpt.load(out / "checkpoint.pt")
    assert state["epoch"] == 1
    assert [r["epoch"] for r in json.loads((out / "metrics.json").read_text())["epochs"]] == [1]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "curves.png", "metrics.json"]
    result = noprop("train", "--resume", str(out / "checkpoint.pt"), "--epochs", "2", "--no-progress")
    assert result.returncode == 0, result.stderr
