"""The comparison: every (method, embedding, training seed) trained with the same budget, each model
evaluated several times with fresh inference noise, and the report (:mod:`noprop.report`).

Layout of ``OUT``::

    arguments.json                      the comparison's arguments and data fingerprint (a restart must match
                                        them, except --no-progress, --out and --data-dir: folders may move)
    runs/<method>-<embedding>-seed<k>/  a run of noprop.train (checkpoint.pt, metrics.json, curves.png)
        evaluation.json                 its evaluation: the run is finished once this file exists
    compare.json, compare.md, compare.png   the report, written when every run is finished

Resumable: a restarted comparison (the same arguments) skips every run with ``evaluation.json``,
evaluates a run whose checkpoint has all its epochs, continues a run whose checkpoint has fewer
(``resume``, exactly as ``noprop train --resume``) and starts the others.

Evaluation of a run: for inference run ``r`` of training seed ``k``, torch's generators are seeded
with ``INFERENCE_SEED_BASE + k * R + r`` (R inference runs) before :func:`noprop.train.evaluate`
computes the accuracy on the test set and on the training subset the trainer evaluates (the first
``len(test)`` training images), so every one of the S x R evaluations of a cell draws its own noise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import signal
import sys
import time
from dataclasses import dataclass

import torch

from noprop import checkpoint as ckpt
from noprop import report
from noprop.config import APPLIES_TO, TrainConfig, flag, inference_kwargs, resolve_device
from noprop.data import ImageDataset, limit, load_dataset
from noprop.embeddings import EMBEDDINGS
from noprop.models import METHODS, NoPropModel
from noprop.run_folder import SignalGuard, TrainingInterrupted, model_from_checkpoint, write_json_atomic
from noprop.train import evaluate, train
from noprop.validation import check_choice, check_positive_int

SCHEMA = "noprop.compare/1"
INFERENCE_SEED_BASE = 10_000  # inference seeds never coincide with training seeds 0..S-1
ARGUMENTS_FILE = "arguments.json"
EVALUATION_FILE = "evaluation.json"
# what a restarted comparison may change: the folder may move, the data too (its fingerprint must match)
MAY_CHANGE = ("progress", "out", "data_dir")


class ComparisonInterrupted(TrainingInterrupted):
    """SIGINT or SIGTERM stopped the comparison; rerunning the same command continues it."""

    def __init__(self, signum: int, out: pathlib.Path):
        self.out = out
        super().__init__(signum)

    def describe(self) -> str:
        return (
            f"interrupted by {signal.Signals(self.signum).name}; the finished runs and the last checkpoint of the run in "
            f"progress are kept in {self.out / 'runs'}: rerun the same noprop compare command to continue"
        )


def parse_list(name: str, value: object, choices: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated string (or a sequence) of distinct names from ``choices``, as a tuple.

    Raises:
        ValueError: naming ``name``: an empty list, a name not in ``choices``, or a name given twice.
    """
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    if not items or any(not isinstance(v, str) or not v for v in items):
        raise ValueError(f"{name}: expected a comma-separated list of {', '.join(choices)}, got {value!r}")
    for item in items:
        check_choice(name, item, choices)
    repeated = sorted({v for v in items if items.count(v) > 1})
    if repeated:
        raise ValueError(f"{name}: {', '.join(repeated)} given more than once")
    return tuple(items)


