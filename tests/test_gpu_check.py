"""``make gpu-check`` (bench/gpu_check.py): the plan it prints without a GPU, and its phase runner.

Without a CUDA device the command must print every phase (install, tests, op benchmark,
end-to-end benchmark, ...) with its command and timeout and the output folder, and exit 0 within
a minute having run nothing. The runner itself (timeouts, the deadline, logs, the summary, the
archive for ``$OUT``) is exercised on the CPU with stand-in commands.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from bench import gpu_check
from conftest import REPO

PHASES = ("install", "info", "tests", "ops", "e2e", "sampling")


def _check_plan(output: str, folder) -> None:
    assert f"output folder: {folder}/" in output
    for name in PHASES:
        assert f". {name} (timeout " in output, name
    assert "pip install --no-build-isolation --no-deps" in output and "TORCH_CUDA_ARCH_LIST=" in output
    assert "-m pytest -q" in output and f"--junitxml={folder}/junit.xml" in output
    assert f"-m bench.ops --device cuda --out {folder}" in output
    assert f"-m noprop.cli bench --device cuda --steps {gpu_check.E2E_STEPS}" in output
    assert not folder.exists()  # nothing was run, nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a CUDA device the command runs the whole check")
def test_without_a_gpu_it_prints_the_plan_and_exits_0(tmp_path):
    folder = tmp_path / "results"
    begin = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--out", str(folder)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert time.perf_counter() - begin < 60
    assert "no CUDA device here: nothing is installed or run" in done.stdout
    _check_plan(done.stdout, folder)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_the_make_target_runs_it(tmp_path):
    folder = tmp_path / "results"
    done = subprocess.run(
        ["make", "--no-print-directory", "gpu-check", f"GPU_PYTHON={sys.executable}", f"GPU_CHECK_ARGS=--dry-run --out {folder}"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    _check_plan(done.stdout, folder)


def test_phases_time_out_fail_and_meet_the_deadline(tmp_path, monkeypatch):
    """A real run with stand-in commands: logs, a failure that does not stop the next phase, a
    record whose failure fails nothing, a hanging phase stopped when the deadline cuts its
    timeout, and the phase after it skipped."""
    python = sys.executable
    phases = [
        gpu_check.Phase("ok", [python, "-c", "print('hello')"], 30, "ok.log"),
        gpu_check.Phase("record", ["no-such-command-here"], 30, "record.log", required=False),
        gpu_check.Phase("fails", [python, "-c", "import sys; sys.exit(3)"], 30, "fails.log"),
        gpu_check.Phase("hangs", [python, "-c", "import time; time.sleep(60)"], 30, "hangs.log"),
        gpu_check.Phase("late", [python, "-c", "print('never')"], 30, "late.log"),
    ]
    monkeypatch.setattr(gpu_check, "MIN_PHASE_S", 1)
    monkeypatch.setattr(gpu_check, "plan", lambda folder, arch, workers, python=python: phases)
    monkeypatch.setattr(gpu_check, "cuda_device", lambda: ("NVIDIA Stand-in 80GB", "9.0"))
    out = tmp_path / "device-out"
    monkeypatch.setenv("OUT", str(out))
    folder = tmp_path / "results"
    begin = time.perf_counter()
    assert gpu_check.main(["--out", str(folder), "--deadline", "5"]) == 1  # 'fails', 'hangs' and 'late' did not pass
    assert time.perf_counter() - begin < 15  # the hanging phase was stopped at the deadline, not after 60 s
    assert (folder / "ok.log").read_text().strip() == "hello"
    assert "gpu-check: stopped after its timeout" in (folder / "hangs.log").read_text()
    summary = json.loads((folder / "summary.json").read_text())
    result = {p["name"]: p for p in summary["phases"]}
    assert [result[n]["passed"] for n in ("ok", "record", "fails", "hangs", "late")] == [True, False, False, False, False]
    assert result["record"]["returncode"] == 127 and result["fails"]["returncode"] == 3
    assert result["hangs"]["timed_out"] and result["hangs"]["timeout_s"] < 5  # cut from 30 s to the time left
    assert result["late"]["skipped"].endswith("left before the deadline") and result["late"]["returncode"] is None
    assert summary["gpu"] == "NVIDIA Stand-in 80GB" and not summary["passed"]
    assert "SOME PHASES FAILED" in (folder / "summary.md").read_text()
    with tarfile.open(out / "results.tar.gz") as tar:
        assert {"results/ok.log", "results/summary.json", "results/summary.md"} <= set(tar.getnames())
    assert json.loads((out / "results-summary.json").read_text()) == summary


def test_a_run_whose_required_phases_pass_exits_0(tmp_path, monkeypatch):
    phases = [
        gpu_check.Phase("ok", [sys.executable, "-c", "pass"], 30, "ok.log"),
        gpu_check.Phase("record", [sys.executable, "-c", "import sys; sys.exit(1)"], 30, "record.log", required=False),
    ]
    monkeypatch.setattr(gpu_check, "plan", lambda folder, arch, workers, python=None: phases)
    monkeypatch.setattr(gpu_check, "cuda_device", lambda: ("NVIDIA H200", "9.0"))
    monkeypatch.delenv("OUT", raising=False)
    assert gpu_check.main(["--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["passed"]


def test_default_folder_names_the_gpu_and_the_date():
    import datetime

    now = datetime.datetime(2026, 12, 1, 15, 30, tzinfo=datetime.timezone.utc)
    folder = gpu_check.default_folder("NVIDIA H200", now)
    assert folder == REPO / "bench" / "results" / "gpu-check-h200-20261201-1530"
    assert os.path.basename(gpu_check.default_folder(None, now)) == "gpu-check-<gpu>-20261201-1530"
