"""Accuracy of every method on the MNIST test-set split: the runs behind the README's accuracy table.

Usage::

    python -m bench.accuracy [--data-dir DIR] [--runs NAME ...] [--out DIR]

``--data-dir`` is a folder with the MNIST t10k IDX files (default: ``shared/data/mnist`` in the
checkout's parent folder).

Trains each run of :data:`RUNS` with :func:`noprop.train.train` on the real MNIST *test* set split
8,000 / 2,000 (:func:`noprop.data.mnist_test_split`; the 60,000 training images cannot be
downloaded where this library is built), with the paper's hyper-parameters (batch 128, lr 1e-3,
weight decay 1e-3, T = 10) unless the run says otherwise, records the test accuracy after every
epoch, and evaluates NoProp-CT three ways (ancestral sampling, the probability-flow ODE from
``z_0 ~ N(0, I)`` and from ``z_0 = 0``). Writes ``<out>/accuracy-<device>.json`` (default
``bench/results``; one file, updated run by run, so runs can be added later) and prints the
markdown table of the README.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import torch

from bench.environment import REPO, device_name, device_tag, utc_now, versions
from noprop.data import mnist_test_split
from noprop.config import APPLIES_TO
from noprop.train import TrainConfig, evaluate, train

RESULTS = REPO / "bench" / "results"
SCHEMA = "noprop.bench.accuracy/1"
INFERENCE_STEPS = 20  # CT, FM and adjoint evaluation steps (the paper's 1000 cost 50x more on a CPU)

# name -> TrainConfig overrides. Quarter-width runs are the CI learning tests' settings.
RUNS: dict[str, dict] = {
    "dt-full": dict(method="dt", width=1.0, epochs=12),
    "dt": dict(method="dt", width=0.25, epochs=6),
    "dt-paper-schedule": dict(method="dt", width=0.25, epochs=6, schedule="paper"),
    "ct": dict(method="ct", width=0.25, epochs=20),
    "fm": dict(method="fm", width=0.25, epochs=10),
    "backprop": dict(method="backprop", width=0.25, epochs=2),
    "adjoint": dict(method="adjoint", width=0.25, epochs=3, ode_steps=10),
}

# How NoProp-CT is evaluated after training: label -> predict arguments.
CT_SAMPLERS = {
    "ancestral": dict(solver="ancestral"),
    "ode, z_0 ~ N(0, I)": dict(solver="euler"),
    "ode, z_0 = 0": dict(solver="euler", deterministic=True),
}


def run(name: str, dataset, device: torch.device, seed: int = 0) -> dict:
    """Train run ``name`` of :data:`RUNS`; its settings, per-epoch test accuracy, seconds, and CT's samplers."""
    overrides = RUNS[name]
    with tempfile.TemporaryDirectory() as out:
        steps = {"inference_steps": INFERENCE_STEPS} if overrides["method"] in APPLIES_TO["inference_steps"] else {}
        config = TrainConfig(out=out, progress=False, seed=seed, device=str(device), **steps, **overrides)
        started = time.perf_counter()
        result = train(config, dataset=dataset)
        seconds = time.perf_counter() - started
    record = {
        "settings": {**overrides, **steps, "seed": seed, "batch_size": config.batch_size, "T": config.T},
        "test_accuracy_per_epoch": [row["test_accuracy"] for row in result.history],
        "test_accuracy": result.history[-1]["test_accuracy"],
        "train_seconds": seconds,
    }
    if overrides["method"] == "ct":
        test_x, test_y = dataset.test_x.to(device), dataset.test_y.to(device)
        record["ct_samplers"] = {}
        for label, arguments in CT_SAMPLERS.items():
            torch.manual_seed(seed)
            accuracy, _ = evaluate(result.model, test_x, test_y, steps=INFERENCE_STEPS, **arguments)
            record["ct_samplers"][label] = accuracy
    return record


def markdown_table(results: dict) -> str:
    """The README's table: one row per run (and per CT sampler)."""
    lines = ["| run | method | width | epochs | test accuracy | train time (s) |", "|---|---|---:|---:|---:|---:|"]
    for name, record in results["runs"].items():
        s = record["settings"]
        row = f"| {name} | {s['method']} | {s['width']} | {s['epochs']} | {100 * record['test_accuracy']:.2f}% | {record['train_seconds']:.0f} |"
        lines.append(row)
        for label, accuracy in record.get("ct_samplers", {}).items():
            lines.append(f"| {name}: {label} | | | | {100 * accuracy:.2f}% | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen runs and write/update the JSON; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "mnist"), help="folder with the t10k IDX files")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dataset = mnist_test_split(args.data_dir)
    name = device_name(device)
    code = versions()  # the commit the runs execute: read once, before any run (HEAD may move while they train)
    path = pathlib.Path(args.out) / f"accuracy-{device_tag(device, name)}.json"
    results = json.loads(path.read_text()) if path.exists() else {"schema": SCHEMA, "runs": {}}
    for run_name in args.runs:
        print(f"run {run_name} ...", file=sys.stderr, flush=True)
        record = run(run_name, dataset, device)
        record.update(date_utc=utc_now(), versions=code, device={"type": device.type, "name": name, "torch_threads": torch.get_num_threads()})
        results["runs"][run_name] = record
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        print(f"  {100 * record['test_accuracy']:.2f}% in {record['train_seconds']:.0f} s", file=sys.stderr, flush=True)
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
