"""End-to-end benchmark: NoProp-DT training throughput and memory, and DT/CT/FM inference throughput.

Run it from a source checkout as ``noprop bench [options]`` or ``python -m bench.e2e [options]``;
it writes ``train-<device>.json`` and a plot beside it into ``--out`` (default: the current
directory), recording the commit of the checkout (or that the code is not a git checkout).

Training cases, on MNIST-shaped data (1x28x28 images, 10 classes, B = 128, T = 10, the paper's
block at full width; the images are random, which does not change the work per step):

=================  ==============================================================================
``paper_loop``     Algorithm 1: block t trains on a whole pass before block t + 1 (one step = one block)
``seed_style``     every minibatch visits the T blocks one after another, one optimizer step each
``stack_eager``    BlockStack: one step trains all T blocks at once, ``backend="auto"`` (the default path), eager
``compiled_loop``  ``seed_style`` with every block's loss ``torch.compile``-d
``fused``          BlockStack + fused ops (+ the whole step captured in a CUDA graph on a GPU)
``fused_chunk1``   ``fused`` with ``block_chunk=1`` (activations of one block alive at a time)
=================  ==============================================================================

An epoch means every block sees every training example once: ``ceil(60000 / B)`` steps, or T
times as many one-block steps for ``paper_loop``. Each case is timed for ``--steps`` steps after
``--warmup`` steps (compilation and graph capture happen during warm-up); epoch seconds are the
median step time times the steps per epoch. GPU steps are timed with CUDA events; CPU steps with
``time.perf_counter``. Peak memory: on a GPU ``torch.cuda.max_memory_allocated`` over the case
(model, optimizer state, activations; the batch pool excluded); on the CPU every case runs in a
subprocess of its own and reports that process's maximum resident set size. On the CPU the
library's cases run under the host-memory policy ``noprop train`` sets (``"reuse"``,
:mod:`noprop.host_memory`) and the user-written loops under glibc's default allocation (``"system"``).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import pathlib
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

from noprop import NoPropCT, NoPropDT, NoPropFM
from bench import cpu_step
from bench.environment import REPO, device_name, device_tag, utc_now, versions
from bench.loops import SeedStyleLoop
from noprop.host_memory import set_host_memory
from noprop.step import TrainStep
from noprop.timing import cuda_event_times
from noprop.train import TrainConfig, build_optimizer

TRAIN_CASES = ("paper_loop", "seed_style", "stack_eager", "compiled_loop", "fused", "fused_chunk1")
BASELINE = "seed_style"
LOOP_CASES = ("paper_loop", "seed_style", "compiled_loop")  # user-written loops: no library settings
DATASET_SIZE = 60_000
NUM_CLASSES = 10
IMAGE_SHAPE = (1, 28, 28)
POOL = 2048  # distinct random images the steps cycle through


# ---------------------------------------------------------------------------------------------- setup


def _batches(device: torch.device, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(POOL, *IMAGE_SHAPE, generator=g).to(device)
    labels = torch.randint(0, NUM_CLASSES, (POOL,), generator=g).to(device)
    return [(images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, POOL - batch_size + 1, batch_size)]


def _fused_backend(device: torch.device) -> str:
    """The fused backend that runs on ``device``: ``auto``'s choice on a GPU, the extension's host build on the CPU."""
    return "auto" if device.type == "cuda" else "extension"


def build_case(name: str, device: torch.device, T: int, width: float) -> tuple[Callable, int]:
    """The step function of a training case and how many of its steps make one epoch per batch."""
    torch.manual_seed(0)
    if name in LOOP_CASES:
        model = NoPropDT(NUM_CLASSES, 1, 28, T=T, width=width, schedule="paper", backend="reference").to(device)
        loop = SeedStyleLoop(model, compile=name == "compiled_loop")
        if name == "paper_loop":
            counter = {"step": 0}

            def paper_step(x, y):  # one block per step, cycling so warm-up touches every block's code
                t = counter["step"] % T
                counter["step"] += 1
                return loop(x, y, range(t, t + 1))

            return paper_step, T
        return loop, 1
    fused = name.startswith("fused")
    backend = _fused_backend(device) if fused else "auto"
    model = NoPropDT(NUM_CLASSES, 1, 28, T=T, width=width, backend=backend).to(device)
    config = TrainConfig(cuda_graphs=fused and device.type == "cuda")
    step = TrainStep(
        model,
        build_optimizer(model, config),
        cuda_graphs=config.cuda_graphs,
        block_chunk=1 if name == "fused_chunk1" else None,
    )
    return step, 1


# ---------------------------------------------------------------------------------------------- timing


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(run: Callable, inputs: list, warmup: int, steps: int, device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` calls of ``run(*inputs[i])`` after ``warmup`` untimed calls
    (CUDA events on a GPU, :func:`noprop.timing.cuda_event_times`; ``time.perf_counter`` on the CPU)."""
    if device.type == "cuda":
        calls = itertools.count()
        times_ms = cuda_event_times(lambda: run(*inputs[next(calls) % len(inputs)]), warmup, steps)
        return [ms / 1e3 for ms in times_ms]
    for i in range(warmup):
        run(*inputs[i % len(inputs)])
    seconds = []
    for i in range(steps):
        begin = time.perf_counter()
        run(*inputs[i % len(inputs)])
        seconds.append(time.perf_counter() - begin)
    return seconds


