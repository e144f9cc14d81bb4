"""Datasets as whole tensors on the training device, and a loader that batches from there.

Sources, tried in this order:

1. ``data_dir`` (``--data-dir``): a folder with the IDX files of MNIST / Fashion-MNIST (for example
   ``/usr/share/datasets/fashion-mnist`` from Debian's ``dataset-fashion-mnist``) or the python
   pickles of CIFAR-10 / CIFAR-100 (``cifar-10-batches-py``, ``cifar-100-python``), searched
   recursively. A missing folder or missing files are an error.
2. torchvision, downloading into ``root`` (default ``~/.cache/noprop/data`` or ``$NOPROP_DATA``).
3. If the download fails (no network), scikit-learn's bundled 8x8 handwritten digits (1,797 real
   images): a loud warning says so and :attr:`ImageDataset.name` records the dataset actually used.

``mnist-test-split`` is the MNIST *test* set alone, split 8,000 training / 2,000 test images
(:func:`mnist_test_split`): the offline learning checks' data, read from a folder with the
``t10k-*`` IDX files or from torchvision's MNIST test set.

Images become float32, scaled to ``[0, 1]`` and standardised with the training set's per-channel
mean and standard deviation (or with given statistics: a checkpoint's, so evaluation and resumed
training see inputs exactly as the model was trained on them). Values are checked once here
(finite images, labels in range), so the training step needs no value checks that would
synchronise the GPU.

The files are read by :mod:`noprop.data_files`: every one that is damaged fails with a
``ValueError`` naming it, and CIFAR pickles cannot run code.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from noprop.data_files import load_cifar_folder, load_idx_folder, reason
from noprop.validation import check_choice

DATASETS = {  # name: (channels, image size, classes)
    "mnist": (1, 28, 10),
    "fashion-mnist": (1, 28, 10),
    "cifar10": (3, 32, 10),
    "cifar100": (3, 32, 100),
    "mnist-test-split": (1, 28, 10),  # MNIST's 10,000 test images split 8,000 / 2,000 (MNIST_TEST_SPLIT)
}
MNIST_TEST_SPLIT = "mnist-test-split"
OFFLINE_FALLBACK = "sklearn-digits"
FALLBACK_TEST_FRACTION = 0.2
@dataclass
class ImageDataset:
    """A classification dataset held as tensors.

    Attributes:
        name: the dataset actually used (may be the offline fallback).
        requested: the dataset that was asked for.
        source: where it came from (a folder, torchvision, scikit-learn).
        train_x, test_x: float32 images ``[N, C, H, W]``, standardised.
        train_y, test_y: int64 labels ``[N]``.
        num_classes: number of classes.
        mean, std: the per-channel statistics used to standardise (from the training images,
            unless given, e.g. from a checkpoint).
        fallback_reason: why the requested dataset was replaced, or None.
        fingerprint: SHA-256 of the raw training and of the raw test split (images and labels,
            before any limit), ``{"train": hex, "test": hex}``: resuming checks it is the same data.
    """

    name: str
    requested: str
    source: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    fallback_reason: str | None = None
    fingerprint: dict = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)``."""
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> "ImageDataset":
        """The same dataset with its tensors on ``device``."""
        return replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
        )

    def describe(self) -> dict:
        """What was used, for metrics files and checkpoints."""
        return {
            "name": self.name,
            "requested": self.requested,
            "source": self.source,
            "train_examples": int(self.train_x.shape[0]),
            "test_examples": int(self.test_x.shape[0]),
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "mean": self.mean,
            "std": self.std,
            "fallback_reason": self.fallback_reason,
            "fingerprint": self.fingerprint,
        }


