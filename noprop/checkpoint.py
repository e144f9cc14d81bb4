"""Checkpoints: safe to load, verified on load, written atomically, holding everything a run needs.

A checkpoint holds the run's config, the model config and weights, the optimizer state, the
schedule, the epoch, the metrics so far, the dataset description (with the normalisation
statistics and fingerprints of the data) and every RNG state (torch CPU and CUDA, Python, NumPy,
the data shuffler).

Safety and integrity:

* **Only plain data.** The payload is tensors, numbers, strings, booleans, None, lists, tuples and
  dicts, nothing else (the RNG states of Python and NumPy are converted to lists and tensors), and
  every read uses ``torch.load(weights_only=True)``: loading a file never runs code from it.
* **An integrity hash.** The file is a ``torch.save`` dict ``{"format": "noprop-checkpoint",
  "version": 2, "sha256": ..., "payload": uint8 tensor}``: the payload is the ``torch.save`` bytes
  of the checkpoint dict and ``sha256`` their SHA-256, checked before the payload is read.
* **Finite values.** Every floating tensor must be finite, checked when writing and when loading.
* **One error.** Anything that is not a valid noprop checkpoint raises one ``ValueError`` that
  starts with ``checkpoint: PATH``.
* **Atomic writes.** The file is written to ``.NAME.<random>.tmp`` beside the target, flushed to
  disk, then renamed over the target, so a crash or a signal never leaves a half-written
  checkpoint; temporary files left by an earlier interrupted writer are removed.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import random
import tempfile

import numpy as np
import torch

MAGIC = "noprop-checkpoint"
FORMAT_VERSION = 2
REQUIRED = {  # key: type of the value, for a checkpoint of a training run
    "config": dict,
    "method": str,
    "model_config": dict,
    "model": dict,
    "optimizer": dict,
    "epoch": int,
    "history": list,
    "dataset": dict,
    "rng": dict,
}
_PLAIN = (str, int, float, bool, type(None))


def _describe(error: BaseException) -> str:
    """One line about ``error``; for torch's weights-only refusal only the refused content (its advice
    to load with ``weights_only=False`` is exactly what a noprop checkpoint must never need)."""
    raw = str(error)
    if raw.startswith("Weights only load failed"):  # torch's refusal: advice paragraph, the reason, a link
        paragraphs = [p for p in raw.split("\n\n")[1:] if p.strip() and not p.strip().startswith("Check the documentation")]
        reason = " ".join(" ".join(paragraphs).split()).split("WeightsUnpickler error:")[-1].strip()
        raw = f"it holds content other than tensors and plain data ({reason or 'unreadable'}); nothing in it was run"
    text = " ".join(raw.split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _check_plain(value: object, where: str) -> None:
    """Raise ``TypeError`` naming the entry unless ``value`` is made of types ``weights_only`` loads."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, torch.Tensor):
        if type(value) not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(f"{where}: a tensor subclass ({type(value).__name__}) cannot be stored in a checkpoint")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: dict key {key!r} is not a string or an int")
            _check_plain(item, f"{where}.{key}")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    raise TypeError(f"{where}: a {type(value).__name__} cannot be stored in a checkpoint (plain data and tensors only)")


def _first_nonfinite(value: object, where: str) -> str | None:
    """The name of the first floating tensor in ``value`` holding NaN or Inf, else None."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return where
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = _first_nonfinite(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def stale_temporaries(path: str | os.PathLike) -> list[pathlib.Path]:
    """Temporary files that :func:`save_atomic` writers of ``path`` left behind (``.NAME.*.tmp``)."""
    path = pathlib.Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Delete :func:`stale_temporaries` of ``path`` (one writer per checkpoint is assumed)."""
    for temporary in stale_temporaries(path):
        temporary.unlink(missing_ok=True)


