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
    from noprop.ops import BACKENDS
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
    add("--backend", choices=("auto",) + BACKENDS, default=defaults.backend, help="fused-op backend")
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


def _info(args: argparse.Namespace) -> int:
    from noprop.ops import available_backends

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
    lines.append("backends:")
    for name, status in available_backends().items():
        runs_on = ", ".join(status.devices) if status.devices else "nothing here"
        note = f"  ({status.reason})" if status.reason else ""
        lines.append(f"  {name:<10} runs on: {runs_on}{note}")
    print("\n".join(lines))
    return 0




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
    commands.add_parser("bench", help="end-to-end training and inference benchmark (noprop bench --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``noprop`` command; returns the exit status."""
    from noprop.train import NonFiniteLossError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmark parses its own options
        from noprop.bench import e2e

        return e2e.main(argv[1:])
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
