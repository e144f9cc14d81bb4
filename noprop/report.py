"""The comparison's report: statistics per method x embedding, ``compare.json``, ``compare.md`` and ``compare.png``.

Accuracy of a cell (one method and one embedding): the ``N = S x R`` accuracies of its S training
seeds x R inference runs, pooled as the paper's Table 1 reports them (mean +- standard error over
3 seeds x 5 inference runs):

    mean = (1/N) sum_i a_i,    s.e. = s / sqrt(N),    s = sqrt( sum_i (a_i - mean)^2 / (N - 1) )

(``s`` the sample standard deviation; no s.e. when ``N = 1``). Seconds per epoch and peak memory
are per training run: mean +- s.e. over the S seeds by the same formula.
"""

from __future__ import annotations

import datetime
import math
import pathlib
import platform
import subprocess
from typing import Sequence

import torch

from noprop.config import APPLIES_TO, PAPER_ODE_STEPS, PAPER_T
from noprop.models.ode import PAPER_INFERENCE_STEPS
from noprop.plots import plt
from noprop.run_folder import write_json_atomic

STATISTICS = (
    "mean +- standard error over the N = seeds x inference runs accuracies of a method and embedding, pooled: "
    "mean = sum(a_i) / N, s.e. = s / sqrt(N), s = sqrt(sum((a_i - mean)^2) / (N - 1)); "
    "seconds per epoch and peak memory: the same over the training seeds"
)
DISPLAY = {"dt": "NoProp-DT", "ct": "NoProp-CT", "fm": "NoProp-FM", "backprop": "Backprop", "adjoint": "Adjoint"}


