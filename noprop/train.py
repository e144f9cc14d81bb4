"""The trainer: data, model, optimizer, the epoch loop, evaluation, and the run's checks.

Its settings live in :mod:`noprop.config`, its output folder (checkpoints, metrics, signals) in
:mod:`noprop.run_folder`.

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
import pathlib
import random
import resource
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from noprop import checkpoint as ckpt
from noprop.config import (
    InapplicableOptionWarning,
    TrainConfig,
    changed_options,
    inference_kwargs,
    model_kwargs,
    resolve_device,
    resume_config,
)
from noprop.data import BatchLoader, ImageDataset, load_dataset
from noprop.distributed.session import open_session
from noprop.models import NoPropModel, build_model
from noprop.objectives import LossTerms
from noprop.host_memory import set_host_memory
from noprop.precision import check_backend, precision_scope
from noprop.run_folder import (
    TrainingInterrupted,
    SignalGuard,
    check_out,
    check_same_data,
    checkpoint_context,
    compare_shapes,
    prepare_out,
    save_epoch,
)
from noprop.step import TrainStep

EVAL_BATCH = 1000
FINITE_CHECK_EVERY = 25  # steps between loss-finiteness checks on a GPU (each check synchronises)


class NonFiniteLossError(RuntimeError):
    """Training stopped because a loss term became NaN or Inf (the message names the term and block)."""


class NonFiniteParameterError(NonFiniteLossError):
    """Training stopped because a parameter or buffer became NaN or Inf (the message names it and its block)."""


@dataclass
class TrainResult:
    """What :func:`train` returns: the metrics of every epoch, the trained model and the data used."""

    history: list[dict]
    model: NoPropModel
    dataset: ImageDataset
    out: pathlib.Path = field(default_factory=pathlib.Path)


def build_optimizer(model: NoPropModel, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW for DT and the baseline, Adam for CT and FM (the paper's): one optimizer for all parameters.

    Two parameter groups: every parameter gets ``config.weight_decay`` (blocks, embedding and
    classifier: the paper's setting) except the learnable noise schedule's (``noise_schedule.*``,
    CT), which get none. Weight decay pulls parameters towards 0, and for the schedule that is no
    regulariser but a bias on the schedule itself: Adam's L2 term pulls ``gamma_0`` towards 0 and
    ``raw_span`` towards 0 (``gamma_1 - gamma_0`` towards ``softplus(0) = 0.69``), i.e. both ends
    of ``alpha_bar`` towards 1/2, and reshapes the monotone network, against what the objective
    asks for.

    The fused implementation (one pass over every parameter) on both devices, capturable when the
    step is captured in a CUDA graph. On the CPU it is 6x faster than the foreach one (10.6 vs 61.4
    ms for the 20M parameters of ten full-width blocks, 2 cores, torch 2.14) and keeps the step's
    optimizer share at a few percent.
    """
    optimizer_class = torch.optim.AdamW if model.method in ("dt", "backprop") else torch.optim.Adam
    on_cuda = next(model.parameters()).device.type == "cuda"
    implementation = dict(fused=True, capturable=config.cuda_graphs) if on_cuda else dict(fused=True)
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
    precision: str = "fp32",
) -> tuple[float, torch.Tensor]:
    """Accuracy of ``model.predict`` on ``x``; the labels ``y`` are only compared with the predictions.

    ``precision``: ``"fp32"``, ``"tf32"`` or ``"bf16"``; the predictions run inside
    :func:`noprop.precision.precision_scope` (TF32 matmuls, or bfloat16 autocast).

    Returns:
        ``(accuracy in [0, 1], predicted classes [N])``.
    """
    was_training = model.training
    model.eval()
    predictions = []
    with precision_scope(precision, x.device):
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


