"""The trainer: data, model, optimizer, the epoch loop, evaluation, metrics, plots, checkpoints.

Every epoch lets each block see every training example once: one pass in which every step trains
all blocks (``schedule="batched"``, and the other methods), or, for NoProp-DT with
``schedule="paper"``, T passes, pass ``t`` training block ``t`` (Algorithm 1). After each epoch the
trainer evaluates train and test accuracy (labels are only compared, never fed to the model),
writes ``OUT/checkpoint.pt`` atomically, then ``OUT/metrics.json`` (so it never lists an epoch that
has no checkpoint) and ``OUT/curves.png``. ``resume`` continues from such a checkpoint exactly.

Safety: a run never overwrites another run's folder unless asked to (``overwrite``); the
parameters are checked for NaN/Inf during the epoch (a device-side flag, no per-step host sync)
and before every save; SIGINT and SIGTERM stop the run cleanly (a checkpoint being written is
finished first) with :class:`TrainingInterrupted`; on resume, options that conflict with the
checkpoint's run are refused by name, and the data must be the run's own (its fingerprint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import random
import resource
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from noprop import checkpoint as ckpt
from noprop.data import BatchLoader, ImageDataset, load_dataset
from noprop.models import METHODS, MODELS, NoPropModel, build_model
from noprop.objectives import LossTerms
from noprop.step import TrainStep
from noprop.validation import check_choice, check_number, check_positive_int

PAPER_ETA = {"dt": 0.1, "ct": 1.0}
PAPER_T = 10
PAPER_ODE_STEPS = 1000
EVAL_BATCH = 1000
FINITE_CHECK_EVERY = 25  # steps between loss-finiteness checks on a GPU (each check synchronises)
APPLIES_TO = {  # option: the methods it means something to (elsewhere it is refused by the CLI, dropped with a warning here)
    "T": ("dt", "backprop"),
    "eta": ("dt", "ct"),
    "ode_steps": ("adjoint",),
    "inference_steps": ("ct", "fm", "adjoint"),
}
# options a resumed run may change; every other one must match the checkpoint's run
RESUME_MAY_CHANGE = ("epochs", "out", "progress", "device", "resume", "data_dir", "overwrite", "backend", "compile", "block_chunk")
RUN_FILES = ("checkpoint.pt", "metrics.json", "curves.png")


class NonFiniteLossError(RuntimeError):
    """Training stopped because a loss term became NaN or Inf (the message names the term and block)."""


class NonFiniteParameterError(NonFiniteLossError):
    """Training stopped because a parameter or buffer became NaN or Inf (the message names it and its block)."""


class InapplicableOptionWarning(UserWarning):
    """An option was set that the chosen method does not use; it is dropped (the CLI refuses it)."""


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
    progress: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
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


@dataclass
class TrainResult:
    """What :func:`train` returns: the metrics of every epoch, the trained model and the data used."""

    history: list[dict]
    model: NoPropModel
    dataset: ImageDataset
    out: pathlib.Path = field(default_factory=pathlib.Path)


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


def build_optimizer(model: NoPropModel, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW for DT and the baseline, Adam for CT and FM (the paper's): one optimizer for all parameters.

    Two parameter groups: every parameter gets ``config.weight_decay`` (blocks, embedding and
    classifier: the paper's setting) except the learnable noise schedule's (``noise_schedule.*``,
    CT), which get none. Weight decay pulls parameters towards 0, and for the schedule that is no
    regulariser but a bias on the schedule itself: Adam's L2 term pulls ``gamma_0`` towards 0 and
    ``raw_span`` towards 0 (``gamma_1 - gamma_0`` towards ``softplus(0) = 0.69``), i.e. both ends
    of ``alpha_bar`` towards 1/2, and reshapes the monotone network, against what the objective
    asks for.

    On a GPU the fused implementation (one kernel for every parameter), capturable when the step
    is captured in a CUDA graph; on the CPU the foreach implementation.
    """
    optimizer_class = torch.optim.AdamW if model.method in ("dt", "backprop") else torch.optim.Adam
    on_cuda = next(model.parameters()).device.type == "cuda"
    implementation = dict(fused=True, capturable=config.cuda_graphs) if on_cuda else dict(foreach=True)
    decayed, schedule = [], []
    for name, parameter in model.named_parameters():
        (schedule if name.startswith("noise_schedule.") else decayed).append(parameter)
    groups = [{"params": decayed, "weight_decay": config.weight_decay}]
    if schedule:
        groups.append({"params": schedule, "weight_decay": 0.0})
    return optimizer_class(groups, lr=config.lr, **implementation)


