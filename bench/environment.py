"""Where a benchmark ran: the device's name and file tag, software versions, the code's commit, the date."""

from __future__ import annotations

import datetime
import pathlib
import platform
import re
import subprocess

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_tag(device: torch.device, name: str) -> str:
    """Short file-name tag: ``cpu`` for any CPU; for a GPU the model, e.g. ``h100`` from "NVIDIA H100 80GB HBM3"."""
    if device.type != "cuda":
        return "cpu"
    tokens = [t for t in re.split(r"[\s_]+", name.lower()) if t not in ("nvidia", "geforce", "tesla", "amd", "radeon")]
    tag = []
    for token in tokens:
        tag.append(token)
        if re.search(r"\d", token):
            break
    return re.sub(r"[^a-z0-9-]", "", "".join(tag)) or "gpu"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.rstrip() if out.returncode == 0 else None


def versions() -> dict:
    """torch, triton, CUDA, python versions and the noprop commit, with the library sources that differ from it.

    ``checkout`` says where the code ran from: the git checkout's path, or that ``REPO`` is not a
    git checkout (then ``noprop_commit`` is None).
    """
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    status = _git("status", "--porcelain", "--", "noprop", "kernels", "csrc", "setup.py")
    commit = _git("rev-parse", "HEAD")
    return dict(
        checkout=str(REPO) if commit else f"not a git checkout: {REPO} (no commit recorded)",
        torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda, python=platform.python_version(),
        noprop_commit=commit,
        noprop_uncommitted=None if status is None else [line[3:] for line in status.splitlines()],
    )


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
