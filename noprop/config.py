"""A training run's settings: :class:`TrainConfig`, the paper's defaults, and what a resumed run may change.

``T``, ``eta``, ``ode_steps`` and ``inference_steps`` mean something to some methods only
(:data:`APPLIES_TO`); the others apply to every method. :func:`model_kwargs` and
:func:`inference_kwargs` turn a config into a model's constructor and ``predict`` arguments, and
:func:`resume_config` merges a checkpoint's config with the options a resumed run may change.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import warnings
from dataclasses import dataclass

import torch

from noprop.data import ImageDataset
from noprop.models import METHODS, MODELS
from noprop.host_memory import HOST_MEMORY_POLICIES
from noprop.precision import check_precision
from noprop.validation import check_choice, check_number, check_positive_int

PAPER_ETA = {"dt": 0.1, "ct": 1.0}
PAPER_T = 10
PAPER_ODE_STEPS = 1000
APPLIES_TO = {  # option: the methods it means something to (elsewhere it is refused by the CLI, dropped with a warning here)
    "T": ("dt", "backprop"),
    "eta": ("dt", "ct"),
    "ode_steps": ("adjoint",),
    "inference_steps": ("ct", "fm", "adjoint"),
}
# options a resumed run may change; every other one must match the checkpoint's run
RESUME_MAY_CHANGE = (
    "epochs", "out", "progress", "device", "resume", "data_dir", "overwrite", "backend", "compile", "block_chunk", "precision",
    "host_memory", "parallel", "dist_backend", "dist_timeout",
)
# how a run is launched, not what it trains: a resumed run takes them from its own launch (default: one process)
LAUNCH_OPTIONS = ("parallel", "dist_backend", "dist_timeout")
PARALLEL_MODES = ("none", "blocks", "data")  # noprop.distributed: the T blocks over ranks, or the rows of every batch
DIST_BACKENDS = ("auto", "gloo", "nccl")


class InapplicableOptionWarning(UserWarning):
    """An option was set that the chosen method does not use; it is dropped (the CLI refuses it)."""


def flag(name: str) -> str:
    """The command-line option of a :class:`TrainConfig` field (``lr`` -> ``--lr``)."""
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """Everything a training run depends on (the CLI's ``noprop train`` flags).

    Defaults are the paper's: batch 128, learning rate 1e-3, weight decay 1e-3, T = 10,
    eta = 0.1 (DT) / 1 (CT), AdamW for DT and the discrete baseline, Adam for CT, FM and the
    adjoint baseline, 1000 inference steps for CT, FM and the adjoint baseline (which also
    integrates with ``ode_steps`` = 1000 Euler steps in training). ``solver`` None is the method's default (CT: ancestral sampling, FM:
    Euler); DT and the discrete baseline take none.

    ``T``, ``eta``, ``ode_steps`` and ``inference_steps`` mean something to some methods only
    (:data:`APPLIES_TO`): None is the method's default (filled in for the methods that use them);
    a value set for a method that does not use it is dropped with an
    :class:`InapplicableOptionWarning` naming it, so it is never recorded as if used. Numbers
    must be finite (``lr``, ``width``, ``eta``, ``grad_clip`` positive, ``weight_decay`` >= 0).
    ``overwrite`` lets a new run replace the run already in ``out`` (otherwise refused).
    ``precision`` is ``"fp32"``, ``"tf32"`` or ``"bf16"`` (:mod:`noprop.precision`: TF32 matmuls
    around every training step and evaluation, or bfloat16 autocast there).
    ``host_memory`` (:mod:`noprop.host_memory`, applied to the whole process when the run is on a
    CPU): ``"reuse"`` keeps freed large buffers in the C heap for the next step instead of
    returning them to the system (no page faults on every step's activations), ``"system"``
    maps blocks of 32 MiB and more anew and returns them, as glibc does by default.
    ``parallel`` (:mod:`noprop.distributed`, under ``torchrun``): ``"blocks"`` splits NoProp-DT's
    T blocks over the ranks, ``"data"`` splits the rows of every batch (DT, CT, FM; the baselines
    run in one process); ``dist_backend`` is the process group's backend (``auto``: ``nccl`` on
    GPUs, ``gloo`` on the CPU) and ``dist_timeout`` the seconds after which a collective, or a rank
    that stopped responding, stops the run with an error naming the rank.
    """

    method: str = "dt"
    dataset: str = "mnist"
    data_dir: str | None = None
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-3
    T: int | None = None
    eta: float | None = None
    ode_steps: int | None = None
    embedding: str = "onehot"
    embedding_dim: int | None = None
    width: float = 1.0
    schedule: str = "batched"
    backend: str = "auto"
    seed: int = 0
    device: str = "auto"
    out: str = "runs/noprop"
    resume: str | None = None
    train_limit: int | None = None
    eval_limit: int | None = None
    inference_steps: int | None = None
    solver: str | None = None
    deterministic_inference: bool = False
    block_chunk: int | None = None
    grad_clip: float | None = None
    compile: bool = False
    cuda_graphs: bool = False
    precision: str = "fp32"
    host_memory: str = "reuse"
    parallel: str = "none"
    dist_backend: str = "auto"
    dist_timeout: float = 300.0
    progress: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_precision(self.precision)
        check_choice("host_memory", self.host_memory, HOST_MEMORY_POLICIES)
        for name in ("epochs", "batch_size"):
            check_positive_int(name, getattr(self, name))
        for name in ("T", "ode_steps", "inference_steps", "block_chunk", "embedding_dim", "train_limit", "eval_limit"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {self.seed!r}")
        check_number("lr", self.lr)
        check_number("width", self.width)
        check_number("weight_decay", self.weight_decay, allow_equal=True)
        for name in ("eta", "grad_clip"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name))
        for name, methods in APPLIES_TO.items():
            if getattr(self, name) is not None and self.method not in methods:
                warnings.warn(
                    f"{name} ({flag(name)}): method {self.method!r} does not use it (only {', '.join(methods)} do); "
                    "it is ignored and not recorded",
                    InapplicableOptionWarning,
                    stacklevel=3,
                )
                setattr(self, name, None)
        if self.method in APPLIES_TO["T"] and self.T is None:
            self.T = PAPER_T
        if self.method in PAPER_ETA and self.eta is None:
            self.eta = PAPER_ETA[self.method]
        if self.method in APPLIES_TO["ode_steps"] and self.ode_steps is None:
            self.ode_steps = PAPER_ODE_STEPS
        MODELS[self.method].resolve_solver(self.solver)
        if self.schedule == "paper" and self.method != "dt":
            raise ValueError(f"schedule: 'paper' (a pass per block) exists for method 'dt' only, got method {self.method!r}")
        if self.block_chunk is not None and (self.method != "dt" or self.schedule != "batched"):
            raise ValueError(f"block_chunk: only NoProp-DT with schedule 'batched' trains its blocks in chunks, got method {self.method!r}")
        self._check_parallel()

    def _check_parallel(self) -> None:
        check_choice("parallel", self.parallel, PARALLEL_MODES)
        check_choice("dist_backend", self.dist_backend, DIST_BACKENDS)
        check_number("dist_timeout", self.dist_timeout)
        if self.parallel == "none":
            return
        if self.method in ("backprop", "adjoint"):
            raise ValueError(f"parallel: the {self.method!r} baseline trains end to end in one process; --parallel applies to dt, ct and fm")
        if self.parallel == "blocks" and self.method != "dt":
            raise ValueError(
                f"parallel: 'blocks' splits NoProp-DT's T blocks over the ranks; method {self.method!r} has one shared network, use --parallel data"
            )
        if self.parallel == "blocks" and self.schedule == "paper":
            raise ValueError("parallel: 'blocks' with schedule 'paper' would train one block (one rank) at a time; use schedule 'batched' or --parallel data")
        if self.parallel == "data" and self.block_chunk is not None:
            raise ValueError("block_chunk: not with --parallel data (each rank trains every block on its rows); use --parallel blocks")
        for name in ("compile", "cuda_graphs"):
            if getattr(self, name):
                raise ValueError(f"{name} ({flag(name)}): not supported with --parallel {self.parallel} (one-process runs only)")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; anything else must name an available device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device: {error}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but no CUDA device is available")
    return resolved


def model_kwargs(config: TrainConfig, dataset: ImageDataset) -> dict:
    """The constructor arguments of ``config.method``'s model for ``dataset``."""
    channels, size, _ = dataset.image_shape
    kwargs = dict(
        num_classes=dataset.num_classes,
        in_channels=channels,
        image_size=size,
        embedding=config.embedding,
        embedding_dim=config.embedding_dim,
        width=config.width,
        backend=config.backend,
    )
    if config.method in APPLIES_TO["T"]:
        kwargs["T"] = config.T
    if config.method in APPLIES_TO["eta"]:
        kwargs["eta"] = PAPER_ETA[config.method] if config.eta is None else config.eta
    if config.method == "dt":
        kwargs["schedule"] = config.schedule
    if config.method == "adjoint":
        kwargs["ode_steps"] = config.ode_steps
    return kwargs