@dataclass
class CompareConfig:
    """A comparison's arguments (the ``noprop compare`` flags); the training options are :class:`TrainConfig`'s.

    Every run trains with ``TrainConfig(method, embedding, seed=k, **options)`` for ``k`` in
    ``0..seeds-1``. ``T``, ``ode_steps`` and ``inference_steps`` go to the methods that use them
    (:data:`noprop.config.APPLIES_TO`; None: the paper's), and are refused if no chosen method does.
    Every run trains on the same data: ``train_limit`` keeps one random subset (seed 0) for all.
    Defaults are the paper's Table 1 protocol: 3 training seeds x 5 inference runs, every embedding.
    """

    methods: tuple[str, ...] | str = ("dt", "ct", "fm", "backprop")
    embeddings: tuple[str, ...] | str = EMBEDDINGS
    seeds: int = 3
    inference_runs: int = 5
    out: str = "runs/compare"
    dataset: str = "mnist"
    data_dir: str | None = None
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-3
    width: float = 1.0
    T: int | None = None
    ode_steps: int | None = None
    inference_steps: int | None = None
    train_limit: int | None = None
    eval_limit: int | None = None
    device: str = "auto"
    backend: str = "auto"
    compile: bool = False
    precision: str = "fp32"
    progress: bool = True

    def __post_init__(self) -> None:
        self.methods = parse_list("methods", self.methods, METHODS)
        self.embeddings = parse_list("embeddings", self.embeddings, EMBEDDINGS)
        check_positive_int("seeds", self.seeds)
        check_positive_int("inference_runs", self.inference_runs)
        for name in ("T", "ode_steps", "inference_steps"):
            if getattr(self, name) is not None and not set(APPLIES_TO[name]) & set(self.methods):
                users = ", ".join(APPLIES_TO[name])
                raise ValueError(f"{name} ({flag(name)}): none of the methods {', '.join(self.methods)} uses it (only {users} do)")

    def run_names(self) -> list[tuple[str, str, int]]:
        """``(method, embedding, seed)`` of every run, in the order they are trained."""
        return [(m, e, k) for m in self.methods for e in self.embeddings for k in range(self.seeds)]

    def train_config(self, method: str, embedding: str, seed: int) -> TrainConfig:
        """The :class:`TrainConfig` of one run (its folder: ``OUT/runs/<method>-<embedding>-seed<k>``)."""
        shared = ("dataset", "data_dir", "epochs", "batch_size", "lr", "weight_decay", "width", "train_limit", "eval_limit",
                  "device", "backend", "compile", "precision", "progress")
        options = {name: getattr(self, name) for name in shared}
        options.update({name: getattr(self, name) for name in ("T", "ode_steps", "inference_steps") if method in APPLIES_TO[name]})
        out = pathlib.Path(self.out) / "runs" / run_name(method, embedding, seed)
        return TrainConfig(method=method, embedding=embedding, seed=seed, out=str(out), **options)

    def recorded(self) -> dict:
        """The arguments as ``arguments.json`` records them (paths absolute, lists as lists, no ``progress``)."""
        record = dataclasses.asdict(self)
        record.pop("progress")
        record["out"] = str(pathlib.Path(self.out).resolve())
        record["data_dir"] = str(pathlib.Path(self.data_dir).resolve()) if self.data_dir is not None else None
        return json.loads(json.dumps(record))  # tuples become lists, as read back from the file


def run_name(method: str, embedding: str, seed: int) -> str:
    """``<method>-<embedding>-seed<k>``: a run's folder under ``OUT/runs``."""
    return f"{method}-{embedding}-seed{seed}"


def inference_seed(seed: int, run: int, runs: int) -> int:
    """The seed of inference run ``run`` (of ``runs``) of the model trained with seed ``seed``."""
    return INFERENCE_SEED_BASE + seed * runs + run


@dataclass
class ComparisonResult:
    """What :func:`compare` returns: the report (the content of ``compare.json``) and its folder."""

    report: dict
    out: pathlib.Path


