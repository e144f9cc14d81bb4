"""Training curves: loss and accuracy per epoch, written as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(history: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Two panels from the per-epoch records of ``metrics.json``: mean loss, and train/test accuracy."""
    epochs = [record["epoch"] for record in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [record["loss"] for record in history], marker="o")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("mean training loss")
    if all(record["loss"] > 0 for record in history):
        loss_axis.set_yscale("log")
    for key, label in (("train_accuracy", "train"), ("test_accuracy", "test")):
        accuracy_axis.plot(epochs, [100 * record[key] for record in history], marker="o", label=label)
    accuracy_axis.set_xlabel("epoch")
    accuracy_axis.set_ylabel("accuracy (%)")
    accuracy_axis.legend()
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