@torch.no_grad()
def evaluate(
    model: NoPropModel,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int | None = None,
    solver: str | None = None,
    deterministic: bool = False,
    batch_size: int = EVAL_BATCH,
) -> tuple[float, torch.Tensor]:
    """Accuracy of ``model.predict`` on ``x``; the labels ``y`` are only compared with the predictions.

    Returns:
        ``(accuracy in [0, 1], predicted classes [N])``.
    """
    was_training = model.training
    model.eval()
    predictions = []
    for start in range(0, x.shape[0], batch_size):
        logits = model.predict(x[start : start + batch_size], steps=steps, solver=solver, deterministic=deterministic)
        predictions.append(logits.argmax(dim=-1))
    model.train(was_training)
    predicted = torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long, device=x.device)
    accuracy = (predicted == y).float().mean().item() if y.numel() else float("nan")
    return accuracy, predicted


def _describe_nonfinite(terms: LossTerms) -> str:
    for name, value in terms.parts.items():
        flat = value.reshape(-1)
        bad = (~torch.isfinite(flat)).nonzero().flatten()
        if bad.numel():
            index = int(bad[0])
            where = f" of block {index + 1}" if name == "l2" and flat.numel() > 1 else ""
            return f"term {name!r}{where} is {flat[index].item()}"
    return f"the total is {terms.total.item()}"


class EpochStats:
    """Running sums of the loss terms over an epoch, kept on the device (no per-step syncs)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor | int] = {}
        self.total: torch.Tensor | None = None
        self.steps = 0

    def add(self, terms: LossTerms, blocks: range | None = None, T: int | None = None) -> None:
        """Accumulate one step. With ``blocks`` (the paper schedule), ``l2`` covers only those of the T blocks."""
        # the first step's tensors are copied: a CUDA-graph step returns the same static tensors on
        # every replay, so keeping a reference would count the next step's values instead
        self.total = terms.total.detach().clone() if self.total is None else self.total + terms.total.detach()
        self.steps += 1
        for name, value in terms.parts.items():
            value = value.detach().float()
            if name == "l2" and blocks is not None:
                if name not in self.sums:
                    self.sums[name] = value.new_zeros(T)
                    self.counts[name] = value.new_zeros(T)
                self.sums[name][blocks.start : blocks.stop] += value
                self.counts[name][blocks.start : blocks.stop] += 1
                continue
            self.sums[name] = value.clone() if name not in self.sums else self.sums[name] + value
            self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict:
        """Mean total loss per step and the mean of every term (per block for ``l2``)."""
        out = {"loss": (self.total / self.steps).item() if self.steps else float("nan")}
        for name, value in self.sums.items():
            out[name] = (value / self.counts[name]).tolist()
        return out


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _write_json_atomic(path: pathlib.Path, payload) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(payload, indent=2))
    os.replace(temporary, path)


class _SignalGuard:
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

    def __enter__(self) -> "_SignalGuard":
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


def _checkpoint_context(path: os.PathLike, what: str):
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
    with _checkpoint_context(path, "model"):
        probe = None
        try:
            with torch.device("meta"):
                probe = build_model(state["method"], **state["model_config"])
        except (ValueError, TypeError):
            raise
        except Exception:  # some construction step does not run on the meta device: compare after building
            probe = None
        if probe is not None:
            _compare_shapes(probe, state["model"])
        model = build_model(state["method"], **state["model_config"])
        model.load_state_dict(state["model"])
        return model.to(device)


def _compare_shapes(model: NoPropModel, saved: dict) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in saved.items()}
    if expected.keys() != got.keys():
        missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
        raise ValueError(f"the weights do not match the model config (missing {missing[:3]}, unexpected {extra[:3]})")
    for key, shape in expected.items():
        if got[key] != shape:
            raise ValueError(f"weight {key} has shape {list(got[key])}, the model config needs {list(shape)}")


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
    allowed.setdefault("out", str(pathlib.Path(checkpoint).resolve().parent))
    allowed["resume"] = str(checkpoint)
    config = dataclasses.replace(saved, **allowed)
    if config.epochs <= epoch:
        raise ValueError(f"epochs: the checkpoint's run has trained {epoch} epochs already; pass --epochs greater than {epoch} to continue it")
    return config


def _changed_options(config: TrainConfig) -> dict:
    """The options of ``config`` that differ from a default :class:`TrainConfig` (what a library caller set)."""
    defaults = TrainConfig()
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig) if getattr(config, f.name) != getattr(defaults, f.name)}


def _check_same_data(dataset: ImageDataset, saved: dict, source: str) -> None:
    """Refuse data that is not the data the checkpoint's run was trained on (name, shape, fingerprint)."""
    mine = dataset.describe()
    for key in ("name", "num_classes", "image_shape", "fingerprint"):
        if saved.get(key) is not None and mine.get(key) != saved.get(key):
            raise ValueError(
                f"data_dir: {source} holds other data than the checkpoint's run was trained on ({key} differs); "
                "pass --data-dir with the run's own data"
            )