def compare(config: CompareConfig, dataset: ImageDataset | None = None) -> ComparisonResult:
    """Train, evaluate and report every run of ``config`` into ``config.out`` (see the module docstring).

    Args:
        config: the comparison's arguments.
        dataset: use this dataset (on the CPU) for every run instead of loading ``config.dataset``
            (``train_limit`` and ``eval_limit`` apply to it too; its name and fingerprint are
            recorded, and a restart must pass the same data).

    Raises:
        ValueError: bad arguments (each :class:`TrainConfig` is built before anything runs), or an
            ``out`` holding a comparison with other arguments or other data, or files that are not one.
        ComparisonInterrupted: SIGINT or SIGTERM; the finished runs and the last checkpoint are kept.
    """
    out = pathlib.Path(config.out).resolve()
    plans = [config.train_config(*name) for name in config.run_names()]  # validates every run's options
    machine = report.environment(resolve_device(config.device))  # validates the device
    with SignalGuard():
        try:
            _check_arguments(out, config)
            if dataset is None:
                dataset = load_dataset(config.dataset, config.data_dir, train_limit=config.train_limit, eval_limit=config.eval_limit)
            else:
                dataset = limit(dataset, config.train_limit, config.eval_limit)
            _record_arguments(out, config, dataset)
            records = _run_all(plans, config, dataset, machine)
        except TrainingInterrupted as interrupted:
            raise ComparisonInterrupted(interrupted.signum, out) from None
    content = report.build(config.recorded(), dataset.describe(), records, machine)
    report.write(content, out)
    return ComparisonResult(content, out)


def _check_arguments(out: pathlib.Path, config: CompareConfig) -> None:
    """Refuse an ``out`` that holds another comparison (other arguments) or something else."""
    path = out / ARGUMENTS_FILE
    if not path.exists():
        if (out / "runs").exists() and any((out / "runs").iterdir()):
            raise ValueError(
                f"out: {out} holds runs/ but no {ARGUMENTS_FILE}, so not a comparison this command can continue; choose a new --out"
            )
        return
    try:
        saved = json.loads(path.read_text())["arguments"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"out: {path} is not a comparison's arguments file ({error}); choose a new --out") from None
    given = config.recorded()
    names = sorted((set(given) | set(saved)) - set(MAY_CHANGE))
    differ = [name for name in names if given.get(name) != saved.get(name)]
    if differ:
        details = "; ".join(f"{flag(name)} {given.get(name)!r} given, {saved.get(name)!r} recorded" for name in differ)
        raise ValueError(
            f"out: {out} holds a comparison with other arguments ({details}); rerun with the recorded arguments to continue it, "
            "or choose a new --out"
        )


def _record_arguments(out: pathlib.Path, config: CompareConfig, dataset: ImageDataset) -> None:
    """Write ``arguments.json`` on the first start; on a restart, refuse other data than the recorded."""
    path = out / ARGUMENTS_FILE
    keys = ("name", "image_shape", "num_classes", "fingerprint", "train_examples", "test_examples")
    data = {key: dataset.describe()[key] for key in keys}
    if path.exists():
        saved = json.loads(path.read_text()).get("data")
        if saved != json.loads(json.dumps(data)):
            raise ValueError(
                f"dataset: other data than the comparison in {out} was started with ({saved} recorded, {data} given); "
                "pass the same data (--dataset, --data-dir, --train-limit, --eval-limit), or choose a new --out"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"schema": SCHEMA, "arguments": config.recorded(), "data": data})


def _run_all(plans: list[TrainConfig], config: CompareConfig, dataset: ImageDataset, machine: dict) -> list[dict]:
    """Every run's evaluation record, training and evaluating the runs not finished yet."""
    total = len(plans)
    finished = sum((pathlib.Path(plan.out) / EVALUATION_FILE).exists() for plan in plans)
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if config.progress else (lambda text: None)
    say(f"noprop compare: {total} runs ({len(config.methods)} methods x {len(config.embeddings)} embeddings x {config.seeds} seeds), "
        f"{config.epochs} epochs each, {config.inference_runs} inference runs; {finished} finished already")
    records, started, done_here = [], time.perf_counter(), 0
    for index, train_config in enumerate(plans, start=1):
        folder = pathlib.Path(train_config.out)
        label = f"run {index}/{total}: {folder.name}"
        if (folder / EVALUATION_FILE).exists():
            records.append(json.loads((folder / EVALUATION_FILE).read_text()))
            continue
        model, history = _trained_model(train_config, dataset, label, say)
        say(f"{label}: evaluating ({config.inference_runs} inference runs)")
        record = evaluate_run(model, dataset, train_config, history, config.inference_runs)
        record.update(commit=machine["commit"], device=machine["device"])
        write_json_atomic(folder / EVALUATION_FILE, record)
        records.append(record)
        done_here += 1
        finished += 1
        elapsed = time.perf_counter() - started
        left = elapsed / done_here * (total - finished)
        test = report.mean_and_standard_error(record["test_accuracy"])
        se = "" if test["se"] is None else f" +- {100 * test['se']:.2f}"
        say(f"{label} done: test accuracy {100 * test['mean']:.2f}{se}% ({finished}/{total} finished; "
            f"{_clock(elapsed)} elapsed, about {_clock(left)} left)")
        del model
    return records


