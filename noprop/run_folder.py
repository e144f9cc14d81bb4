"""A run's output folder: refusing to overwrite another run, checkpoints and metrics written in order,
signals that let a write finish, and the model rebuilt from a checkpoint with its shapes checked first.

Layout of ``OUT``: ``checkpoint.pt`` (written atomically, :mod:`noprop.checkpoint`), or the folder
``checkpoint.dcp`` for a parallel run (:mod:`noprop.distributed.checkpoint`), then ``metrics.json``
(atomically, so it never lists an epoch that has no checkpoint), then ``curves.png``. A run writes
one kind of checkpoint and removes the other kind when a resumed run switches between them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import threading

import torch

from noprop import checkpoint as ckpt
from noprop.config import TrainConfig
from noprop.data import ImageDataset
from noprop.models import NoPropModel, build_model

RUN_FILES = ("checkpoint.pt", "metrics.json", "curves.png")
CHECKPOINTS = ("checkpoint.pt", "checkpoint.dcp")  # one process; a parallel run (a folder)


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training; a checkpoint being written was finished first.

    Attributes:
        signum: the signal. checkpoint: the last checkpoint written (None if there is none).
        epoch: its epoch (0 if none).
    """

    def __init__(self, signum: int, checkpoint: pathlib.Path | None = None, epoch: int = 0):
        self.signum, self.checkpoint, self.epoch = signum, checkpoint, epoch
        super().__init__(self.describe())

    def describe(self) -> str:
        name = signal.Signals(self.signum).name
        if self.checkpoint is None:
            return f"interrupted by {name} before the first checkpoint was written"
        return f"interrupted by {name}; the last checkpoint is {self.checkpoint} (epoch {self.epoch}); continue with --resume {self.checkpoint}"


def write_json_atomic(path: pathlib.Path, payload) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(payload, indent=2))
    os.replace(temporary, path)


class SignalGuard:
    """While active (main thread only): SIGINT and SIGTERM raise :class:`TrainingInterrupted`;
    inside :meth:`deferred` they wait until the block ends (a second signal does not wait)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.previous: dict = {}
        self.deferring = False
        self.pending: int | None = None

    def _handle(self, signum, frame) -> None:
        if self.deferring and self.pending is None:
            self.pending = signum
            return
        raise TrainingInterrupted(signum)

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise TrainingInterrupted(signum)


def checkpoint_context(path: os.PathLike, what: str):
    """Turn an error from rebuilding ``what`` out of the checkpoint at ``path`` into ``ValueError('checkpoint: PATH: ...')``."""

    @contextlib.contextmanager
    def context():
        try:
            yield
        except (ValueError, TypeError, RuntimeError, KeyError, IndexError, AttributeError) as error:
            text = " ".join(str(error).split()) or type(error).__name__
            raise ValueError(f"checkpoint: {path}: its {what} cannot be restored ({text[:300]})") from None

    return context()


def model_from_checkpoint(state: dict, path: os.PathLike, device: torch.device | str = "cpu") -> NoPropModel:
    """The model saved in a loaded checkpoint ``state`` (from :func:`noprop.checkpoint.load` of ``path``).

    The shapes of the saved tensors are compared with the model the config describes before any
    memory is allocated for it (on PyTorch's meta device), so a crafted config cannot ask for a
    huge model.

    Raises:
        ValueError: ``checkpoint: PATH: ...`` when the config does not build a model or the weights do not fit it.
    """
    with checkpoint_context(path, "model"):
        probe = None
        try:
            with torch.device("meta"):
                probe = build_model(state["method"], **state["model_config"])
        except (ValueError, TypeError):
            raise
        except Exception:  # some construction step does not run on the meta device: compare after building
            probe = None
        if probe is not None:
            compare_shapes(probe, state["model"])
        model = build_model(state["method"], **state["model_config"])
        model.load_state_dict(state["model"])
        return model.to(device)


def compare_shapes(model: NoPropModel, saved: dict) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in saved.items()}
    if expected.keys() != got.keys():
        missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
        raise ValueError(f"the weights do not match the model config (missing {missing[:3]}, unexpected {extra[:3]})")
    for key, shape in expected.items():
        if got[key] != shape:
            raise ValueError(f"weight {key} has shape {list(got[key])}, the model config needs {list(shape)}")


def check_same_data(dataset: ImageDataset, saved: dict, source: str) -> None:
    """Refuse data that is not the data the checkpoint's run was trained on (name, shape, fingerprint)."""
    mine = dataset.describe()
    for key in ("name", "num_classes", "image_shape", "fingerprint"):
        if saved.get(key) is not None and mine.get(key) != saved.get(key):
            raise ValueError(
                f"data_dir: {source} holds other data than the checkpoint's run was trained on ({key} differs); "
                "pass --data-dir with the run's own data"
            )


def check_out(out: pathlib.Path, config: TrainConfig, continuing: bool) -> list[str]:
    """Refuse an ``out`` that holds another run (unless ``overwrite``); returns the run files in it."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} exists and is not a folder")
    existing = [name for name in (*CHECKPOINTS, "metrics.json") if (out / name).exists()]
    if existing and not continuing and not config.overwrite:
        raise ValueError(
            f"out: {out} already holds a run ({', '.join(existing)}); pass --resume {out / 'checkpoint.pt'} "
            "to continue it, a new --out, or --overwrite to replace it"
        )
    return existing


def prepare_out(out: pathlib.Path, replace: bool) -> None:
    """Create ``out`` (once the data and the model are ready), clear a replaced run, remove stale temporaries."""
    from noprop.distributed import checkpoint as sharded

    if replace:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / sharded.NAME, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.remove_stale_temporaries(out / "checkpoint.pt")
    sharded.remove_stale(out)
    (out / ".metrics.json.tmp").unlink(missing_ok=True)


def run_record(config, model, epoch, history, dataset, loader_generator) -> dict:
    """What a checkpoint holds besides the model's and the optimizer's state (both kinds of checkpoint)."""
    return {
        "format": ckpt.FORMAT_VERSION,
        "config": dataclasses.asdict(config),
        "method": model.method,
        "model_config": model.config(),
        "schedule": model.noise_schedule.describe() if hasattr(model, "noise_schedule") else None,
        "epoch": epoch,
        "history": history,
        "dataset": dataset.describe(),
        "rng": ckpt.capture_rng(loader_generator),
    }


def write_metrics(out: pathlib.Path, config, history, dataset, device) -> None:
    """``metrics.json`` (atomically), then ``curves.png``: after the epoch's checkpoint."""
    write_json_atomic(out / "metrics.json", {"config": dataclasses.asdict(config), "dataset": dataset.describe(), "device": str(device), "epochs": history})
    from noprop.plots import plot_curves

    plot_curves(history, out / "curves.png", title=f"NoProp-{config.method.upper()} on {dataset.name}")


def save_epoch(out, config, model, optimizer, epoch, history, dataset, device, loader_generator) -> pathlib.Path:
    """The checkpoint first, then metrics.json (never an epoch without a checkpoint), then the curves.

    Returns the checkpoint's path. A parallel run's ``checkpoint.dcp`` left in ``out`` (this run
    resumed it in one process) is removed once ``checkpoint.pt`` is written.
    """
    record = run_record(config, model, epoch, history, dataset, loader_generator)
    path = out / "checkpoint.pt"
    ckpt.save_atomic({**record, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    shutil.rmtree(out / CHECKPOINTS[1], ignore_errors=True)
    write_metrics(out, config, history, dataset, device)
    return path
