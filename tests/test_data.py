"""Datasets: IDX and CIFAR readers, the offline fallback, limits, the device batch loader."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch

from noprop.data import BatchLoader, load_dataset
from noprop.data_files import load_cifar_folder, load_idx_folder, read_idx


def write_idx(path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an IDX file, gzipped when ``path`` ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def make_idx_folder(folder, n_train=40, n_test=20, size=28, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, size, size)),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(folder / name, array)
    return arrays


def test_read_idx_round_trip(tmp_path):
    arrays = make_idx_folder(tmp_path / "deep" / "raw")
    loaded = load_idx_folder(tmp_path)  # found recursively, .gz or not
    assert loaded["train_x"].shape == (40, 1, 28, 28) and loaded["test_y"].shape == (20,)
    assert np.array_equal(loaded["train_x"][:, 0].numpy(), arrays["train-images-idx3-ubyte.gz"])
    assert np.array_equal(loaded["test_y"].numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_read_idx_rejects_garbage(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((3, 2), dtype=np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header promises"):
        read_idx(tmp_path / "short")


def test_load_dataset_from_data_dir_standardises(tmp_path):
    make_idx_folder(tmp_path)
    data = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert data.name == "fashion-mnist" and data.fallback_reason is None
    assert data.train_x.dtype == torch.float32 and data.image_shape == (1, 28, 28)
    assert abs(data.train_x.mean().item()) < 1e-4 and abs(data.train_x.std().item() - 1) < 1e-2
    assert data.describe()["train_examples"] == 40


def test_real_mnist_test_set_reads(shared_mnist):
    images = read_idx(shared_mnist / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(shared_mnist / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert set(labels.unique().tolist()) == set(range(10))


def test_mnist_test_split_is_the_test_set_in_order(shared_mnist, tmp_path):
    """``--dataset mnist-test-split``: the first 8,000 t10k images train, the last 2,000 test."""
    images = read_idx(shared_mnist / "t10k-images-idx3-ubyte.gz").float() / 255
    labels = read_idx(shared_mnist / "t10k-labels-idx1-ubyte.gz").long()
    data = load_dataset("mnist-test-split", data_dir=shared_mnist)
    assert data.name == data.requested == "mnist-test-split" and data.image_shape == (1, 28, 28)
    assert torch.equal(data.train_y, labels[:8000]) and torch.equal(data.test_y, labels[8000:])
    mean, std = images[:8000].mean().item(), images[:8000].std().item()
    assert data.mean[0] == pytest.approx(mean, rel=1e-5) and data.std[0] == pytest.approx(std, rel=1e-4)
    torch.testing.assert_close(data.test_x[:, 0], (images[8000:] - mean) / std, rtol=1e-4, atol=1e-4)
    limited = load_dataset("mnist-test-split", data_dir=shared_mnist, train_limit=100, eval_limit=30)
    assert limited.train_x.shape[0] == 100 and torch.equal(limited.test_y, labels[8000:8030])
    with pytest.raises(ValueError, match="data_dir: .* lacks the MNIST test-set files"):
        load_dataset("mnist-test-split", data_dir=tmp_path)


def test_cifar_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, 4))}
        (folder / name).write_bytes(pickle.dumps(batch))
    arrays = load_cifar_folder(tmp_path, 10)
    assert arrays["train_x"].shape == (20, 3, 32, 32) and arrays["test_y"].shape == (4,)
    data = load_dataset("cifar10", data_dir=tmp_path)
    assert data.image_shape == (3, 32, 32) and len(data.mean) == 3


def test_offline_fallback_is_loud_and_recorded(capsys):
    with pytest.warns(RuntimeWarning, match="sklearn-digits"):
        data = load_dataset("cifar10", download=False)
    assert data.name == "sklearn-digits" and data.requested == "cifar10"
    assert data.fallback_reason and "OFFLINE FALLBACK" in capsys.readouterr().err
    assert data.image_shape == (1, 8, 8) and data.train_x.shape[0] + data.test_x.shape[0] == 1797
    assert set(data.test_y.unique().tolist()) == set(range(10))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="imagenet"), "dataset"),
        (dict(name="mnist", data_dir="/nonexistent/folder"), "data_dir"),
        (dict(name="mnist", download=False, train_limit=0), "train_limit"),
    ],
)
def test_bad_dataset_arguments(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        load_dataset(**kwargs)


def test_data_dir_without_the_files(tmp_path):
    with pytest.raises(ValueError, match="lacks the IDX files"):
        load_dataset("mnist", data_dir=tmp_path)


def test_limits_take_a_seeded_subset(tmp_path):
    make_idx_folder(tmp_path)
    a = load_dataset("mnist", data_dir=tmp_path, train_limit=10, eval_limit=5, seed=3)
    b = load_dataset("mnist", data_dir=tmp_path, train_limit=10, eval_limit=5, seed=3)
    assert a.train_x.shape[0] == 10 and a.test_x.shape[0] == 5
    assert torch.equal(a.train_x, b.train_x)


def test_batch_loader_covers_every_example_once_per_epoch():
    x = torch.arange(10.0).reshape(10, 1)
    y = torch.arange(10)
    loader = BatchLoader(x, y, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(loader) == 3
    for _ in range(2):
        seen = torch.cat([yb for _, yb in loader])
        assert sorted(seen.tolist()) == list(range(10))
    for xb, yb in loader:
        assert torch.equal(xb[:, 0].long(), yb)
    assert len(BatchLoader(x, y, 4, drop_last=True)) == 2
    with pytest.raises(ValueError, match="generator"):
        BatchLoader(x, y, 4, shuffle=True)
