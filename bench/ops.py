"""Microbenchmarks of the fused ops: every op family, every backend that runs on the device, fwd and bwd apart.

Usage::

    python -m bench.ops [--device cpu|cuda] [--quick] [--out DIR] [--threads N]

What is measured (op cases, shapes, inputs and byte counts: :mod:`bench.op_cases`; timers:
:mod:`bench.timing`): for every (op case, pass, shape, backend) the median per-call time
and its p20/p80 spread, the speedup of each fused backend over the reference, and on CUDA the
memory-bandwidth floor (bytes the op must move / the device-to-device copy bandwidth measured in
the same run), the ratio measured / floor, and the peak memory one call allocates.

Writes ``<out>/ops-<device-tag>.json`` and ``.png`` (default ``bench/results``), prints a markdown
table for the README, and the acceptance criteria of :mod:`bench.ops_criteria` (the
``criteria`` section of the JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
from typing import Sequence

import torch

from bench import op_cases, ops_criteria, timing
from bench.environment import REPO, device_name, device_tag, utc_now, versions
from bench.op_cases import CASE_PASSES, SHAPES, Shape

RESULTS = REPO / "bench" / "results"
SCHEMA = "noprop.bench.ops/1"


# ---------------------------------------------------------------------------------------------- measuring


def measure(
    device: torch.device, shapes: Sequence[Shape], config: timing.TimingConfig, bandwidth: float | None = None
) -> list[dict]:
    """Time every (op case, pass, shape, timed backend) on ``device``; one record each.

    Args:
        device: where the inputs live and the ops run.
        shapes: problem sizes (:data:`op_cases.SHAPES` or a subset).
        config: warm-up and sampling settings.
        bandwidth: copy bandwidth in bytes/s for the floor columns (None: no floor).

    Returns:
        Records with ``op, case, config, pass, shape, T, B, C, D, backend, median_ms, p20_ms,
        p80_ms, samples, calls_per_sample, bytes, peak_mem_bytes, speedup, floor_ms, floor_ratio``;
        ``speedup`` is reference median / this median (None for the reference).
    """
    timed = [name for name, why in op_cases.timed_backends(device).items() if not why]
    backends = sorted(timed, key=lambda name: name != "reference")  # the reference first: speedups divide by it
    records = []
    for shape in shapes:
        for case, pass_ in CASE_PASSES:
            nbytes = case.bytes_moved(shape, pass_)
            floor_ms = nbytes / bandwidth * 1e3 if bandwidth else None
            reference_ms = None
            for backend in backends:
                if op_cases.lacks(backend, case):
                    continue
                fn = op_cases.prepare(case, pass_, shape, backend, device)
                result = timing.time_callable(fn, device, config)
                if backend == "reference":
                    reference_ms = result.median_ms
                fused = backend != "reference" and reference_ms is not None
                records.append(dict(
                    op=case.op, case=case.name, config=case.config, **{"pass": pass_}, shape=shape.name,
                    T=shape.T, B=shape.B, C=shape.C, D=shape.D, backend=backend, **dataclasses.asdict(result),
                    bytes=nbytes, peak_mem_bytes=timing.peak_memory_bytes(fn, device),
                    speedup=reference_ms / result.median_ms if fused else None,
                    floor_ms=floor_ms, floor_ratio=result.median_ms / floor_ms if floor_ms else None,
                ))
                del fn  # free this case's inputs before the next one allocates its own
    return records


# ---------------------------------------------------------------------------------------------- run and report


def run(
    device: str | torch.device = "cpu",
    shapes: Sequence[Shape] = SHAPES,
    config: timing.TimingConfig = timing.TimingConfig(),
    threads: int | None = None,
    quick: bool = False,
) -> dict:
    """Measure everything on ``device`` and return the report (the JSON document).

    ``threads`` fixes ``torch.set_num_threads`` (default: keep torch's current count); the count is
    recorded either way.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but torch sees no CUDA device")
    torch.set_num_threads(threads or torch.get_num_threads())
    name = device_name(device)
    load_before = os.getloadavg()
    bandwidth = timing.copy_bandwidth(device, config) if device.type == "cuda" else None
    skipped = op_cases.timed_backends(device)
    records = measure(device, shapes, config, bandwidth)
    evaluate = ops_criteria.gpu_criteria if device.type == "cuda" else ops_criteria.cpu_criteria
    criteria = evaluate(records, skipped)
    return dict(
        schema=SCHEMA,
        device=dict(type=device.type, name=name, tag=device_tag(device, name)),
        date_utc=utc_now(),
        versions=versions(),
        threads=torch.get_num_threads(),
        interop_threads=torch.get_num_interop_threads(),
        load_average=dict(
            before=list(load_before), after=list(os.getloadavg()),
            note="1, 5, 15-minute load averages before and after the run (after includes this run's own threads)",
        ),
        dtype="float32",
        quick=quick,
        timer=dict(
            method="triton.testing.do_bench (CUDA events, L2 flushed per call)" if device.type == "cuda"
            else "time.perf_counter around batches of calls",
            **dataclasses.asdict(config),
        ),
        backends={b: ("timed" if not why else f"skipped: {why}") for b, why in skipped.items()},
        copy_bandwidth_bytes_per_s=bandwidth,
        shapes=[dataclasses.asdict(s) for s in shapes],
        records=records,
        criteria=criteria,
    )


def markdown_table(report: dict) -> str:
    """The records as a markdown table: one row per (op case, pass, shape), one column per backend."""
    backends = [b for b, status in report["backends"].items() if status == "timed"]
    gpu = report["device"]["type"] == "cuda"
    header = ["op", "pass", "shape"] + [f"{b} ms" for b in backends] + (["floor ms"] if gpu else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows: dict[tuple, dict] = {}
    for r in report["records"]:
        rows.setdefault((r["case"], r["pass"], r["shape"]), {})[r["backend"]] = r
    for (case, pass_, shape), by_backend in rows.items():
        first = next(iter(by_backend.values()))
        cells = [case, pass_, f"{shape} ({first['T']}x{first['B']}x{first['C']}x{first['D']})"]
        for backend in backends:
            r = by_backend.get(backend)
            cell = "-" if r is None else f"{r['median_ms']:.3g}"
            if r is not None and r["speedup"] is not None:
                cell += f" ({r['speedup']:.1f}x)"
            if r is not None and gpu and r["floor_ratio"] is not None:
                cell += f" [{r['floor_ratio']:.3g}x floor]"
            cells.append(cell)
        if gpu:
            cells.append(f"{first['floor_ms']:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def criteria_lines(report: dict) -> str:
    """One line per criterion: PASS / FAIL / n/a, measured value, threshold."""
    lines = []
    for c in report["criteria"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[c["passed"]]
        measured = "-" if c["measured"] is None else f"{c['measured']:.3g}"
        lines.append(f"{verdict} {c['name']}: {measured} (needs {c['comparison']} {c['threshold']:g}; {c['detail']})")
    return "\n".join(lines)


def write(report: dict, out_dir: str | os.PathLike = RESULTS) -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``ops-<tag>.json`` and ``ops-<tag>.png`` into ``out_dir``; return both paths."""
    from bench import ops_plot

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"ops-{report['device']['tag']}"
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    ops_plot.plot(report, png_path)
    return json_path, png_path


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: measure, write JSON and PNG, print the markdown table and the criteria."""
    parser = argparse.ArgumentParser(prog="python -m bench.ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    quick_help = f"only shapes {', '.join(op_cases.QUICK_SHAPES)}, shorter sampling"
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", default=str(RESULTS), help="output folder (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    args = parser.parse_args(argv)
    shapes = op_cases.shapes_named(op_cases.QUICK_SHAPES) if args.quick else SHAPES
    config = timing.QUICK if args.quick else timing.TimingConfig()
    report = run(args.device, shapes, config, args.threads, args.quick)
    json_path, png_path = write(report, args.out)
    d = report["device"]
    print(f"## Fused ops, {d['name']} ({report['threads']} threads, torch {report['versions']['torch']}, "
          f"{report['date_utc']})\n")
    print(markdown_table(report))
    if report["copy_bandwidth_bytes_per_s"]:
        print(f"\ncopy bandwidth: {report['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s (read + written)")
    print("\n" + criteria_lines(report))
    print(f"\nwrote {json_path} and {png_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