def _trained_model(config: TrainConfig, dataset: ImageDataset, label: str, say) -> tuple[NoPropModel, list[dict]]:
    """The run's model trained for ``config.epochs`` and its history: from a finished checkpoint, by resuming a
    partial one (a killed run), or from scratch."""
    path = pathlib.Path(config.out) / "checkpoint.pt"
    if path.exists():
        state = ckpt.load(path)
        if state["epoch"] >= config.epochs:
            say(f"{label}: trained already ({state['epoch']} epochs), loading its checkpoint")
            return model_from_checkpoint(state, path, resolve_device(config.device)), state["history"]
        say(f"{label}: resuming at epoch {state['epoch'] + 1}/{config.epochs}")
        changes = {name: getattr(config, name) for name in ("epochs", "device", "backend", "compile", "progress", "data_dir")}
        result = train(dataclasses.replace(config, resume=str(path)), dataset, changes=changes)
    else:
        say(f"{label}: training epochs 1-{config.epochs}")
        result = train(config, dataset)
    return result.model, result.history


def evaluate_run(model: NoPropModel, dataset: ImageDataset, config: TrainConfig, history: list[dict], runs: int) -> dict:
    """One run's record: ``runs`` accuracies on the test set and on the trainer's training subset, and its costs.

    Inference run ``r`` seeds torch's generators with :func:`inference_seed` before each of its two
    evaluations (train, test), so ``torch.manual_seed(seed)`` and :func:`noprop.train.evaluate`
    reproduce either accuracy; the generators' states are restored afterwards.
    The training subset is the one :func:`noprop.train.train` reports: the first ``len(test)``
    training images. Costs: seconds per epoch (training only, mean over the epochs), the peak
    memory over the epochs, the parameter count.
    """
    device = next(model.parameters()).device
    data = dataset.to(device)
    subset = data.test_x.shape[0]
    train_x, train_y = data.train_x[:subset], data.train_y[:subset]
    seeds = [inference_seed(config.seed, r, runs) for r in range(runs)]
    train_accuracy, test_accuracy = [], []
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    for seed in seeds:
        for x, y, accuracies in ((train_x, train_y, train_accuracy), (data.test_x, data.test_y, test_accuracy)):
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(seed)
                accuracies.append(evaluate(model, x, y, **inference_kwargs(config), precision=config.precision)[0])
    seconds = [record["train_seconds"] for record in history]
    return {
        "name": pathlib.Path(config.out).name,
        "method": config.method,
        "embedding": config.embedding,
        "seed": config.seed,
        "epochs": len(history),
        "inference_seeds": seeds,
        "inference": {**inference_kwargs(config), "precision": config.precision},
        "train_accuracy": train_accuracy,
        "test_accuracy": test_accuracy,
        "train_eval_examples": subset,
        "test_examples": int(data.test_x.shape[0]),
        "seconds_per_epoch": math.fsum(seconds) / len(seconds),
        "peak_memory_mb": max(record["peak_memory_mb"] for record in history),
        "peak_memory_kind": history[-1]["peak_memory_kind"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "history": history,
    }


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
