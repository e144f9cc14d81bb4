"""Readers of the dataset files ``--data-dir`` may hold: MNIST-format IDX files and CIFAR python batches.

Every file read here fails with a ``ValueError`` that names the file and what is wrong with it
(a damaged gzip stream, a bad IDX header, a CIFAR batch that is not the expected dict of arrays),
never a raw error from ``gzip``, ``zlib``, ``pickle`` or the OS. CIFAR batches are Python pickles;
they are read with an unpickler that only builds dicts, lists, strings, numbers and NumPy arrays,
so a crafted batch file cannot run code.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pathlib
import pickle
import zlib

import numpy as np
import torch

IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file (optionally gzipped): uint8 images ``[N, H, W]`` or labels ``[N]``.

    Raises:
        ValueError: naming ``path``: it cannot be read, its gzip stream is damaged, or its IDX
            header is wrong or disagrees with the file's length.
    """
    path = pathlib.Path(path)
    gzipped = path.suffix == ".gz"
    opener = gzip.open if gzipped else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        kind = "a gzipped IDX file" if gzipped else "an IDX file"
        raise ValueError(f"{path}: cannot be read as {kind} ({reason(error)})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: expected unsigned-byte IDX data (type 0x08), got type {data[2]:#04x}")
    ndim = data[3]
    offset = 4 + 4 * ndim
    if ndim == 0 or len(data) < offset:
        raise ValueError(f"{path}: IDX header truncated or without dimensions ({ndim} dimensions, {len(data)} bytes)")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = math.prod(dims)
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header promises {expected} values, file holds {len(data) - offset}")
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims).copy())


def _find_file(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
    for candidate in sorted(directory.rglob(stem + "*")):
        if candidate.name in (stem, stem + ".gz") and candidate.is_file():
            return candidate
    return None


def load_idx_folder(
    directory: str | os.PathLike, keys: tuple[str, ...] = tuple(IDX_FILES), what: str = "IDX files"
) -> dict[str, torch.Tensor]:
    """The MNIST-format IDX files of ``keys`` found (recursively) in ``directory``, as uint8 tensors.

    Returns ``{"train_x": [N, 1, H, W], "train_y": [N], "test_x": ..., "test_y": ...}`` (the
    entries of ``keys``); ``what`` names the files in the error for missing ones.

    Raises:
        ValueError: a file is missing (the message lists what was looked for).
    """
    directory = pathlib.Path(directory)
    found = {key: _find_file(directory, IDX_FILES[key]) for key in keys}
    missing = [IDX_FILES[key] for key, path in found.items() if path is None]
    if missing:
        raise ValueError(f"data_dir: {directory} lacks the {what} {missing} (optionally .gz)")
    arrays = {key: read_idx(path) for key, path in found.items()}
    for key, path in found.items():
        wanted = 3 if key.endswith("_x") else 1
        if arrays[key].dim() != wanted:
            expected = "images [N, H, W]" if wanted == 3 else "labels [N]"
            raise ValueError(f"{path}: expected {expected}, got an IDX array of shape {list(arrays[key].shape)}")
    for key in keys:
        if key.endswith("_x"):
            arrays[key] = arrays[key].unsqueeze(1)
    return arrays


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain data and NumPy arrays (the contents of a CIFAR batch)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
        ("builtins", "bytearray"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only plain data and NumPy arrays are allowed)")
        return super().find_class(module, name)


def _unpickle(path: pathlib.Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return _ArrayUnpickler(io.BufferedReader(handle), encoding="latin1").load()
    except Exception as error:  # pickle, EOF, OS, NumPy reconstruction errors
        raise ValueError(f"{path}: not a readable CIFAR batch ({reason(error)})") from None


def _cifar_batch(path: pathlib.Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``data`` [N, 3072] uint8 images and the ``label_key`` labels [N] of one CIFAR batch file, checked."""
    batch = _unpickle(path)
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        keys = sorted(map(str, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path}: expected a CIFAR batch dict with 'data' and {label_key!r}, got {keys}")
    images = batch["data"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        shape = list(images.shape) if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"{path}: 'data' must be uint8 images [N, 3072], got {shape}")
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as error:
        raise ValueError(f"{path}: {label_key!r} must be integer labels ({reason(error)})") from None
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{path}: {images.shape[0]} images but {label_key!r} has shape {list(labels.shape)}")
    return images, labels


def load_cifar_folder(directory: str | os.PathLike, num_classes: int) -> dict[str, torch.Tensor]:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``) or CIFAR-100 (``train``, ``test``) pickles under ``directory``.

    Returns uint8 images ``[N, 3, 32, 32]`` and int64 labels, keyed like :func:`load_idx_folder`.
    """
    directory = pathlib.Path(directory)
    if num_classes == 10:
        folder_name, train_names, test_name, label_key = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels"
    else:
        folder_name, train_names, test_name, label_key = "cifar-100-python", ["train"], "test", "fine_labels"
    candidates = [directory, directory / folder_name, *directory.rglob(folder_name)]
    folder = next((c for c in candidates if (c / test_name).is_file()), None)
    if folder is None:
        raise ValueError(f"data_dir: {directory} holds no {folder_name} folder with {train_names + [test_name]}")

    def read(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise ValueError(f"data_dir: {folder} lacks the CIFAR batches {missing}")
        batches = [_cifar_batch(folder / name, label_key) for name in names]
        images = np.concatenate([images for images, _ in batches]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([labels for _, labels in batches])
        return torch.from_numpy(images), torch.from_numpy(labels).long()

    train_x, train_y = read(train_names)
    test_x, test_y = read([test_name])
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
