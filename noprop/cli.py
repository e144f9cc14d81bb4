"""The ``noprop`` command: ``train``, ``eval``, ``compare``, ``bench`` and ``info``.

Examples::

    noprop train --method dt --dataset mnist --epochs 10 --out runs/dt-mnist
    noprop train --method ct --dataset cifar10 --embedding learned --inference-steps 100 --solver heun
    noprop eval --checkpoint runs/ct-cifar10/checkpoint.pt --solver ancestral --inference-steps 1000
    noprop train --resume runs/dt-mnist/checkpoint.pt --epochs 20
    noprop eval --checkpoint runs/dt-mnist/checkpoint.pt
    torchrun --nproc-per-node 2 -m noprop train --parallel blocks --out runs/dt-2ranks
    noprop eval --checkpoint runs/dt-2ranks/checkpoint.dcp
    noprop compare --methods dt,backprop --embeddings onehot --seeds 3 --inference-runs 5 --epochs 10 --out runs/compare
    noprop info
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys

import torch

from noprop import __version__


def _add_data_and_budget_arguments(parser: argparse.ArgumentParser, defaults) -> None:
    """``--dataset --data-dir --epochs --batch-size --lr --weight-decay``, shared by ``train`` and ``compare``
    (``defaults``: a ``TrainConfig`` or ``CompareConfig``)."""
    from noprop.data import DATASETS

    add = parser.add_argument
    add("--dataset", choices=tuple(DATASETS), default=defaults.dataset)
    add("--data-dir", default=None, help="folder with local IDX (MNIST, Fashion-MNIST) or CIFAR python files")
    add("--epochs", type=int, default=defaults.epochs)
    add("--batch-size", type=int, default=defaults.batch_size)
    add("--lr", type=float, default=defaults.lr)
    add("--weight-decay", type=float, default=defaults.weight_decay)


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from noprop.embeddings import EMBEDDINGS
    from noprop.models import METHODS
    from noprop.models.dt import SCHEDULES
    from noprop import backends
    from noprop.config import DIST_BACKENDS, PARALLEL_MODES
    from noprop.host_memory import HOST_MEMORY_POLICIES
    from noprop.train import TrainConfig

    defaults = TrainConfig()
    add = parser.add_argument
    add("--method", choices=METHODS, default=defaults.method, help="NoProp variant or the back-propagation baseline")
    _add_data_and_budget_arguments(parser, defaults)
    add("--T", type=int, default=None, help="number of blocks (DT, backprop; default 10)")
    add("--eta", type=float, default=None, help="L2 scale (default: the paper's, 0.1 for DT and 1 for CT)")
    add("--ode-steps", type=int, default=None, help="adjoint: Euler steps of the training solve (paper: 1000)")
    add("--embedding", choices=EMBEDDINGS, default=defaults.embedding)
    add("--embedding-dim", type=int, default=None, help="dimension of a learned embedding (default 20)")
    add("--width", type=float, default=defaults.width, help="multiplier of the paper's layer widths")
    add("--schedule", choices=SCHEDULES, default=defaults.schedule, help="DT: all blocks per step, or a pass per block")
    add("--backend", type=_backend_name, default=defaults.backend, metavar="{" + ",".join(("auto",) + backends.names()) + "}",
        help="backend of every op (noprop info lists them; 'cuda' is the deprecated name of 'extension')")
    add("--seed", type=int, default=defaults.seed)
    add("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N")
    add("--out", default=None, help=f"output folder: metrics.json, curves.png, checkpoint.pt (default {defaults.out}; "
        "on --resume the checkpoint's folder); a folder holding another run is refused")
    add("--overwrite", action="store_true", help="replace the run already in --out")
    add("--resume", default=None, metavar="CKPT", help="continue the run saved in this checkpoint (its settings; "
        "--epochs, --data-dir, --out, --device, --backend, --compile, --block-chunk, --precision, --host-memory may change)")
    add("--train-limit", type=int, default=None, metavar="N", help="train on a random N training images")
    add("--eval-limit", type=int, default=None, metavar="N", help="evaluate on the first N test images")
    add("--inference-steps", type=int, default=None, metavar="N", help="CT/FM/adjoint inference steps (default 1000)")
    _add_solver_argument(parser)
    add("--deterministic-inference", action="store_true", help="no noise at inference (z_0 = 0)")
    add("--block-chunk", type=int, default=None, metavar="K", help="DT: train the blocks K at a time (caps memory)")
    add("--grad-clip", type=float, default=None, metavar="NORM", help="clip gradient norms, every DT block separately")
    add("--compile", action="store_true", help="torch.compile the loss (and the optimizer step on a GPU)")
    add("--cuda-graphs", action="store_true", help="capture the whole training step in a CUDA graph (GPU)")
    _add_precision_argument(parser, defaults.precision, "training and evaluation")
    add("--host-memory", choices=HOST_MEMORY_POLICIES, default=defaults.host_memory,
        help="on a CPU: 'reuse' keeps freed large buffers in the C heap for the next step (no page faults on every "
        "step's activations; the process keeps its peak memory), 'system' maps blocks of 32 MiB and more anew, as glibc does by default")
    add("--parallel", choices=PARALLEL_MODES, default=defaults.parallel,
        help="under torchrun --nproc-per-node N: 'blocks' splits DT's T blocks over the ranks (DT only: CT and FM have one "
        "shared network), 'data' splits every batch's rows (DT, CT, FM); a resumed run takes it from its own launch")
    add("--dist-backend", choices=DIST_BACKENDS, default=defaults.dist_backend, help="process group backend (auto: nccl on GPUs, gloo on the CPU)")
    add("--dist-timeout", type=float, default=defaults.dist_timeout, metavar="SECONDS",
        help="a collective or a silent rank stops every rank after this long, naming the rank")
    add("--no-progress", action="store_true", help="no progress bars")


def _add_precision_argument(parser: argparse.ArgumentParser, default: str | None, what: str) -> None:
    """``--precision {fp32,tf32,bf16}`` (:mod:`noprop.precision`)."""
    from noprop.precision import PRECISIONS

    parser.add_argument(
        "--precision", choices=PRECISIONS, default=default,
        help=f"numeric precision of {what}: fp32, tf32 (TF32 matmuls and convolutions on a GPU) or bf16 (bfloat16 autocast; "
        "parameters and optimizer stay float32)" + ("" if default else "; default: the checkpoint's run"),
    )


def _add_solver_argument(parser: argparse.ArgumentParser) -> None:
    """``--solver``, default None (the method's own), with every solver some model offers as the choices."""
    from noprop.models import MODELS

    solvers = sorted({solver for model in MODELS.values() for solver in model.solvers})
    offers = "; ".join(
        f"{method}: {', '.join(model.solvers)} (default {model.default_solver})"
        for method, model in MODELS.items()
        if model.solvers
    )
    parser.add_argument(
        "--solver", choices=solvers, default=None, help=f"inference solver, by method: {offers}; the others take none"
    )


def _check_solver(method: str, solver: str | None) -> None:
    """Reject a ``--solver`` that ``method``'s model does not offer (the error names ``--solver``)."""
    from noprop.models import MODELS

    MODELS[method].resolve_solver(solver, name="--solver")


def _given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options typed in ``argv`` (long options, abbreviations included)."""
    given = set()
    actions = parser._option_string_actions
    for token in argv:
        if token == "--":
            break
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        matches = {actions[name].dest} if name in actions else {a.dest for o, a in actions.items() if o.startswith(name)}
        if len(matches) == 1:
            given |= matches
    return given


def _train(args: argparse.Namespace) -> int:
    from noprop.train import TrainConfig, train

    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    given = getattr(args, "given", None)
    if args.resume:  # the checkpoint's settings, with what was typed (the trainer refuses conflicts by name)
        typed = given if given is not None else {name for name in fields if getattr(args, name, None) not in (None, False)}
        changes = {name: getattr(args, name) for name in typed if name in fields and name not in ("resume", "progress")}
        changes.setdefault("epochs", args.epochs)
        config = TrainConfig(resume=args.resume, epochs=args.epochs, progress=not args.no_progress)
        result = train(config, changes=changes)
    else:
        _check_solver(args.method, args.solver)
        values = {name: getattr(args, name) for name in fields if name != "progress" and hasattr(args, name)}
        if values.get("out") is None:
            values.pop("out", None)
        config = TrainConfig(**values, progress=not args.no_progress)
        result = train(config)
    last = result.history[-1] if result.history else {}
    if os.environ.get("RANK", "0") == "0":  # a parallel run's summary once, from rank 0
        print(json.dumps({"out": str(result.out), "dataset": result.dataset.name, **{k: last.get(k) for k in ("epoch", "train_accuracy", "test_accuracy")}}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import pathlib

    from noprop import checkpoint as ckpt
    from noprop.config import TrainConfig, inference_kwargs, resolve_device
    from noprop.data import load_dataset
    from noprop.precision import check_backend
    from noprop.run_folder import model_from_checkpoint
    from noprop.train import evaluate

    state = ckpt.load(args.checkpoint)
    try:
        saved = TrainConfig(**state["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint: {args.checkpoint}: its config is not valid ({error})") from None
    _check_solver(state["method"], args.solver)
    overrides = {
        "inference_steps": args.inference_steps,
        "solver": args.solver,
        "deterministic_inference": args.deterministic_inference or None,
        "data_dir": args.data_dir,
        "eval_limit": args.eval_limit,
        "precision": args.precision,
    }
    config = dataclasses.replace(saved, **{k: v for k, v in overrides.items() if v is not None})
    device = resolve_device(args.device)
    if config.data_dir is not None and not pathlib.Path(config.data_dir).is_dir():
        raise ValueError(f"data_dir: the run's data folder {config.data_dir} does not exist (moved?); pass --data-dir with its new location")
    saved_data = state["dataset"]
    dataset = load_dataset(
        config.dataset, config.data_dir, train_limit=config.train_limit, eval_limit=config.eval_limit, seed=config.seed,
        normalization=(saved_data.get("mean"), saved_data.get("std")),  # the statistics the model was trained with
    ).to(device)
    if dataset.name != saved_data.get("name"):
        raise ValueError(
            f"checkpoint: the model was trained on {saved_data.get('name')!r} but {dataset.name!r} was loaded; "
            "pass --data-dir with the training data"
        )
    model = model_from_checkpoint(state, args.checkpoint, device)
    check_backend(config.precision, model.backend, device)
    torch.manual_seed(config.seed)
    accuracy, _ = evaluate(model, dataset.test_x, dataset.test_y, **inference_kwargs(config), precision=config.precision)
    print(json.dumps({"checkpoint": args.checkpoint, "method": state["method"], "epoch": state["epoch"], "dataset": dataset.name, "test_examples": int(dataset.test_x.shape[0]), "precision": config.precision, "inference": inference_kwargs(config), "test_accuracy": accuracy}))
    return 0


def _add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """``noprop compare``'s options: the comparison's own, and the training options every run shares."""
    from noprop.compare import CompareConfig
    from noprop import backends

    defaults = CompareConfig()
    add = parser.add_argument
    add("--methods", default=",".join(defaults.methods), help="comma-separated methods (dt, ct, fm, backprop, adjoint)")
    add("--embeddings", default=",".join(defaults.embeddings), help="comma-separated label embeddings (onehot, learned, prototype)")
    add("--seeds", type=int, default=defaults.seeds, help="training seeds per method and embedding (0..N-1)")
    add("--inference-runs", type=int, default=defaults.inference_runs, help="evaluations of each model with fresh inference noise")
    add("--out", default=defaults.out, help="folder of the comparison: runs/, compare.json, compare.md, compare.png; "
        "rerunning the same command there continues it")
    _add_data_and_budget_arguments(parser, defaults)
    add("--width", type=float, default=defaults.width, help="multiplier of the paper's layer widths")
    add("--T", type=int, default=None, help="number of blocks (DT, backprop; default 10)")
    add("--ode-steps", type=int, default=None, help="adjoint: Euler steps of the training solve (paper: 1000)")
    add("--inference-steps", type=int, default=None, metavar="N", help="CT/FM/adjoint inference steps (default 1000)")
    add("--train-limit", type=int, default=None, metavar="N", help="train on a random N training images (the same for every run)")
    add("--eval-limit", type=int, default=None, metavar="N", help="evaluate on the first N test images")
    add("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N")
    add("--backend", type=_backend_name, default=defaults.backend, metavar="{" + ",".join(("auto",) + backends.names()) + "}")
    add("--compile", action="store_true", help="torch.compile the loss (and the optimizer step on a GPU)")
    _add_precision_argument(parser, defaults.precision, "training and evaluation")
    add("--no-progress", action="store_true", help="no progress lines or bars")


def _compare(args: argparse.Namespace) -> int:
    from noprop.compare import CompareConfig, compare

    names = {field.name for field in dataclasses.fields(CompareConfig)} - {"progress"}
    config = CompareConfig(**{name: getattr(args, name) for name in names}, progress=not args.no_progress)
    result = compare(config)
    cells = [{k: cell[k] for k in ("method", "embedding")} | {"test_accuracy": cell["test_accuracy"]["mean"]} for cell in result.report["cells"]]
    print(json.dumps({"out": str(result.out), "report": str(result.out / "compare.md"), "cells": cells}))
    return 0


def _backend_name(value: str) -> str:
    """``--backend``: ``auto`` or a registered backend; the deprecated ``cuda`` warns and becomes ``extension``."""
    import warnings

    from noprop import backends

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        try:
            name = backends.canonical(value, "--backend", allow_auto=True)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    for warning in caught:
        print(f"noprop: warning: {warning.message}", file=sys.stderr)
        warnings.warn(warning.message, DeprecationWarning, stacklevel=2)
    return name


def backend_table() -> list[str]:
    """Every registered backend x op, read from the registry: devices and dtypes where it runs here, or why not."""
    from noprop import backends

    lines = []
    for name, status in backends.statuses().items():
        backend = backends.get(name)
        lines.append(f"  {name} ({backend.kind}): {backend.summary}")
        for op in backends.OPS:
            if op in status.lacks:
                lines.append(f"    {op:<15} not implemented: {status.lacks[op]}")
                continue
            cells = []
            for device, dtypes in status.dtypes.items():
                names = ", ".join(backends.dtype_name(d) for d in dtypes)
                cells.append(f"{device} [{names}]" if device in status.devices else f"{device}: no ({status.why_not[device]})")
            lines.append(f"    {op:<15} " + "; ".join(cells))
    return lines


def _info(args: argparse.Namespace) -> int:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [
        f"noprop {__version__}",
        f"python {platform.python_version()} ({platform.machine()})",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})",
        f"triton {triton_version}",
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            lines.append(f"device cuda:{index}: {properties.name}, {properties.total_memory / 2**30:.0f} GiB, sm_{properties.major}{properties.minor}")
    else:
        lines.append("device: cpu only (no CUDA device)")
    lines.append("backends: (per op: the devices and dtypes it runs on here, or why not)")
    lines += backend_table()
    print("\n".join(lines))
    return 0


def _bench(argv: list[str]) -> int:
    """``noprop bench``: ``bench/e2e.py`` of the source checkout (benchmarks are not installed).

    The checkout is the one this ``noprop`` was installed from in place (``pip install -e .``), or
    the current directory.
    """
    import pathlib

    for root in (pathlib.Path(__file__).resolve().parents[1], pathlib.Path.cwd()):
        if (root / "bench" / "e2e.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            from bench import e2e

            return e2e.main(argv)
    print(
        "noprop bench: error: the benchmarks live in bench/ of a source checkout and are not installed with the "
        "package; run `noprop bench` (or `python -m bench.e2e`) from a checkout of noprop",
        file=sys.stderr,
    )
    return 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``noprop`` command."""
    parser = argparse.ArgumentParser(prog="noprop", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"noprop {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train a model and write metrics, curves and checkpoints")
    _add_train_arguments(train_parser)
    train_parser.set_defaults(handler=_train)
    parser.command_parsers = {"train": train_parser}  # for the options a command line typed (_given_options)
    eval_parser = commands.add_parser("eval", help="test accuracy of a checkpoint")
    eval_parser.add_argument("--checkpoint", required=True)
    eval_parser.add_argument("--data-dir", default=None)
    eval_parser.add_argument("--device", default="auto")
    eval_parser.add_argument("--eval-limit", type=int, default=None)
    eval_parser.add_argument("--inference-steps", type=int, default=None)
    _add_solver_argument(eval_parser)
    eval_parser.add_argument("--deterministic-inference", action="store_true")
    _add_precision_argument(eval_parser, None, "inference")
    eval_parser.set_defaults(handler=_eval)
    compare_parser = commands.add_parser(
        "compare", help="train and evaluate methods x embeddings x seeds; write compare.json, compare.md, compare.png"
    )
    _add_compare_arguments(compare_parser)
    compare_parser.set_defaults(handler=_compare)
    info_parser = commands.add_parser("info", help="versions, devices and which backends can run")
    info_parser.set_defaults(handler=_info)
    commands.add_parser(
        "bench", help="end-to-end benchmark from a source checkout, written to --out (noprop bench --help)", add_help=False
    )
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``noprop`` command; returns the exit status.

    Errors become one line on stderr, never a traceback: the library's own errors (``ValueError``,
    ``TypeError``, an inapplicable option, a backend that cannot run) and the OS's (a folder that
    cannot be written) exit with status 2, a NaN/Inf stop or a lost rank of a parallel run with 1,
    SIGINT (Ctrl-C) and SIGTERM with 128 + the signal number (130, 143) after the checkpoint being
    written was finished.
    """
    import signal
    import warnings

    from noprop.backends import BackendUnavailableError
    from noprop.distributed import RankLostError
    from noprop.train import InapplicableOptionWarning, NonFiniteLossError, TrainingInterrupted

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmark parses its own options
        return _bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in parser.command_parsers:
        args.given = _given_options(parser.command_parsers[args.command], argv[1:])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", InapplicableOptionWarning)  # the command line refuses them
            return args.handler(args)
    except (ValueError, TypeError, InapplicableOptionWarning, BackendUnavailableError, OSError) as error:
        print(f"noprop {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, RankLostError) as error:
        print(f"noprop {args.command}: stopped: {_one_line(error)}", file=sys.stderr)
        return 1
    except TrainingInterrupted as interrupted:
        print(f"noprop {args.command}: {interrupted.describe()}", file=sys.stderr)
        return 128 + interrupted.signum
    except KeyboardInterrupt:
        print(f"noprop {args.command}: interrupted by SIGINT", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