def mean_and_standard_error(values: Sequence[float]) -> dict:
    """``{"mean", "se", "n"}`` of ``values`` by the formula of the module docstring (``se`` None for one value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("values: expected at least one number, got none")
    n = len(values)
    mean = math.fsum(values) / n
    se = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n) if n > 1 else None
    return {"mean": mean, "se": se, "n": n}


def cells(arguments: dict, records: list[dict]) -> list[dict]:
    """One summary per method x embedding, in the order of ``arguments``' methods and embeddings.

    Each holds train and test accuracy (:func:`mean_and_standard_error` over seeds x inference
    runs), seconds per epoch and peak memory (over seeds), the parameter count, the test accuracy
    per epoch averaged over the seeds (the learning curve, from the trainer's one evaluation per
    epoch) and the test accuracy per million parameters.
    """
    summaries = []
    for method in arguments["methods"]:
        for embedding in arguments["embeddings"]:
            runs = sorted((r for r in records if r["method"] == method and r["embedding"] == embedding), key=lambda r: r["seed"])
            if not runs:
                continue
            epochs = min(len(r["history"]) for r in runs)
            test = mean_and_standard_error([a for r in runs for a in r["test_accuracy"]])
            parameters = max(r["parameters"] for r in runs)
            summaries.append({
                "method": method,
                "embedding": embedding,
                "seeds": [r["seed"] for r in runs],
                "train_accuracy": mean_and_standard_error([a for r in runs for a in r["train_accuracy"]]),
                "test_accuracy": test,
                "seconds_per_epoch": mean_and_standard_error([r["seconds_per_epoch"] for r in runs]),
                "peak_memory_mb": mean_and_standard_error([r["peak_memory_mb"] for r in runs]),
                "peak_memory_kind": runs[0]["peak_memory_kind"],
                "parameters": parameters,
                "test_accuracy_per_million_parameters": test["mean"] / (parameters / 1e6),
                "test_accuracy_per_epoch": [math.fsum(r["history"][e]["test_accuracy"] for r in runs) / len(runs) for e in range(epochs)],
            })
    return summaries


def build(arguments: dict, dataset: dict, records: list[dict], environment: dict) -> dict:
    """The content of ``compare.json``: arguments, data, environment, date, the formula, every run and every cell."""
    return {
        "schema": "noprop.compare/1",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "arguments": arguments,
        "dataset": dataset,
        "environment": environment,
        "statistics": STATISTICS,
        "cells": cells(arguments, records),
        "runs": {record["name"]: record for record in records},
    }


def environment(device: torch.device) -> dict:
    """Where the comparison runs: the device and its name (the GPU's, or the CPU model), torch, CUDA and
    python versions, torch's CPU threads, and the noprop commit with the library files that differ from
    it (both None when noprop is not run from a git checkout)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = pathlib.Path("/proc/cpuinfo")
        lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
        models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        name = models[0] if models else (platform.processor() or platform.machine())
    checkout = pathlib.Path(__file__).resolve().parents[1]
    commit = uncommitted = None
    if (checkout / ".git").exists():
        try:
            head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
            status = subprocess.run(
                ["git", "-C", str(checkout), "status", "--porcelain", "--", "noprop", "kernels", "csrc"],
                capture_output=True, text=True, timeout=30,
            )
            if head.returncode == 0 and status.returncode == 0:
                commit, uncommitted = head.stdout.strip(), [line[3:] for line in status.stdout.splitlines()]
        except (OSError, subprocess.SubprocessError):
            pass
    return {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "commit": commit,
        "uncommitted": uncommitted,
    }


def write(content: dict, out: pathlib.Path) -> None:
    """``out/compare.json`` (atomically), ``out/compare.md`` and ``out/compare.png``."""
    write_json_atomic(out / "compare.json", content)
    (out / "compare.md").write_text(markdown(content))
    figure(content, out / "compare.png")


def _percent(summary: dict) -> str:
    se = summary["se"]
    return f"{100 * summary['mean']:.2f} ± {100 * se:.2f}" if se is not None else f"{100 * summary['mean']:.2f} (n = 1, no s.e.)"


def markdown(content: dict) -> str:
    """The Table-1-style table (one row per method x embedding) with the budget, the data and the machine."""
    a, data, env = content["arguments"], content["dataset"], content["environment"]
    runs = len(a["methods"]) * len(a["embeddings"]) * a["seeds"]
    budget = [f"{a['epochs']} epoch{'s' if a['epochs'] > 1 else ''}", f"batch {a['batch_size']}", f"lr {a['lr']}",
              f"weight decay {a['weight_decay']}", f"width {a['width']}"]
    defaults = (("T", "T", PAPER_T), ("ode_steps", "adjoint training steps", PAPER_ODE_STEPS),
                ("inference_steps", "inference steps", PAPER_INFERENCE_STEPS))
    for name, label, default in defaults:
        users = [m for m in a["methods"] if m in APPLIES_TO[name]]
        if users:
            budget.append(f"{label} {a[name] or default} ({', '.join(users)})")
    fallback = f" (the offline fallback: {data['requested']!r} could not be loaded)" if data["name"] != data["requested"] else ""
    commit = env["commit"] or "unknown"
    if env.get("uncommitted"):
        commit += f" with {len(env['uncommitted'])} uncommitted library file(s)"
    kind = content["cells"][0]["peak_memory_kind"] if content["cells"] else ""
    lines = [
        f"# NoProp comparison on {data['name']}",
        "",
        f"{data['train_examples']} training and {data['test_examples']} test images{fallback}; {runs} runs: "
        f"{a['seeds']} training seeds x {a['inference_runs']} inference runs per method and embedding. "
        f"Budget: {', '.join(budget)}.",
        f"Device: {env['device']} ({env['device_name']}, {env['torch_threads']} CPU threads), torch {env['torch']}, "
        f"python {env['python']}, commit {commit}, {content['date_utc']}.",
        "",
        "| method | embedding | train accuracy (%) | test accuracy (%) | seconds / epoch | peak memory (MB) | parameters |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for cell in content["cells"]:
        lines.append(
            f"| {DISPLAY[cell['method']]} | {cell['embedding']} | {_percent(cell['train_accuracy'])} | {_percent(cell['test_accuracy'])} "
            f"| {cell['seconds_per_epoch']['mean']:.1f} | {cell['peak_memory_mb']['mean']:.0f} | {cell['parameters']:,} |"
        )
    lines += [
        "",
        f"Accuracy: mean ± standard error over the N = {a['seeds']} x {a['inference_runs']} accuracies of a row (training seeds x "
        "inference runs with fresh inference noise, pooled): mean = Σ a_i / N, s.e. = s / √N with "
        "s = √(Σ (a_i − mean)² / (N − 1)). Train accuracy is on the first "
        f"{data['test_examples']} training images (the subset the trainer evaluates). Seconds per epoch: training only, "
        f"mean over epochs and seeds. Peak memory: {kind}, mean over seeds"
        + (" (on a CPU the whole process's peak so far, so a later run includes earlier runs' peaks)." if kind == "process max RSS" else "."),
        "",
    ]
    return "\n".join(lines)


def figure(content: dict, path: pathlib.Path) -> None:
    """Seven panels: learning curves, final accuracy, training time, model size, accuracy per parameter,
    speed vs accuracy (error bars: s.e.), and peak memory."""
    summaries = content["cells"]
    labels = [f"{DISPLAY[c['method']]}\n{c['embedding']}" for c in summaries]
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(summaries))]
    positions = range(len(summaries))
    fig, axes = plt.subplots(2, 4, figsize=(20, 9))
    curves, final, time_axis, size, per_parameter, speed, memory, unused = axes.flat
    for cell, label, color in zip(summaries, labels, colors):
        curve = cell["test_accuracy_per_epoch"]
        curves.plot(range(1, len(curve) + 1), [100 * v for v in curve], marker="o", color=color, label=label.replace("\n", " "))
    curves.set(title="Learning curves (test, mean over seeds)", xlabel="epoch", ylabel="test accuracy (%)")
    curves.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    curves.set_xlim(0.5, max((len(c["test_accuracy_per_epoch"]) for c in summaries), default=1) + 0.5)
    curves.legend(fontsize=7)

    def bars(axis, values, errors, title, ylabel):
        axis.bar(positions, values, yerr=errors, color=colors, capsize=4)
        axis.set_xticks(list(positions), labels, fontsize=7)
        axis.set(title=title, ylabel=ylabel)

    def se(summary, scale=1.0):
        return 0.0 if summary["se"] is None else scale * summary["se"]

    bars(final, [100 * c["test_accuracy"]["mean"] for c in summaries], [se(c["test_accuracy"], 100) for c in summaries],
         "Final test accuracy (± s.e.)", "test accuracy (%)")
    bars(time_axis, [c["seconds_per_epoch"]["mean"] for c in summaries], [se(c["seconds_per_epoch"]) for c in summaries],
         "Training time", "seconds per epoch")
    bars(size, [c["parameters"] / 1e6 for c in summaries], None, "Model size", "parameters (millions)")
    bars(per_parameter, [100 * c["test_accuracy_per_million_parameters"] for c in summaries], None,
         "Accuracy per parameter", "test accuracy (%) per million parameters")
    bars(memory, [c["peak_memory_mb"]["mean"] for c in summaries], [se(c["peak_memory_mb"]) for c in summaries],
         f"Peak memory ({summaries[0]['peak_memory_kind'] if summaries else ''})", "MB")
    for cell, label, color in zip(summaries, labels, colors):
        speed.errorbar(cell["seconds_per_epoch"]["mean"], 100 * cell["test_accuracy"]["mean"], yerr=se(cell["test_accuracy"], 100),
                       xerr=se(cell["seconds_per_epoch"]), fmt="o", color=color, capsize=4, label=label.replace("\n", " "))
    speed.set(title="Speed vs accuracy", xlabel="seconds per epoch", ylabel="test accuracy (%)")
    unused.axis("off")
    for axis in (curves, final, time_axis, size, per_parameter, speed, memory):
        axis.grid(alpha=0.3)
    fig.suptitle(f"NoProp comparison on {content['dataset']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
