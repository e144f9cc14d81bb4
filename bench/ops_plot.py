"""The figure of an op-microbenchmark report (:mod:`bench.ops`), drawn with matplotlib's Agg backend.

One row per timed fused backend. Left: speedup over the reference (log scale) per op case and
pass, one bar per shape. Right, on CUDA only: the fraction of the bandwidth floor reached
(floor / measured, 1 = at the floor; log scale). Dashed red lines: the GPU acceptance thresholds.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.ops_criteria import GPU_FLOOR_RATIO_MAX, GPU_SPEEDUP_MIN  # noqa: E402


def _bars(axis, records: list[dict], categories: list[tuple[str, str]], shapes: list[str], key) -> None:
    """Grouped bars: one group per (case, pass) category, one bar per shape, height ``key(record)``."""
    width = 0.8 / max(1, len(shapes))
    for j, shape in enumerate(shapes):
        heights = []
        for case, pass_ in categories:
            found = [r for r in records if r["case"] == case and r["pass"] == pass_ and r["shape"] == shape]
            heights.append(key(found[0]) if found and key(found[0]) else float("nan"))
        axis.bar([i + (j - (len(shapes) - 1) / 2) * width for i in range(len(categories))], heights, width, label=shape)
    axis.set_xticks(range(len(categories)))
    axis.set_xticklabels([f"{case} {pass_}" for case, pass_ in categories], fontsize=7, rotation=30, ha="right")
    axis.set_yscale("log")
    axis.grid(axis="y", alpha=0.3, which="both")


def plot(report: dict, path: str | os.PathLike) -> None:
    """Draw the report's speedups (and on CUDA the bandwidth-floor fractions) into ``path`` (PNG)."""
    records = report["records"]
    fused = [b for b, status in report["backends"].items() if status == "timed" and b != "reference"]
    gpu = report["device"]["type"] == "cuda"
    categories = list(dict.fromkeys((r["case"], r["pass"]) for r in records))
    shapes = list(dict.fromkeys(r["shape"] for r in records))
    rows, cols = max(1, len(fused)), 2 if gpu else 1
    figure, axes = plt.subplots(rows, cols, figsize=(8 * cols, 4.5 * rows), squeeze=False)
    for row, backend in enumerate(fused):
        mine = [r for r in records if r["backend"] == backend]
        speed = axes[row][0]
        _bars(speed, mine, categories, shapes, lambda r: r["speedup"])
        speed.axhline(1.0, color="black", linewidth=0.8)
        speed.set_ylabel(f"{backend}: speedup vs reference")
        if gpu:
            speed.axhline(GPU_SPEEDUP_MIN, color="red", linewidth=0.8, linestyle="--")
            floor = axes[row][1]
            _bars(floor, mine, categories, shapes, lambda r: r["floor_ms"] / r["median_ms"] if r["floor_ms"] else None)
            floor.axhline(1.0, color="black", linewidth=0.8)
            floor.axhline(1 / GPU_FLOOR_RATIO_MAX, color="red", linewidth=0.8, linestyle="--")
            floor.set_ylabel(f"{backend}: floor / measured")
    if fused:
        axes[0][0].legend(fontsize=7, title="shape", title_fontsize=7)
    else:
        axes[0][0].text(0.5, 0.5, "no fused backend timed on this device", ha="center", va="center")
    device = report["device"]
    title = f"noprop fused ops, {device['name']} ({report['threads']} threads), {report['date_utc'][:10]}"
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