def _check_out(out: pathlib.Path, config: TrainConfig, continuing: bool) -> list[str]:
    """Refuse an ``out`` that holds another run (unless ``overwrite``); returns the run files in it."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} exists and is not a folder")
    existing = [name for name in RUN_FILES[:2] if (out / name).exists()]
    if existing and not continuing and not config.overwrite:
        raise ValueError(
            f"out: {out} already holds a run ({', '.join(existing)}); pass --resume {out / 'checkpoint.pt'} "
            "to continue it, a new --out, or --overwrite to replace it"
        )
    return existing


def _prepare_out(out: pathlib.Path, replace: bool) -> None:
    """Create ``out`` (once the data and the model are ready), clear a replaced run, remove stale temporaries."""
    if replace:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.remove_stale_temporaries(out / "checkpoint.pt")
    (out / ".metrics.json.tmp").unlink(missing_ok=True)


def train(config: TrainConfig, dataset: ImageDataset | None = None, *, changes: dict | None = None) -> TrainResult:
    """Run (or resume) a training run; see the module docstring.

    Args:
        config: the run's settings. With ``config.resume``, the run continues with the
            checkpoint's settings; only :data:`RESUME_MAY_CHANGE` may differ (``data_dir`` points
            to moved data, ``out`` defaults to the checkpoint's folder) and any other option set
            to a value other than the checkpoint's is refused (:func:`resume_config`).
        dataset: use this dataset (on the CPU) instead of loading ``config.dataset``; pass the
            same one again to resume.
        changes: on resume, the options the caller set explicitly (the CLI passes what was typed);
            None: every option of ``config`` that differs from its default.

    Raises:
        NonFiniteLossError: a loss term became NaN or Inf (training stops; the last checkpoint is intact).
        NonFiniteParameterError: a parameter became NaN or Inf (the same).
        TrainingInterrupted: SIGINT or SIGTERM (the checkpoint being written is finished first).
        ValueError: bad configuration (unknown dataset or method, missing data directory, an
            existing run in ``out``, a damaged checkpoint, options that conflict with it, ...).
    """
    with _SignalGuard() as guard:
        return _train(config, dataset, changes, guard)


def _train(config: TrainConfig, dataset: ImageDataset | None, changes: dict | None, guard: _SignalGuard) -> TrainResult:
    state = None
    checkpoint_path = None
    if config.resume:
        checkpoint_path = pathlib.Path(config.resume)
        state = ckpt.load(checkpoint_path)
        with _checkpoint_context(checkpoint_path, "config"):
            with warnings.catch_warnings():
                warnings.simplefilter("error", InapplicableOptionWarning)
                saved = TrainConfig(**state["config"])
        requested = _changed_options(config) if changes is None else dict(changes)
        requested.pop("resume", None)
        config = resume_config(saved, requested, state["epoch"], checkpoint_path)
    # absolute paths: a resumed run must not depend on the working directory
    out = pathlib.Path(config.out).resolve()
    config = dataclasses.replace(
        config,
        out=str(out),
        data_dir=str(pathlib.Path(config.data_dir).resolve()) if config.data_dir is not None else None,
        resume=str(checkpoint_path.resolve()) if checkpoint_path is not None else None,
    )
    device = resolve_device(config.device)
    if config.cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs: capturing the step needs a CUDA device, the run is on {device}")
    continuing = checkpoint_path is not None and out == checkpoint_path.resolve().parent
    replace = bool(_check_out(out, config, continuing)) and not continuing
    _set_seeds(config.seed)
    if dataset is None:
        if state is not None and config.data_dir is not None and not pathlib.Path(config.data_dir).is_dir():
            raise ValueError(f"data_dir: the run's data folder {config.data_dir} does not exist (moved?); pass --data-dir with its new location")
        normalization = (state["dataset"]["mean"], state["dataset"]["std"]) if state is not None else None
        dataset = load_dataset(
            config.dataset, config.data_dir, train_limit=config.train_limit, eval_limit=config.eval_limit, seed=config.seed,
            normalization=normalization,
        )
    if state is not None:
        _check_same_data(dataset, state["dataset"], config.data_dir or "the dataset")
    dataset = dataset.to(device)
    model = build_model(config.method, **model_kwargs(config, dataset)).to(device)
    if state is None:
        model.initialize_from_data(dataset.train_x, dataset.train_y)
    optimizer = build_optimizer(model, config)
    loader_generator = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    start_epoch = 1
    if state is not None:
        with _checkpoint_context(checkpoint_path, "model or optimizer state"):
            if state["method"] != config.method:
                raise ValueError(f"it holds a {state['method']!r} model but its config says {config.method!r}")
            _compare_shapes(model, state["model"])
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            history = list(state["history"])
            start_epoch = state["epoch"] + 1
            ckpt.restore_rng(state["rng"], loader_generator)
    step = TrainStep(
        model, optimizer, block_chunk=config.block_chunk, grad_clip=config.grad_clip, compile=config.compile, cuda_graphs=config.cuda_graphs
    )
    loader = BatchLoader(
        dataset.train_x, dataset.train_y, config.batch_size, shuffle=True, generator=loader_generator,
        drop_last=config.cuda_graphs, drop_single=True,
    )
    if len(loader) == 0:
        raise ValueError(
            f"train_limit: {dataset.train_x.shape[0]} training example(s) make no training batch "
            f"(batch_size {config.batch_size}; a batch needs at least 2 examples{', and a full batch with cuda_graphs' if config.cuda_graphs else ''})"
        )
    _prepare_out(out, replace)
    train_eval = (dataset.train_x[: dataset.test_x.shape[0]], dataset.train_y[: dataset.test_x.shape[0]])
    last_saved = (checkpoint_path.resolve(), start_epoch - 1) if continuing else (None, 0)
    try:
        for epoch in range(start_epoch, config.epochs + 1):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            stats, train_seconds = _run_epoch(model, step, loader, config, epoch, device)
            _check_model_finite(model, f"after epoch {epoch}", epoch)
            eval_start = time.perf_counter()
            eval_kwargs = inference_kwargs(config)
            train_accuracy, _ = evaluate(model, *train_eval, **eval_kwargs)
            test_accuracy, _ = evaluate(model, dataset.test_x, dataset.test_y, **eval_kwargs)
            record = {
                "epoch": epoch,
                **stats,
                "train_accuracy": train_accuracy,
                "test_accuracy": test_accuracy,
                "train_seconds": train_seconds,
                "eval_seconds": time.perf_counter() - eval_start,
                "examples_per_second": dataset.train_x.shape[0] / train_seconds,
                "peak_memory_mb": _peak_memory_mb(device),
                "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "process max RSS",
            }
            history.append(record)
            with guard.deferred():  # a signal now lets the checkpoint, metrics and curves be written first
                _save_epoch(out, config, model, optimizer, epoch, history, dataset, device, loader_generator)
                last_saved = (out / "checkpoint.pt", epoch)
            if config.progress:
                print(
                    f"epoch {epoch}/{config.epochs}: loss {record['loss']:.4f}  train acc {train_accuracy:.4f}  "
                    f"test acc {test_accuracy:.4f}  ({train_seconds:.1f}s, {record['examples_per_second']:.0f} ex/s)",
                    file=sys.stderr,
                )
    except TrainingInterrupted as interrupted:
        raise TrainingInterrupted(interrupted.signum, *last_saved) from None
    return TrainResult(history, model, dataset, out)


def _save_epoch(out, config, model, optimizer, epoch, history, dataset, device, loader_generator) -> None:
    """The checkpoint first, then metrics.json (never an epoch without a checkpoint), then the curves."""
    ckpt.save_atomic(
        {
            "format": ckpt.FORMAT_VERSION,
            "config": dataclasses.asdict(config),
            "method": model.method,
            "model_config": model.config(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": model.noise_schedule.describe() if hasattr(model, "noise_schedule") else None,
            "epoch": epoch,
            "history": history,
            "dataset": dataset.describe(),
            "rng": ckpt.capture_rng(loader_generator),
        },
        out / "checkpoint.pt",
    )
    _write_json_atomic(out / "metrics.json", {"config": dataclasses.asdict(config), "dataset": dataset.describe(), "device": str(device), "epochs": history})
    from noprop.plots import plot_curves

    plot_curves(history, out / "curves.png", title=f"NoProp-{config.method.upper()} on {dataset.name}")


def _parameters_nonfinite(parameters: list[torch.Tensor]) -> torch.Tensor:
    """A bool scalar on the parameters' device: does any of them hold NaN or Inf? (No host sync.)"""
    if not parameters:
        return torch.zeros((), dtype=torch.bool)
    norms = torch._foreach_norm([p.detach() for p in parameters], float("inf"))  # max |p|: Inf or NaN iff a value is
    return ~torch.isfinite(torch.stack([n.float() for n in norms])).all()