def _peak_memory_mb(device: torch.device, baseline_bytes: int) -> float:
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - baseline_bytes) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_training_case(name: str, device: torch.device, T: int, width: float, batch_size: int, warmup: int, steps: int) -> dict:
    """Time one training case; see the module docstring for what is measured."""
    # the previous case's model, optimizer and graph pool sit in reference cycles (a step object
    # holds its own bound methods): free them now, or the baseline holds memory that is freed mid-case
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    batches = _batches(device, batch_size)
    _synchronize(device)
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:  # what noprop train sets for the library's cases; glibc's default allocation for a user's loop
        set_host_memory("system" if name in LOOP_CASES else "reuse")
    step, per_batch = build_case(name, device, T, width)
    seconds = time_steps(step, batches, warmup, steps, device)
    median = statistics.median(seconds)
    steps_per_epoch = math.ceil(DATASET_SIZE / batch_size) * per_batch
    epoch_seconds = median * steps_per_epoch
    return {
        "step_seconds_median": median,
        "step_seconds_p20_p80": [_quantile(seconds, 0.2), _quantile(seconds, 0.8)],
        "timed_steps": steps,
        "steps_per_epoch": steps_per_epoch,
        "epoch_seconds": epoch_seconds,
        "examples_per_second": DATASET_SIZE / epoch_seconds,
        "peak_memory_mb": _peak_memory_mb(device, baseline),
        "peak_memory_kind": "cuda max allocated (batch pool excluded)" if device.type == "cuda" else "process max RSS",
    }


def run_inference_case(method: str, device: torch.device, T: int, width: float, batch_size: int, ode_steps: int, repeats: int) -> dict:
    """Examples per second of ``predict`` (DT: its T blocks; CT and FM: ``ode_steps`` steps of their default solver, ancestral for CT and Euler for FM, one block call each)."""
    torch.manual_seed(0)
    backend = _fused_backend(device)
    if method == "dt":
        model, steps = NoPropDT(NUM_CLASSES, 1, 28, T=T, width=width, backend=backend), None
    else:
        cls = NoPropCT if method == "ct" else NoPropFM
        model, steps = cls(NUM_CLASSES, 1, 28, width=width, backend=backend), ode_steps
    model = model.to(device).eval()
    x = torch.randn(batch_size, *IMAGE_SHAPE, device=device)
    seconds = time_steps(lambda x: model.predict(x, steps=steps), [(x,)], warmup=1, steps=repeats, device=device)
    median = statistics.median(seconds)
    return {"batch_size": batch_size, "steps": steps or T, "seconds_per_batch": median, "examples_per_second": batch_size / median}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------------------------------------- criteria, output


def criteria(training: dict, device: torch.device, cpu: dict | None = None) -> list[dict]:
    """The issue's acceptance numbers, evaluated on this run (``cpu``: :func:`bench.cpu_step.measure`'s result)."""

    def ratio(case: str, over: str) -> float | None:
        if case in training and over in training:
            return training[over]["epoch_seconds"] / training[case]["epoch_seconds"]
        return None

    checks = []
    if device.type == "cuda":
        checks += [
            ("fused epoch vs seed_style (speed-up)", ratio("fused", "seed_style"), ">=", 10.0),
            ("fused epoch vs compiled_loop (speed-up)", ratio("fused", "compiled_loop"), ">=", 3.0),
            ("fused peak memory, all blocks (GB)", training.get("fused", {}).get("peak_memory_mb", float("nan")) / 1024, "<=", 1.0),
            ("fused peak memory, block_chunk=1 (GB)", training.get("fused_chunk1", {}).get("peak_memory_mb", float("nan")) / 1024, "<=", 0.5),
        ]
    else:
        checks += [("stack_eager (the default CPU path) vs seed_style (speed-up)", ratio("stack_eager", "seed_style"), ">=", 1.0)]
        checks += cpu_step.criteria(cpu) if cpu is not None else []
    results = []
    for label, value, comparison, threshold in checks:
        if value is None or value != value:
            results.append({"criterion": label, "value": None, "threshold": f"{comparison} {threshold}", "pass": None})
            continue
        passed = value >= threshold if comparison == ">=" else value <= threshold
        results.append({"criterion": label, "value": round(value, 3), "threshold": f"{comparison} {threshold}", "pass": passed})
    return results


