"""``make gpu-check``: one prepared command that checks and measures a checkout on a fresh GPU machine.

Usage (from the checkout's root, with the machine's own Python, torch and triton; no network)::

    python -m bench.gpu_check [--out DIR] [--deadline SECONDS] [--test-workers N] [--dry-run]

Phases, in order, each a process of its own with its own timeout (:func:`plan`):

=============  ===============================================================================
environment    ``nvidia-smi``, ``nvidia-smi -q``, ``pip freeze``, the git commit and status
install        ``pip install --no-build-isolation --no-deps --no-index -e .``: builds the C++/CUDA
               extension for this GPU's architecture only, and fails if it cannot
info           ``noprop info``: which backends run here
tests          the whole test suite, GPU tests included (``pytest``, JUnit XML; in parallel
               processes with pytest-xdist where installed)
ops            the op microbenchmarks, ``python -m bench.ops --device cuda``
e2e            the end-to-end benchmark, ``noprop bench``: every training case but the compiled
               loop (the paper's T=10, B=128, full width; 20 timed steps) and DT/CT/FM inference
sampling       CT/FM sampling with 1000 steps, eager and captured in one CUDA graph (``bench.sampling``)
e2e-compiled   ``noprop bench`` of the compiled reference loop (``torch.compile`` takes minutes), last
=============  ===============================================================================

A phase that fails or times out does not stop the next one; the command exits 1 if any phase
did not pass (the environment records excepted: a copy of the checkout without ``.git`` fails
nothing). The phases share a deadline (default :data:`DEADLINE_S` seconds from the start, the
device budget of a session): a phase's timeout is cut to the time left, and a phase with less than
:data:`MIN_PHASE_S` seconds left is skipped (and counts as failed).

Every file goes into one folder, ``bench/results/gpu-check-<gpu>-<date>/`` unless ``--out``: a log
per phase (``<phase>.log``, the command's output), ``junit.xml``, the benchmarks' JSON and PNG
files, ``nvidia-smi.txt``, ``nvidia-smi-q.txt``, ``pip-freeze.txt``, ``git.txt``, and
``summary.json`` / ``summary.md`` (each phase's command, timeout, seconds and exit status). When
the environment variable ``OUT`` is set (the device tool brings back what is written under it, a
few files at most), the folder is also packed into ``$OUT/<folder>.tar.gz`` beside a copy of its
summary, ``$OUT/<folder>-summary.json``.

On a machine without a CUDA device (or with ``--dry-run``) it prints the plan (every command, its
timeout, the output folder) and exits 0, without installing or running anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field

REPO = pathlib.Path(__file__).resolve().parents[1]
DEADLINE_S = 480  # all phases together: the 8 minutes on an H100/H200
MIN_PHASE_S = 10  # a phase with less time left than this is skipped
TEST_WORKERS = 8  # pytest-xdist processes (the H200 machine has 16 cores)
E2E_CASES = ("paper_loop", "seed_style", "stack_eager", "fused", "fused_chunk1")
E2E_STEPS = 20  # timed steps per training case (noprop bench's default on a GPU: 50)


@dataclass
class Phase:
    """One step of the check: a command, its timeout, extra environment, and the file its output goes to."""

    name: str
    command: list[str]
    timeout_s: int
    log: str
    env: dict[str, str] = field(default_factory=dict)
    what: str = ""
    required: bool = True  # False: a record of the machine, whose failure fails nothing


@dataclass
class Outcome:
    """What a phase did: exit status (None if it never ran), seconds, timed out, skipped."""

    name: str
    command: str
    timeout_s: float
    returncode: int | None
    seconds: float
    timed_out: bool = False
    skipped: str = ""
    required: bool = True

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.skipped


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def cuda_device() -> tuple[str, str] | None:
    """``(name, compute capability "9.0")`` of CUDA device 0, or None when there is none (or no torch)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), f"{major}.{minor}"


def default_folder(gpu_name: str | None, now: datetime.datetime) -> pathlib.Path:
    """``bench/results/gpu-check-<gpu tag>-<YYYYMMDD-HHMM>`` (UTC); the tag is ``bench.environment``'s (``h200``)."""
    tag = "<gpu>"
    if gpu_name is not None:
        import torch

        from bench.environment import device_tag

        tag = device_tag(torch.device("cuda"), gpu_name)
    return REPO / "bench" / "results" / f"gpu-check-{tag}-{now:%Y%m%d-%H%M}"