def save_atomic(payload: dict, path: str | os.PathLike, *, check_finite: bool = True) -> None:
    """Write ``payload`` to ``path`` in the checkpoint format (see the module docstring), atomically.

    Args:
        payload: a dict of plain data and tensors.
        path: the checkpoint file; its folder is created if needed.
        check_finite: refuse a payload with a NaN or Inf in a floating tensor (tests turn it off
            to write damaged files).

    Raises:
        TypeError: the payload holds something other than plain data and tensors (named).
        ValueError: a floating tensor holds NaN or Inf (named).
    """
    path = pathlib.Path(path)
    if not isinstance(payload, dict):
        raise TypeError(f"payload: expected a dict, got {type(payload).__name__}")
    _check_plain(payload, "payload")
    if check_finite:
        bad = _first_nonfinite(payload, "")
        if bad:
            raise ValueError(f"checkpoint: not writing {path}: tensor {bad} holds NaN or Inf values")
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = bytearray(buffer.getbuffer())
    del buffer
    wrapper = {
        "format": MAGIC,
        "version": FORMAT_VERSION,
        "sha256": hashlib.sha256(data).hexdigest(),
        "payload": torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(wrapper, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    remove_stale_temporaries(path)


def _fsync_directory(folder: pathlib.Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def load(path: str | os.PathLike) -> dict:
    """Read and verify a checkpoint (onto the CPU): a file written by :func:`save_atomic`, or the
    folder of a parallel run's sharded checkpoint (:func:`noprop.distributed.checkpoint.load`, which
    returns the same dict: the whole model's state dict, the optimizer's, and the run's records).

    Verified: the file loads with ``torch.load(weights_only=True)``, has the noprop format and
    version, its payload matches the SHA-256 written with it, the payload holds the keys of a
    training run (:data:`REQUIRED`), and every floating tensor is finite.

    Raises:
        ValueError: ``checkpoint: PATH ...`` saying what is wrong, for anything else.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        from noprop.distributed.checkpoint import MANIFEST, load as load_sharded

        if not (path / MANIFEST).is_file():
            raise ValueError(f"checkpoint: {path} is a folder without a sharded checkpoint's {MANIFEST}")
        return load_sharded(path)
    return read(path, REQUIRED)


def read(path: str | os.PathLike, required: dict[str, type]) -> dict:
    """:func:`load` of one file written by :func:`save_atomic`, whose payload must hold the keys of ``required`` (key: type)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint: {path} does not exist")
    if not path.is_file():
        raise ValueError(f"checkpoint: {path} is not a file")
    try:
        wrapper = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a foreign pickle, a damaged zip, an empty file, ...
        raise ValueError(f"checkpoint: {path} is not a noprop checkpoint ({_describe(error)})") from None
    if not isinstance(wrapper, dict) or wrapper.get("format") != MAGIC:
        raise ValueError(f"checkpoint: {path} is not a noprop checkpoint (no {MAGIC!r} format marker)")
    if wrapper.get("version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint: {path} has format version {wrapper.get('version')!r}; this noprop reads version {FORMAT_VERSION}")
    data, digest = wrapper.get("payload"), wrapper.get("sha256")
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1 or not isinstance(digest, str):
        raise ValueError(f"checkpoint: {path} is damaged (its payload or hash is missing)")
    raw = data.contiguous().numpy().tobytes()
    if hashlib.sha256(raw).hexdigest() != digest:
        raise ValueError(f"checkpoint: {path} is damaged: its contents do not match the SHA-256 written with them")
    try:
        payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"checkpoint: {path} is damaged (its payload does not load: {_describe(error)})") from None
    if not isinstance(payload, dict):
        raise ValueError(f"checkpoint: {path} holds a {type(payload).__name__}, not a checkpoint dict")
    for key, kind in required.items():
        if not isinstance(payload.get(key), kind) or (kind is int and isinstance(payload.get(key), bool)):
            raise ValueError(f"checkpoint: {path} is not a noprop training checkpoint ({key!r}: expected a {kind.__name__})")
    if "model" in required and not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload["model"].items()):
        raise ValueError(f"checkpoint: {path}: 'model' is not a state dict of named tensors")
    check_finite(payload, path)
    return payload


def check_finite(payload: dict, path: str | os.PathLike) -> None:
    """Raise ``ValueError('checkpoint: PATH: tensor NAME holds NaN or Inf values ...')`` for the first non-finite floating tensor."""
    bad = _first_nonfinite(payload, "")
    if bad:
        raise ValueError(f"checkpoint: {path}: tensor {bad} holds NaN or Inf values; refusing to load it")


def capture_rng(loader_generator: torch.Generator) -> dict:
    """Every RNG state a run draws from, as plain data and tensors (see :func:`restore_rng`)."""
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "loader": loader_generator.get_state(),
    }


def restore_rng(state: dict, loader_generator: torch.Generator) -> None:
    """Undo :func:`capture_rng`.

    Raises:
        ValueError: ``rng: ...`` when a state is malformed.
    """
    try:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        python = state["python"]
        random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
        numpy = state["numpy"]
        keys = numpy["keys"].numpy().astype(np.uint32)
        np.random.set_state((numpy["kind"], keys, numpy["position"], numpy["has_gauss"], numpy["cached"]))
        loader_generator.set_state(state["loader"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:
        raise ValueError(f"rng: the checkpoint's RNG states cannot be restored ({_describe(error)})") from None
