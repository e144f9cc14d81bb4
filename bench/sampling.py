"""CT/FM inference: eager sampling against the whole loop captured in one CUDA graph.

Usage::

    python -m bench.sampling [--device cpu|cuda] [--batch 1024] [--steps 1000] [--width 1.0] [--repeats 5] [--out DIR]

For each case (CT ancestral, CT Heun, FM Euler; MNIST-shaped random images, the paper's blocks
at ``--width``, the fused backends that ``auto`` picks): the median seconds per ``predict`` call
of ``--batch`` images with ``--steps`` steps, eager and, on a GPU, with ``cuda_graph=True``
(timed with CUDA events after the capture and a warm-up replay; the capture's own seconds
recorded apart), the speed-up, and the largest difference between graphed and eager logits for
the same seed (they must agree). On the CPU there is no graph: only eager is timed.

Writes ``<out>/sampling-<device-tag>.json`` (default ``bench/results``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
from typing import Callable

import torch

from bench.environment import REPO, device_name, device_tag, utc_now, versions
from noprop import NoPropCT, NoPropFM
from noprop.timing import cuda_event_times

CASES = {"ct-ancestral": (NoPropCT, "ancestral"), "ct-heun": (NoPropCT, "heun"), "fm-euler": (NoPropFM, "euler")}
IMAGE_SHAPE = (1, 28, 28)
SEED = 1234


def _seconds(run: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls after an untimed one: CUDA events on a GPU, ``perf_counter`` on the CPU."""
    if device.type == "cuda":
        return [ms / 1e3 for ms in cuda_event_times(run, warmup=1, runs=repeats)]
    run()
    seconds = []
    for _ in range(repeats):
        begin = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - begin)
    return seconds


def run_case(name: str, device: torch.device, batch: int, steps: int, width: float, repeats: int) -> dict:
    """Eager and (on a GPU) graphed ``predict`` of one case; see the module docstring for the fields."""
    cls, solver = CASES[name]
    torch.manual_seed(0)
    model = cls(10, IMAGE_SHAPE[0], IMAGE_SHAPE[1], width=width).to(device).eval()
    x = torch.randn(batch, *IMAGE_SHAPE, device=device)
    seed = torch.tensor([SEED], device=device)

    def eager():
        return model.predict(x, steps=steps, solver=solver, seed=seed)

    row = {"solver": solver, "batch": batch, "steps": steps}
    row["eager_seconds"] = statistics.median(_seconds(eager, device, repeats))
    if device.type != "cuda":
        return row

    def graphed():
        return model.predict(x, steps=steps, solver=solver, seed=seed, cuda_graph=True)

    torch.cuda.synchronize(device)
    begin = time.perf_counter()
    graphed()  # the capture: warm-up calls and the capture itself
    torch.cuda.synchronize(device)
    row["capture_seconds"] = time.perf_counter() - begin
    row["graph_seconds"] = statistics.median(_seconds(graphed, device, repeats))
    row["speedup"] = row["eager_seconds"] / row["graph_seconds"]
    row["max_abs_difference"] = (graphed() - eager()).abs().max().item()
    return row


def main(argv: list[str] | None = None) -> int:
    """Run the cases, write the JSON, print a table; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m bench.sampling", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", nargs="+", choices=tuple(CASES), default=list(CASES))
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=1000, help="inference steps (the paper's: 1000)")
    parser.add_argument("--width", type=float, default=1.0, help="block width multiplier (the paper's: 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case and mode")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = {}
    for name in args.cases:
        print(f"sampling {name} ...", file=sys.stderr, flush=True)
        rows[name] = run_case(name, device, args.batch, args.steps, args.width, args.repeats)
    name = device_name(device)
    result = {
        "device": {"type": device.type, "name": name, "tag": device_tag(device, name)},
        "date_utc": utc_now(),
        "versions": versions(),
        "settings": {"width": args.width, "repeats": args.repeats, "image_shape": list(IMAGE_SHAPE), "backend": "auto"},
        "cases": rows,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"sampling-{result['device']['tag']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("| case | batch | steps | eager s | graph s | speed-up | capture s | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for case, row in rows.items():
        keys = ("graph_seconds", "speedup", "capture_seconds", "max_abs_difference")
        graph = [f"{row[k]:.4g}" if k in row else "-" for k in keys]
        print(f"| {case} | {row['batch']} | {row['steps']} | {row['eager_seconds']:.4g} | " + " | ".join(graph) + " |")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
