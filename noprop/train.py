"""The trainer: data, model, optimizer, the epoch loop, evaluation, metrics, plots, checkpoints.

Every epoch lets each block see every training example once: one pass in which every step trains
all blocks (``schedule="batched"``, and the other methods), or, for NoProp-DT with
``schedule="paper"``, T passes, pass ``t`` training block ``t`` (Algorithm 1). After each epoch the
trainer evaluates train and test accuracy (labels are only compared, never fed to the model),
appends a record to ``OUT/metrics.json``, redraws ``OUT/curves.png`` and writes
``OUT/checkpoint.pt`` atomically. ``resume`` continues from such a checkpoint exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import random
import resource
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from noprop import checkpoint as ckpt
from noprop.data import BatchLoader, ImageDataset, load_dataset
from noprop.models import METHODS, MODELS, NoPropModel, build_model
from noprop.objectives import LossTerms
from noprop.step import TrainStep
from noprop.validation import check_choice, check_positive_int

PAPER_ETA = {"dt": 0.1, "ct": 1.0}
EVAL_BATCH = 1000
FINITE_CHECK_EVERY = 25  # steps between loss-finiteness checks on a GPU (each check synchronises)


class NonFiniteLossError(RuntimeError):
    """Training stopped because a loss term became NaN or Inf (the message names the term and block)."""


@dataclass
class TrainConfig:
    """Everything a training run depends on (the CLI's ``noprop train`` flags).

    Defaults are the paper's: batch 128, learning rate 1e-3, weight decay 1e-3, T = 10,
    eta = 0.1 (DT) / 1 (CT), AdamW for DT and the discrete baseline, Adam for CT, FM and the
    adjoint baseline, 1000 inference steps for CT, FM and the adjoint baseline (which also
    integrates with ``ode_steps`` = 1000 Euler steps in training). ``solver`` None is the method's default (CT: ancestral sampling, FM:
    Euler); DT and the discrete baseline take none.
    """

    method: str = "dt"
    dataset: str = "mnist"
    data_dir: str | None = None
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-3
    T: int = 10
    eta: float | None = None
    ode_steps: int = 1000
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

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        for name in ("epochs", "batch_size", "T", "ode_steps"):
            check_positive_int(name, getattr(self, name))
        for name in ("lr", "width"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: expected a number >= 0, got {self.weight_decay}")
        MODELS[self.method].resolve_solver(self.solver)
        if self.schedule == "paper" and self.method != "dt":
            raise ValueError(f"schedule: 'paper' (a pass per block) exists for method 'dt' only, got method {self.method!r}")


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
    if config.method in ("dt", "backprop"):
        kwargs["T"] = config.T
    if config.method in PAPER_ETA:
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


def train(config: TrainConfig, dataset: ImageDataset | None = None) -> TrainResult:
    """Run (or resume) a training run; see the module docstring.

    Args:
        config: the run's settings (on resume, the checkpoint's settings win except ``epochs``,
            ``out``, ``progress`` and ``device``).
        dataset: use this dataset (on the CPU) instead of loading ``config.dataset``; pass the
            same one again to resume.

    Raises:
        NonFiniteLossError: a loss term became NaN or Inf (training stops; the last checkpoint is intact).
        ValueError: bad configuration (unknown dataset or method, missing data directory, ...).
    """
    out = pathlib.Path(config.out)
    state = None
    if config.resume:
        state = ckpt.load(config.resume)
        saved = TrainConfig(**state["config"])
        # the run continues with its own data, model and optimizer settings; these may change:
        config = dataclasses.replace(
            saved, epochs=config.epochs, out=config.out, progress=config.progress, device=config.device, resume=config.resume
        )
    device = resolve_device(config.device)
    if config.cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs: capturing the step needs a CUDA device, the run is on {device}")
    _set_seeds(config.seed)
    if dataset is None:
        dataset = load_dataset(
            config.dataset, config.data_dir, train_limit=config.train_limit, eval_limit=config.eval_limit, seed=config.seed
        )
    dataset = dataset.to(device)
    model = build_model(config.method, **model_kwargs(config, dataset)).to(device)
    if state is None:
        model.initialize_from_data(dataset.train_x, dataset.train_y)
    optimizer = build_optimizer(model, config)
    loader_generator = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    start_epoch = 1
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history = list(state["history"])
        start_epoch = state["epoch"] + 1
        ckpt.restore_rng(state["rng"], loader_generator)
    out.mkdir(parents=True, exist_ok=True)
    step = TrainStep(
        model, optimizer, block_chunk=config.block_chunk, grad_clip=config.grad_clip, compile=config.compile, cuda_graphs=config.cuda_graphs
    )
    loader = BatchLoader(
        dataset.train_x, dataset.train_y, config.batch_size, shuffle=True, generator=loader_generator, drop_last=config.cuda_graphs
    )
    train_eval = (dataset.train_x[: dataset.test_x.shape[0]], dataset.train_y[: dataset.test_x.shape[0]])
    for epoch in range(start_epoch, config.epochs + 1):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        stats, train_seconds = _run_epoch(model, step, loader, config, epoch, device)
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
        _write_json_atomic(out / "metrics.json", {"config": dataclasses.asdict(config), "dataset": dataset.describe(), "device": str(device), "epochs": history})
        from noprop.plots import plot_curves

        plot_curves(history, out / "curves.png", title=f"NoProp-{config.method.upper()} on {dataset.name}")
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
        if config.progress:
            print(
                f"epoch {epoch}/{config.epochs}: loss {record['loss']:.4f}  train acc {train_accuracy:.4f}  "
                f"test acc {test_accuracy:.4f}  ({train_seconds:.1f}s, {record['examples_per_second']:.0f} ex/s)",
                file=sys.stderr,
            )
    return TrainResult(history, model, dataset, out)


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
            steps += 1
            if steps % check_every == 0 or steps == bar.total:
                if bool(nonfinite):
                    raise NonFiniteLossError(
                        f"non-finite loss in epoch {epoch} (detected at step {steps}): {_describe_nonfinite(terms)}; "
                        f"training stopped, the last checkpoint (epoch {epoch - 1}) is intact"
                    )
                if config.progress and steps % FINITE_CHECK_EVERY == 0:
                    bar.set_postfix(loss=f"{terms.total.item():.4f}")
            bar.update(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    bar.close()
    return stats.means(), seconds