def _download_with_torchvision(name: str, root: pathlib.Path, splits: tuple[str, ...] = ("train", "test")) -> dict[str, torch.Tensor]:
    import torchvision

    constructor = {
        "mnist": torchvision.datasets.MNIST,
        "fashion-mnist": torchvision.datasets.FashionMNIST,
        "cifar10": torchvision.datasets.CIFAR10,
        "cifar100": torchvision.datasets.CIFAR100,
    }[name]
    arrays = {}
    for split in splits:
        dataset = constructor(str(root), train=split == "train", download=True)
        images = torch.as_tensor(np.asarray(dataset.data))
        images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
        arrays[f"{split}_x"] = images.contiguous()
        arrays[f"{split}_y"] = torch.as_tensor(np.asarray(dataset.targets)).long()
    return arrays


def _sklearn_digits(seed: int) -> dict[str, torch.Tensor]:
    """scikit-learn's 1,797 bundled 8x8 digits (pixel values 0..16), split 80/20 per class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    generator = torch.Generator().manual_seed(seed)
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        test_mask[members[: round(len(members) * FALLBACK_TEST_FRACTION)]] = True
    return {"train_x": images[~test_mask], "train_y": labels[~test_mask], "test_x": images[test_mask], "test_y": labels[test_mask]}


# ---------------------------------------------------------------------------------------------- assembly


def from_uint8(
    name: str,
    requested: str,
    source: str,
    arrays: dict[str, torch.Tensor],
    num_classes: int,
    fallback_reason: str | None = None,
    normalization: tuple[list[float], list[float]] | None = None,
) -> ImageDataset:
    """Standardise uint8 images with per-channel statistics and check the values once.

    Args:
        normalization: ``(mean, std)`` per channel, of images scaled to ``[0, 1]``, to use instead
            of the training images' own (a checkpoint's, see :func:`load_dataset`).

    Raises:
        ValueError: an empty split, labels outside ``[0, num_classes)``, image/label counts that
            differ, or a ``normalization`` that is not one finite mean and positive std per channel.
    """
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{source}: {images.shape[0]} {split} images but {labels.shape[0]} labels")
        if images.shape[0] == 0:
            raise ValueError(f"{source}: the {split} split holds no images")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{source}: {split} labels outside [0, {num_classes})")
    fingerprint = {split: _fingerprint(arrays[f"{split}_x"], arrays[f"{split}_y"]) for split in ("train", "test")}
    train = arrays["train_x"].float().div_(255.0)
    test = arrays["test_x"].float().div_(255.0)
    if normalization is None:
        mean = train.mean(dim=(0, 2, 3))
        std = train.std(dim=(0, 2, 3)).nan_to_num(1.0).clamp_min(1e-6)  # one image: no spread
    else:
        mean, std = _check_normalization(normalization, train.shape[1])
    scale = (lambda images: (images - mean[None, :, None, None]) / std[None, :, None, None])
    return ImageDataset(
        name=name,
        requested=requested,
        source=source,
        train_x=scale(train).contiguous(),
        train_y=arrays["train_y"].long(),
        test_x=scale(test).contiguous(),
        test_y=arrays["test_y"].long(),
        num_classes=num_classes,
        mean=mean.tolist(),
        std=std.tolist(),
        fallback_reason=fallback_reason,
        fingerprint=fingerprint,
    )


def _fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in (images, labels.long()):
        digest.update(str(list(tensor.shape)).encode())
        digest.update(memoryview(tensor.contiguous().numpy()).cast("B"))
    return digest.hexdigest()


def _check_normalization(normalization: object, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        mean, std = (torch.tensor([float(v) for v in values], dtype=torch.float32) for values in normalization)  # type: ignore[union-attr]
    except (TypeError, ValueError) as error:
        raise ValueError(f"normalization: expected (mean, std) lists of numbers ({reason(error)})") from None
    if mean.shape != (channels,) or std.shape != (channels,):
        raise ValueError(f"normalization: expected {channels} means and stds (one per channel), got {list(mean.shape)} and {list(std.shape)}")
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
        raise ValueError(f"normalization: expected finite means and positive stds, got {mean.tolist()} and {std.tolist()}")
    return mean, std


MNIST_TEST_SPLIT_TRAIN = 8000  # images of the MNIST test set used for training in the test-set split


def split_test_set(arrays: dict[str, torch.Tensor], train: int = MNIST_TEST_SPLIT_TRAIN) -> dict[str, torch.Tensor]:
    """Its first ``train`` test images become the training split and the rest the test split.

    ``arrays`` holds at least ``test_x`` ``[N, C, H, W]`` and ``test_y`` ``[N]``; the result has the
    four keys of :func:`noprop.data_files.load_idx_folder`.
    """
    images, labels = arrays["test_x"], arrays["test_y"]
    if not 0 < train < images.shape[0]:
        raise ValueError(f"train: expected a count in (0, {images.shape[0]}), got {train}")
    return {"train_x": images[:train], "train_y": labels[:train], "test_x": images[train:], "test_y": labels[train:]}


def mnist_test_split(
    folder: str | os.PathLike,
    train: int = MNIST_TEST_SPLIT_TRAIN,
    normalization: tuple[list[float], list[float]] | None = None,
) -> ImageDataset:
    """The real MNIST *test* set (``t10k-*`` IDX files in ``folder``) split for offline learning checks.

    Its first ``train`` images (default 8,000) are the training set and the remaining ones (2,000)
    the test set, standardised with the training part's statistics (or ``normalization``). Used
    where the 60,000 MNIST training images cannot be downloaded (the learning tests,
    ``bench/accuracy.py``, ``--dataset mnist-test-split``).
    """
    directory = pathlib.Path(folder)
    arrays = split_test_set(load_idx_folder(directory, ("test_x", "test_y"), what="MNIST test-set files"), train)
    return from_uint8(MNIST_TEST_SPLIT, MNIST_TEST_SPLIT, f"local files in {directory}", arrays, 10, normalization=normalization)


def default_root() -> pathlib.Path:
    """Where torchvision downloads go: ``$NOPROP_DATA`` or ``~/.cache/noprop/data``."""
    return pathlib.Path(os.environ.get("NOPROP_DATA", pathlib.Path.home() / ".cache" / "noprop" / "data"))


def _warn_fallback(requested: str, reason: str) -> None:
    banner = "=" * 78
    message = (
        f"\n{banner}\nOFFLINE FALLBACK: could not obtain {requested!r} ({reason}).\n"
        f"Training on scikit-learn's bundled 8x8 digits ({OFFLINE_FALLBACK}) instead; every metric\n"
        f"below is for that dataset, not {requested!r}. Pass --data-dir to use local files.\n{banner}\n"
    )
    print(message, file=sys.stderr, flush=True)
    warnings.warn(f"dataset {requested!r} unavailable ({reason}); using {OFFLINE_FALLBACK}", RuntimeWarning, stacklevel=3)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    download: bool = True,
    train_limit: int | None = None,
    eval_limit: int | None = None,
    seed: int = 0,
    normalization: tuple[list[float], list[float]] | None = None,
) -> ImageDataset:
    """Load ``name`` (see the module docstring for the order of sources) as standardised tensors.

    Args:
        name: ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"`` or ``"cifar100"``.
        data_dir: a folder of local files to read instead of downloading.
        root: torchvision's download folder (default :func:`default_root`).
        download: allow torchvision to download; without it a missing dataset falls back at once.
        train_limit: keep this many training images (a seeded random subset).
        eval_limit: keep the first this many test images.
        seed: seed of the training subset and of the fallback's split.
        normalization: ``(mean, std)`` per channel to standardise with instead of the training
            images' own statistics (a checkpoint's ``dataset`` record holds them).

    Raises:
        ValueError: unknown dataset, a missing ``data_dir`` or files missing from it, a damaged
            file (named), bad limits.
    """
    check_choice("dataset", name, tuple(DATASETS))
    _check_limits(train_limit, eval_limit)
    channels, _, num_classes = DATASETS[name]
    if data_dir is not None:
        directory = pathlib.Path(data_dir)
        if not directory.is_dir():
            raise ValueError(f"data_dir: {directory} is not a directory")
        if name == MNIST_TEST_SPLIT:
            return limit(mnist_test_split(directory, normalization=normalization), train_limit, eval_limit, seed)
        arrays = load_idx_folder(directory) if channels == 1 else load_cifar_folder(directory, num_classes)
        dataset = from_uint8(name, name, f"local files in {directory}", arrays, num_classes, normalization=normalization)
    else:
        root = pathlib.Path(root) if root is not None else default_root()
        try:
            if not download:
                raise RuntimeError("downloads are disabled")
            if name == MNIST_TEST_SPLIT:
                arrays = split_test_set(_download_with_torchvision("mnist", root, splits=("test",)))
            else:
                arrays = _download_with_torchvision(name, root)
            dataset = from_uint8(name, name, f"torchvision ({root})", arrays, num_classes, normalization=normalization)
        except Exception as error:  # no network, a broken mirror, a partial download
            reason = " ".join(str(error).split())[:300] or type(error).__name__
            _warn_fallback(name, reason)
            arrays = _sklearn_digits(seed)
            dataset = from_uint8(
                OFFLINE_FALLBACK, name, "scikit-learn load_digits (offline fallback)", arrays, 10, reason, normalization=normalization
            )
    return limit(dataset, train_limit, eval_limit, seed)


def _check_limits(train_limit: int | None, eval_limit: int | None) -> None:
    for label, value in (("train_limit", train_limit), ("eval_limit", eval_limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{label}: expected an int, got {type(value).__name__}")
        if value is not None and value < 1:
            raise ValueError(f"{label}: expected a positive number of images, got {value}")


def limit(dataset: ImageDataset, train_limit: int | None, eval_limit: int | None, seed: int = 0) -> ImageDataset:
    """Keep a seeded random ``train_limit`` training images and the first ``eval_limit`` test images."""
    _check_limits(train_limit, eval_limit)
    train_x, train_y = dataset.train_x, dataset.train_y
    if train_limit is not None and train_limit < train_x.shape[0]:
        keep = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(seed))[:train_limit]
        train_x, train_y = train_x[keep], train_y[keep]
    test_x, test_y = dataset.test_x[:eval_limit], dataset.test_y[:eval_limit]
    return replace(dataset, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)


class BatchLoader:
    """Minibatches of tensors that already live on the training device (no per-sample Python work).

    Each epoch draws one permutation from ``generator`` (a CPU ``torch.Generator``, so runs are
    reproducible and resumable) and gathers batches with ``index_select`` on the device.

    Args:
        x: images ``[N, ...]``; y: labels ``[N]`` on the same device.
        batch_size: examples per batch.
        shuffle: reshuffle every epoch.
        generator: the shuffling generator (required when ``shuffle``).
        drop_last: drop the last incomplete batch (static shapes for CUDA graphs).
        drop_single: drop a last batch of exactly one example (the trainer's choice: BatchNorm
            cannot normalise a single example in training). With ``shuffle`` the dropped example
            differs from epoch to epoch, so every example is still trained on.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        drop_single: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size}")
        if shuffle and generator is None:
            raise ValueError("generator: required when shuffle=True (it makes epochs reproducible)")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.drop_last = drop_last
        self.drop_single = drop_single

    def __len__(self) -> int:
        n = self.x.shape[0]
        if self.drop_last or (self.drop_single and n % self.batch_size == 1):
            return n // self.batch_size
        return -(-n // self.batch_size)

    def __iter__(self):
        n = self.x.shape[0]
        order = None
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(self.x.device, non_blocking=True)
        for i in range(len(self)):
            start, stop = i * self.batch_size, min((i + 1) * self.batch_size, n)
            if order is None:
                yield self.x[start:stop], self.y[start:stop]
            else:
                index = order[start:stop]
                yield self.x.index_select(0, index), self.y.index_select(0, index)