def plot(result: dict, path: pathlib.Path) -> None:
    """Bars of epoch seconds and peak memory per training case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(result["training"])
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(12, 4))
    time_axis.bar(cases, [result["training"][c]["epoch_seconds"] for c in cases])
    time_axis.set_yscale("log")
    time_axis.set_ylabel("seconds per epoch (log)")
    memory_axis.bar(cases, [result["training"][c]["peak_memory_mb"] for c in cases])
    memory_axis.set_ylabel(f"peak memory (MB, {result['training'][cases[0]]['peak_memory_kind']})")
    for axis in (time_axis, memory_axis):
        axis.tick_params(axis="x", rotation=30)
        axis.grid(alpha=0.3, axis="y")
    figure.suptitle(f"NoProp-DT training, T={result['settings']['T']}, B={result['settings']['batch_size']} on {result['device']['name']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def markdown_table(result: dict) -> str:
    """The training results as a markdown table (for the README)."""
    lines = ["| case | epoch (s) | examples/s | vs seed_style | peak memory (MB) |", "|---|---:|---:|---:|---:|"]
    baseline = result["training"].get(BASELINE, {}).get("epoch_seconds")
    for case, row in result["training"].items():
        speedup = f"{baseline / row['epoch_seconds']:.2f}x" if baseline else "-"
        lines.append(f"| {case} | {row['epoch_seconds']:.1f} | {row['examples_per_second']:.0f} | {speedup} | {row['peak_memory_mb']:.0f} |")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="noprop bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--cases", nargs="+", default=list(TRAIN_CASES), choices=TRAIN_CASES)
    parser.add_argument("--T", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=float, default=1.0, help="block width multiplier (the paper's: 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per case (default: 3, 2T for compiled_loop)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default 50 on a GPU, 5 on the CPU)")
    parser.add_argument("--inference-batch", type=int, default=None, help="default 1024 on a GPU, 256 on the CPU")
    parser.add_argument("--ode-steps", type=int, default=None, help="CT/FM inference steps (default 1000 on a GPU, 50 on the CPU)")
    parser.add_argument("--cpu-rounds", type=int, default=12, help="CPU: alternated rounds of the default step vs the seed-style loop")
    parser.add_argument("--out", default=".", help="folder for train-<device>.json and .png (default: the current directory)")
    parser.add_argument("--one-case", default=None, help=argparse.SUPPRESS)  # internal: a CPU case in its own process
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    args = _parse(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else (args.device if args.device != "auto" else "cpu"))
    on_gpu = device.type == "cuda"
    steps = args.steps or (50 if on_gpu else 5)

    def warmup_for(case: str) -> int:
        if args.warmup is not None:
            return args.warmup
        return 2 * args.T if case in ("compiled_loop", "paper_loop") else 3

    if args.one_case:
        row = run_training_case(args.one_case, device, args.T, args.width, args.batch_size, warmup_for(args.one_case), steps)
        print(json.dumps(row))
        return 0
    training = {}
    for case in args.cases:
        print(f"training case {case} ...", file=sys.stderr, flush=True)
        if on_gpu:
            training[case] = run_training_case(case, device, args.T, args.width, args.batch_size, warmup_for(case), steps)
        else:  # a process per case, so each reports its own peak memory
            command = [sys.executable, "-m", "bench.e2e", "--device", "cpu", "--one-case", case, "--T", str(args.T),
                       "--batch-size", str(args.batch_size), "--width", str(args.width), "--steps", str(steps),
                       "--warmup", str(warmup_for(case))]
            output = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO).stdout
            training[case] = json.loads(output.strip().splitlines()[-1])
        print(f"  {training[case]['epoch_seconds']:.1f} s/epoch, {training[case]['peak_memory_mb']:.0f} MB", file=sys.stderr)
    cpu = None
    if not on_gpu:
        print(f"default step vs seed-style loop, alternated ({args.cpu_rounds} rounds) ...", file=sys.stderr, flush=True)
        cpu = cpu_step.measure(T=args.T, batch_size=args.batch_size, rounds=args.cpu_rounds, width=args.width)
    inference = {}
    batch = args.inference_batch or (1024 if on_gpu else 256)
    ode_steps = args.ode_steps or (1000 if on_gpu else 50)
    for method in ("dt", "ct", "fm"):
        print(f"inference {method} ...", file=sys.stderr, flush=True)
        inference[method] = run_inference_case(method, device, args.T, args.width, batch, ode_steps, repeats=5 if on_gpu else 3)
    name = device_name(device)
    result = {
        "device": {"type": device.type, "name": name, "tag": device_tag(device, name), "torch_threads": torch.get_num_threads()},
        "date_utc": utc_now(),
        "versions": versions(),
        "settings": {"T": args.T, "batch_size": args.batch_size, "width": args.width, "dataset_size": DATASET_SIZE,
                     "timed_steps": steps, "fused_backend": _fused_backend(device), "cuda_graphs": on_gpu},
        "training": training,
        "inference": inference,
    }
    if cpu is not None:
        result["cpu_step"] = cpu
    result["criteria"] = criteria(training, device, cpu)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = result["device"]["tag"]
    (out / f"train-{tag}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"train-{tag}.png")
    print(markdown_table(result))
    for check in result["criteria"]:
        print(f"{'PASS' if check['pass'] else 'FAIL' if check['pass'] is False else 'N/A '}  {check['criterion']}: {check['value']} ({check['threshold']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