def _describe_tensor(model: NoPropModel, name: str, tensor: torch.Tensor) -> str:
    bad = (~torch.isfinite(tensor)).nonzero()
    index = tuple(bad[0].tolist()) if bad.numel() else ()
    value = tensor[index].item() if index or tensor.dim() == 0 else float("nan")
    parts = name.split(".")
    T = getattr(model, "T", None)
    where = ""
    if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():  # a list of blocks: blocks.<t>.*
        where = f" of block {int(parts[1]) + 1}"
    elif parts[0] == "blocks" and T and tensor.dim() >= 1 and tensor.shape[0] % T == 0 and index:
        where = f" of block {index[0] // (tensor.shape[0] // T) + 1}"  # stacked: block-major along dim 0
    return f"{name}{where} holds {value} (at index {list(index)})"


def _check_model_finite(model: NoPropModel, when: str, epoch: int) -> None:
    """Raise :class:`NonFiniteParameterError` naming the first parameter or buffer holding NaN or Inf."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in items:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteParameterError(
                    f"non-finite {kind} {when}: {_describe_tensor(model, name, tensor)}; "
                    f"training stopped, the last checkpoint (epoch {epoch - 1}) is intact"
                )


def _run_epoch(
    model: NoPropModel, step: TrainStep, loader: BatchLoader, config: TrainConfig, epoch: int, device: torch.device
) -> tuple[dict, float]:
    """One epoch (each block sees each example once). Returns the term means and the seconds it took."""
    model.train()
    paper = getattr(model, "schedule", "batched") == "paper"
    passes = [range(t, t + 1) for t in range(model.T)] if paper else [None]
    stats = EpochStats()
    check_every = 1 if device.type == "cpu" else FINITE_CHECK_EVERY
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    parameters = [p for p in model.parameters() if p.is_floating_point()]
    bad_parameters = torch.zeros((), dtype=torch.bool, device=device)  # a device-side flag: no host sync per step
    bar = tqdm(total=len(passes) * len(loader), desc=f"epoch {epoch}/{config.epochs}", disable=not config.progress, leave=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    steps = 0
    for blocks in passes:
        for x, y in loader:
            terms = step(x, y, blocks)
            stats.add(terms, blocks, getattr(model, "T", None))
            nonfinite |= ~torch.isfinite(terms.total)
            bad_parameters |= _parameters_nonfinite(parameters)
            steps += 1
            if steps % check_every == 0 or steps == bar.total:
                if bool(nonfinite):
                    raise NonFiniteLossError(
                        f"non-finite loss in epoch {epoch} (detected at step {steps}): {_describe_nonfinite(terms)}; "
                        f"training stopped, the last checkpoint (epoch {epoch - 1}) is intact"
                    )
                if bool(bad_parameters):
                    _check_model_finite(model, f"in epoch {epoch} (detected at step {steps})", epoch)
                if config.progress and steps % FINITE_CHECK_EVERY == 0:
                    bar.set_postfix(loss=f"{terms.total.item():.4f}")
            bar.update(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    bar.close()
    return stats.means(), seconds