def plan(folder: pathlib.Path, arch: str, test_workers: int, python: str = sys.executable) -> list[Phase]:
    """The phases, in order (see the module docstring); ``arch`` is the GPU's compute capability for the build."""
    xdist = test_workers > 0 and _has_module("xdist")
    test_command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={folder / 'junit.xml'}"]
    test_env = {}
    if xdist:
        test_command += ["-n", str(test_workers), "--dist", "loadfile"]
        test_env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or test_workers) // test_workers))
    if _has_module("pytest_timeout"):
        test_command += ["--timeout", "240"]
    install = [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    build_env = {
        "NOPROP_REQUIRE_EXTENSION": "1", "TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 4),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    bench = [python, "-m", "noprop.cli", "bench", "--device", "cuda", "--steps", str(E2E_STEPS)]
    git = ["git", "-C", str(REPO)]
    record = dict(required=False)
    return [
        Phase("nvidia-smi", ["nvidia-smi"], 20, "nvidia-smi.txt", what="the GPU, driver, clocks, memory", **record),
        Phase("nvidia-smi-q", ["nvidia-smi", "-q"], 20, "nvidia-smi-q.txt", what="every GPU property", **record),
        Phase("pip-freeze", [python, "-m", "pip", "freeze"], 60, "pip-freeze.txt", what="Python packages", **record),
        Phase("git", [*git, "log", "-1", "--format=commit %H%n%cd%n%s"], 20, "git.txt", what="the commit", **record),
        Phase("git-status", [*git, "status", "--short"], 20, "git-status.txt", what="uncommitted files", **record),
        Phase("install", install, 240, "install.log", build_env, what="the package and its extension, for this GPU"),
        Phase("info", [python, "-m", "noprop.cli", "info"], 60, "info.log", what="backends that run here"),
        Phase("tests", test_command, 270, "tests.log", test_env, what="the whole test suite, GPU tests included"),
        Phase(
            "ops", [python, "-m", "bench.ops", "--device", "cuda", "--out", str(folder)], 150, "ops.log",
            what="op microbenchmarks: ops-<gpu>.json and .png",
        ),
        Phase(
            "e2e", [*bench, "--cases", *E2E_CASES, "--out", str(folder / "e2e")], 150, "e2e.log",
            what="end-to-end training and inference: e2e/train-<gpu>.json and .png",
        ),
        Phase(
            "sampling", [python, "-m", "bench.sampling", "--device", "cuda", "--out", str(folder)], 90, "sampling.log",
            what="CT/FM sampling, eager vs one CUDA graph: sampling-<gpu>.json",
        ),
        Phase(
            "e2e-compiled", [*bench, "--cases", "seed_style", "compiled_loop", "--out", str(folder / "e2e-compiled")],
            180, "e2e-compiled.log", what="the torch.compile-d reference loop: e2e-compiled/train-<gpu>.json",
        ),
    ]


def print_plan(phases: list[Phase], folder: pathlib.Path, deadline_s: int, why: str) -> None:
    """The dry run: what would run, with which timeout, and where the files would go."""
    print(f"gpu-check: {why}: nothing is installed or run. The plan:")
    print(f"  output folder: {folder}/")
    print(f"  with $OUT set, also: $OUT/{folder.name}.tar.gz and $OUT/{folder.name}-summary.json")
    print(f"  deadline: {deadline_s} s for all phases; a phase's timeout is cut to the time left")
    for number, phase in enumerate(phases, 1):
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in phase.env.items())
        record = "" if phase.required else "; a record: its failure fails nothing"
        print(f"  {number:2d}. {phase.name} (timeout {phase.timeout_s} s): {phase.what}{record}")
        print(f"      {env + ' ' if env else ''}{shlex.join(phase.command)} > {folder / phase.log}")


def run_phase(phase: Phase, folder: pathlib.Path, time_left: float) -> Outcome:
    """Run one phase with ``min(its timeout, time_left)``, its output (stdout and stderr) to ``folder / phase.log``."""
    command = shlex.join(phase.command)
    timeout = round(min(phase.timeout_s, time_left), 1)
    if timeout < MIN_PHASE_S:
        why = f"only {time_left:.0f} s left before the deadline"
        return Outcome(phase.name, command, timeout, None, 0.0, skipped=why, required=phase.required)
    print(f"gpu-check: {phase.name} (timeout {timeout:.0f} s): {command}", flush=True)
    begin = time.perf_counter()
    with open(folder / phase.log, "wb") as log:
        try:
            process = subprocess.Popen(
                phase.command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **phase.env},
                start_new_session=True,  # so a timeout can stop the whole process group (pytest-xdist workers, nvcc)
            )
        except OSError as error:
            log.write(f"gpu-check: could not start the command: {error}\n".encode())
            return Outcome(phase.name, command, timeout, 127, time.perf_counter() - begin, required=phase.required)
        try:
            returncode = process.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            returncode, timed_out = process.wait(), True
            log.write(f"\ngpu-check: stopped after its timeout of {timeout:.0f} s\n".encode())
    seconds = time.perf_counter() - begin
    outcome = Outcome(phase.name, command, timeout, returncode, seconds, timed_out, required=phase.required)
    verdict = "passed" if outcome.passed else "FAILED" if phase.required else "failed (a record only)"
    print(f"gpu-check: {phase.name}: {verdict} in {outcome.seconds:.0f} s", flush=True)
    return outcome


