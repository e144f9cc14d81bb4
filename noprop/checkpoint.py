"""Checkpoints: written atomically, holding everything a run needs to continue exactly.

A checkpoint is a ``torch.save`` dict with the run's config, the model config and weights, the
optimizer state, the schedule, the epoch, the metrics so far, the dataset description and every
RNG state (torch CPU and CUDA, Python, NumPy, the data shuffler). It is first written to a
temporary file in the same folder, flushed to disk, then renamed over the target, so a crash
never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import os
import pathlib
import random
import tempfile

import numpy as np
import torch

FORMAT_VERSION = 1


def save_atomic(payload: dict, path: str | os.PathLike) -> None:
    """``torch.save(payload)`` to a temporary file beside ``path``, fsync it, then rename it to ``path``."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise


def load(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save_atomic` (onto the CPU).

    Raises:
        ValueError: the file does not exist or is not a noprop checkpoint of a known format.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint: {path} does not exist")
    # Checkpoints hold RNG states (Python tuples), so they are not weights-only; load only files you trust.
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint: {path} is not a noprop checkpoint (format {FORMAT_VERSION})")
    return payload


def capture_rng(loader_generator: torch.Generator) -> dict:
    """Every RNG state a run draws from."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "loader": loader_generator.get_state(),
    }


def restore_rng(state: dict, loader_generator: torch.Generator) -> None:
    """Undo :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    loader_generator.set_state(state["loader"])
