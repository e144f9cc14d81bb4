"""The ``noprop`` command: ``train``, ``eval``, ``bench`` and ``info``.

Examples::

    noprop train --method dt --dataset mnist --epochs 10 --out runs/dt-mnist
    noprop train --method ct --dataset cifar10 --embedding learned --inference-steps 100 --solver heun
    noprop eval --checkpoint runs/ct-cifar10/checkpoint.pt --solver ancestral --inference-steps 1000
    noprop train --resume runs/dt-mnist/checkpoint.pt --epochs 20
    noprop eval --checkpoint runs/dt-mnist/checkpoint.pt
    noprop info
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys

import torch

from noprop import __version__


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from noprop.data import DATASETS
    from noprop.embeddings import EMBEDDINGS
    from noprop.models import METHODS
    from noprop.models.dt import SCHEDULES
    from noprop import backends
    from noprop.train import TrainConfig

    defaults = TrainConfig()
    add = parser.add_argument
    add("--method", choices=METHODS, default=defaults.method, help="NoProp variant or the back-propagation baseline")
    add("--dataset", choices=tuple(DATASETS), default=defaults.dataset)
    add("--data-dir", default=None, help="folder with local IDX (MNIST, Fashion-MNIST) or CIFAR python files")
    add("--epochs", type=int, default=defaults.epochs)
    add("--batch-size", type=int, default=defaults.batch_size)
    add("--lr", type=float, default=defaults.lr)
    add("--weight-decay", type=float, default=defaults.weight_decay)
    add("--T", type=int, default=defaults.T, help="number of blocks (DT, backprop)")
    add("--eta", type=float, default=None, help="L2 scale (default: the paper's, 0.1 for DT and 1 for CT)")
    add("--ode-steps", type=int, default=defaults.ode_steps, help="adjoint: Euler steps of the training solve (paper: 1000)")
    add("--embedding", choices=EMBEDDINGS, default=defaults.embedding)
    add("--embedding-dim", type=int, default=None, help="dimension of a learned embedding (default 20)")
    add("--width", type=float, default=defaults.width, help="multiplier of the paper's layer widths")
    add("--schedule", choices=SCHEDULES, default=defaults.schedule, help="DT: all blocks per step, or a pass per block")
    add("--backend", type=_backend_name, default=defaults.backend, metavar="{" + ",".join(("auto",) + backends.names()) + "}",
        help="backend of every op (noprop info lists them; 'cuda' is the deprecated name of 'extension')")
    add("--seed", type=int, default=defaults.seed)
    add("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N")
    add("--out", default=defaults.out, help="output folder: metrics.json, curves.png, checkpoint.pt")
    add("--resume", default=None, metavar="CKPT", help="continue the run saved in this checkpoint")
    add("--train-limit", type=int, default=None, metavar="N", help="train on a random N training images")
    add("--eval-limit", type=int, default=None, metavar="N", help="evaluate on the first N test images")
    add("--inference-steps", type=int, default=None, metavar="N", help="CT/FM/adjoint inference steps (default 1000)")
    _add_solver_argument(parser)
    add("--deterministic-inference", action="store_true", help="no noise at inference (z_0 = 0)")
    add("--block-chunk", type=int, default=None, metavar="K", help="DT: train the blocks K at a time (caps memory)")
    add("--grad-clip", type=float, default=None, metavar="NORM", help="clip gradient norms, every DT block separately")
    add("--compile", action="store_true", help="torch.compile the loss (and the optimizer step on a GPU)")
    add("--cuda-graphs", action="store_true", help="capture the whole training step in a CUDA graph (GPU)")
    add("--no-progress", action="store_true", help="no progress bars")


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


def _train(args: argparse.Namespace) -> int:
    from noprop.train import TrainConfig, train

    _check_solver(args.method, args.solver)
    config = TrainConfig(
        **{
            field.name: getattr(args, field.name)
            for field in dataclasses.fields(TrainConfig)
            if field.name != "progress" and hasattr(args, field.name)
        },
        progress=not args.no_progress,
    )
    result = train(config)
    last = result.history[-1] if result.history else {}
    print(json.dumps({"out": str(result.out), "dataset": result.dataset.name, **{k: last.get(k) for k in ("epoch", "train_accuracy", "test_accuracy")}}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from noprop import checkpoint as ckpt
    from noprop.data import load_dataset
    from noprop.models import build_model
    from noprop.train import TrainConfig, evaluate, inference_kwargs, resolve_device

    state = ckpt.load(args.checkpoint)
    _check_solver(state["method"], args.solver)
    overrides = {
        "inference_steps": args.inference_steps,
        "solver": args.solver,
        "deterministic_inference": args.deterministic_inference or None,
        "data_dir": args.data_dir,
        "eval_limit": args.eval_limit,
    }
    config = dataclasses.replace(TrainConfig(**state["config"]), **{k: v for k, v in overrides.items() if v is not None})
    device = resolve_device(args.device)
    dataset = load_dataset(
        config.dataset, config.data_dir, train_limit=config.train_limit, eval_limit=config.eval_limit, seed=config.seed
    ).to(device)
    if dataset.name != state["dataset"]["name"]:
        raise ValueError(
            f"checkpoint: the model was trained on {state['dataset']['name']!r} but {dataset.name!r} was loaded; "
            "pass --data-dir with the training data"
        )
    model = build_model(state["method"], **state["model_config"]).to(device)
    model.load_state_dict(state["model"])
    torch.manual_seed(config.seed)
    accuracy, _ = evaluate(model, dataset.test_x, dataset.test_y, **inference_kwargs(config))
    print(json.dumps({"checkpoint": args.checkpoint, "method": state["method"], "epoch": state["epoch"], "dataset": dataset.name, "test_examples": int(dataset.test_x.shape[0]), "test_accuracy": accuracy}))
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
    eval_parser = commands.add_parser("eval", help="test accuracy of a checkpoint")
    eval_parser.add_argument("--checkpoint", required=True)
    eval_parser.add_argument("--data-dir", default=None)
    eval_parser.add_argument("--device", default="auto")
    eval_parser.add_argument("--eval-limit", type=int, default=None)
    eval_parser.add_argument("--inference-steps", type=int, default=None)
    _add_solver_argument(eval_parser)
    eval_parser.add_argument("--deterministic-inference", action="store_true")
    eval_parser.set_defaults(handler=_eval)
    info_parser = commands.add_parser("info", help="versions, devices and which backends can run")
    info_parser.set_defaults(handler=_info)
    commands.add_parser(
        "bench", help="end-to-end benchmark from a source checkout, written to --out (noprop bench --help)", add_help=False
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``noprop`` command; returns the exit status."""
    from noprop.train import NonFiniteLossError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmark parses its own options
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, TypeError) as error:
        print(f"noprop {args.command}: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"noprop {args.command}: stopped: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