def write_summary(
    folder: pathlib.Path, gpu: tuple[str, str], outcomes: list[Outcome], started: str, seconds: float
) -> dict:
    """``summary.json`` and ``summary.md`` in ``folder``: the machine, every phase's outcome, the total."""
    summary = {
        "gpu": gpu[0], "compute_capability": gpu[1], "started_utc": started, "seconds": round(seconds, 1),
        "passed": all(o.passed for o in outcomes if o.required),
        "phases": [{**dataclasses.asdict(o), "seconds": round(o.seconds, 1), "passed": o.passed} for o in outcomes],
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# gpu-check on {gpu[0]} (sm_{gpu[1].replace('.', '')}), {started}", "",
             "| phase | status | seconds | timeout s |", "|---|---|---:|---:|"]
    for o in outcomes:
        status = "passed" if o.passed else "timed out" if o.timed_out else f"failed ({o.returncode})"
        status = f"skipped: {o.skipped}" if o.skipped else status if o.required else f"{status}, a record only"
        lines.append(f"| {o.name} | {status} | {o.seconds:.0f} | {o.timeout_s:.0f} |")
    lines += ["", f"total {seconds:.0f} s; {'all phases passed' if summary['passed'] else 'SOME PHASES FAILED'}"]
    (folder / "summary.md").write_text("\n".join(lines) + "\n")
    return summary


def pack(folder: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """``out/<folder name>.tar.gz`` of the folder and ``out/<folder name>-summary.json`` beside it."""
    out.mkdir(parents=True, exist_ok=True)
    archive = out / f"{folder.name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    (out / f"{folder.name}-summary.json").write_bytes((folder / "summary.json").read_bytes())
    return archive


def main(argv: list[str] | None = None) -> int:
    """Run the check (or print its plan without a GPU); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="results folder (default: bench/results/gpu-check-<gpu>-<date>)")
    parser.add_argument("--deadline", type=int, default=DEADLINE_S, help="seconds for all phases (%(default)s)")
    parser.add_argument("--test-workers", type=int, default=TEST_WORKERS, help="pytest-xdist processes; 0: one process")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit, even with a GPU")
    args = parser.parse_args(argv)
    now = datetime.datetime.now(datetime.timezone.utc)
    gpu = None if args.dry_run else cuda_device()
    folder = pathlib.Path(args.out).resolve() if args.out else default_folder(gpu[0] if gpu else None, now)
    phases = plan(folder, gpu[1] if gpu else "<this GPU's compute capability, e.g. 9.0>", args.test_workers)
    if gpu is None:
        print_plan(phases, folder, args.deadline, "--dry-run" if args.dry_run else "no CUDA device here")
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    print(f"gpu-check: {gpu[0]} (compute capability {gpu[1]}); results in {folder}", flush=True)
    begin = time.perf_counter()
    outcomes = [run_phase(phase, folder, args.deadline - (time.perf_counter() - begin)) for phase in phases]
    summary = write_summary(folder, gpu, outcomes, now.isoformat(timespec="seconds"), time.perf_counter() - begin)
    print((folder / "summary.md").read_text())
    if os.environ.get("OUT"):
        print(f"gpu-check: packed into {pack(folder, pathlib.Path(os.environ['OUT']))}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