def inference_kwargs(config: TrainConfig) -> dict:
    """``predict`` arguments of a run: steps and solver matter to CT and FM only (DT runs its T blocks); solver None is the model's default."""
    integrates = config.method in ("ct", "fm", "adjoint")
    return dict(
        steps=config.inference_steps if integrates else None,
        solver=config.solver,
        deterministic=config.deterministic_inference,
    )


def resume_config(saved: TrainConfig, changes: dict, epoch: int, checkpoint: os.PathLike) -> TrainConfig:
    """The config of a resumed run: the checkpoint's, with the ``changes`` a resumed run may make.

    Args:
        saved: the checkpoint's config.
        changes: options the caller set (name -> value). Those in :data:`RESUME_MAY_CHANGE` apply;
            any other must equal the checkpoint's value. ``out`` defaults to the checkpoint's folder.
        epoch: the checkpoint's epoch (``epochs`` must exceed it).

    Raises:
        ValueError: ``resume: NAME (--flag) ...`` for an option that conflicts with the checkpoint's
            run, or ``epochs`` not beyond the checkpoint's epoch.
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, value in changes.items():
        if name not in names:
            raise TypeError(f"changes: {name!r} is not a TrainConfig option")
        if name not in RESUME_MAY_CHANGE and value != getattr(saved, name):
            raise ValueError(
                f"resume: {name} ({flag(name)}) is {value!r} but the checkpoint's run has {getattr(saved, name)!r}; "
                f"a resumed run keeps its settings: drop {flag(name)}, or start a new run with a new --out"
            )
    allowed = {k: v for k, v in changes.items() if k in RESUME_MAY_CHANGE}
    for name in LAUNCH_OPTIONS:
        allowed.setdefault(name, getattr(TrainConfig, name))
    allowed.setdefault("out", str(pathlib.Path(checkpoint).resolve().parent))
    allowed["resume"] = str(checkpoint)
    config = dataclasses.replace(saved, **allowed)
    if config.epochs <= epoch:
        raise ValueError(f"epochs: the checkpoint's run has trained {epoch} epochs already; pass --epochs greater than {epoch} to continue it")
    return config


def changed_options(config: TrainConfig) -> dict:
    """The options of ``config`` that differ from a default :class:`TrainConfig` (what a library caller set)."""
    defaults = TrainConfig()
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig) if getattr(config, f.name) != getattr(defaults, f.name)}