def train(config: TrainConfig, dataset: ImageDataset | None = None, *, changes: dict | None = None) -> TrainResult:
    """Run (or resume) a training run; see the module docstring.

    Args:
        config: the run's settings. With ``config.resume``, the run continues with the
            checkpoint's settings; only :data:`noprop.config.RESUME_MAY_CHANGE` may differ (``data_dir`` points
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
    with SignalGuard() as guard, contextlib.ExitStack() as stack:
        return _train(config, dataset, changes, guard, stack)


def _train(
    config: TrainConfig, dataset: ImageDataset | None, changes: dict | None, guard: SignalGuard, stack: contextlib.ExitStack
) -> TrainResult:
    state = None
    checkpoint_path = None
    if config.resume:
        checkpoint_path = pathlib.Path(config.resume)
        state = ckpt.load(checkpoint_path)
        with checkpoint_context(checkpoint_path, "config"):
            with warnings.catch_warnings():
                warnings.simplefilter("error", InapplicableOptionWarning)
                saved = TrainConfig(**state["config"])
        requested = changed_options(config) if changes is None else dict(changes)
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
    parallel = open_session(config, stack)  # torch.distributed: None for a one-process run
    if parallel is not None and not parallel.is_main:
        config = dataclasses.replace(config, progress=False)
    device = parallel.device if parallel is not None else resolve_device(config.device)
    if config.cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs: capturing the step needs a CUDA device, the run is on {device}")
    check_backend(config.precision, config.backend, device)
    if device.type == "cpu":
        set_host_memory(config.host_memory)
    continuing = checkpoint_path is not None and out == checkpoint_path.resolve().parent
    replace = bool(check_out(out, config, continuing)) and not continuing
    _set_seeds(config.seed)
    if dataset is None:
        if state is not None and config.data_dir is not None and not pathlib.Path(config.data_dir).is_dir():
            raise ValueError(f"data_dir: the run's data folder {config.data_dir} does not exist (moved?); pass --data-dir with its new location")
        normalization = (state["dataset"]["mean"], state["dataset"]["std"]) if state is not None else None
        load = lambda: load_dataset(  # noqa: E731
            config.dataset, config.data_dir, train_limit=config.train_limit, eval_limit=config.eval_limit, seed=config.seed,
            normalization=normalization,
        )
        dataset = parallel.main_first(load) if parallel is not None else load()
    if parallel is not None:
        parallel.check_same_data(dataset)
    if state is not None:
        check_same_data(dataset, state["dataset"], config.data_dir or "the dataset")
    dataset = dataset.to(device)
    model = build_model(config.method, **model_kwargs(config, dataset)).to(device)
    if state is None:
        model.initialize_from_data(dataset.train_x, dataset.train_y)
    optimizer = build_optimizer(model, config)
    loader_generator = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    start_epoch = 1
    if state is not None:
        with checkpoint_context(checkpoint_path, "model or optimizer state"):
            if state["method"] != config.method:
                raise ValueError(f"it holds a {state['method']!r} model but its config says {config.method!r}")
            compare_shapes(model, state["model"])
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            history = list(state["history"])
            start_epoch = state["epoch"] + 1
            ckpt.restore_rng(state["rng"], loader_generator)
            if parallel is not None:
                parallel.restore_device_rng(state["rng"])
    if parallel is not None:
        step = parallel.train_step(model, optimizer, config)
    else:
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
    batches = parallel.batches(loader, model) if parallel is not None else loader
    if parallel is None or parallel.is_main:
        prepare_out(out, replace)
    if parallel is not None:
        parallel.barrier()
    run_evaluation = parallel.evaluate if parallel is not None else evaluate
    run_save = parallel.save_epoch if parallel is not None else save_epoch
    train_eval = (dataset.train_x[: dataset.test_x.shape[0]], dataset.train_y[: dataset.test_x.shape[0]])
    last_saved = (checkpoint_path.resolve(), start_epoch - 1) if continuing else (None, 0)
    try:
        for epoch in range(start_epoch, config.epochs + 1):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            stats, train_seconds = _run_epoch(model, step, batches, config, epoch, device)
            if parallel is not None:
                stats = parallel.combine(stats)
            _check_model_finite(model, f"after epoch {epoch}", epoch)
            eval_start = time.perf_counter()
            eval_kwargs = {**inference_kwargs(config), "precision": config.precision}
            train_accuracy, _ = run_evaluation(model, *train_eval, **eval_kwargs)
            test_accuracy, _ = run_evaluation(model, dataset.test_x, dataset.test_y, **eval_kwargs)
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
                last_saved = (run_save(out, config, model, optimizer, epoch, history, dataset, device, loader_generator), epoch)
            if config.progress:
                print(
                    f"epoch {epoch}/{config.epochs}: loss {record['loss']:.4f}  train acc {train_accuracy:.4f}  "
                    f"test acc {test_accuracy:.4f}  ({train_seconds:.1f}s, {record['examples_per_second']:.0f} ex/s)",
                    file=sys.stderr,
                )
    except TrainingInterrupted as interrupted:
        raise TrainingInterrupted(interrupted.signum, *last_saved) from None
    if parallel is not None:
        parallel.finish(model)
    return TrainResult(history, model, dataset, out)


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
            with precision_scope(config.precision, device, cache_enabled=False):  # no bf16 weight copies across optimizer steps
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
