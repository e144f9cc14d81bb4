"""Sharded checkpoints of parallel runs with ``torch.distributed.checkpoint`` (DCP), loadable at any world size.

A parallel run writes ``OUT/checkpoint.dcp/``, a folder holding:

* DCP's files (``.metadata`` and one ``__<rank>_0.distcp`` per writing rank): the model's tensors
  and the optimizer's state as flat entries (:mod:`noprop.distributed.block_state`): ``model/<name>``
  for a shared tensor, ``model/<name>/block<t>`` for block t's slice, ``optim/<parameter>/<state>``
  likewise. In blocks mode each rank writes its own blocks (and the shared tensors, which DCP
  writes once); in data mode every rank holds everything and DCP spreads the writing over the ranks.
* ``run.pt``, written last by rank 0 with :func:`noprop.checkpoint.save_atomic`: everything else a
  run needs (config, epoch, metrics, dataset, RNG states, the optimizer's parameter groups) and the
  SHA-256 of every DCP file.

The entries do not depend on how the blocks were split, so :func:`load` (one process, no process
group) rebuilds the whole model and optimizer state from a checkpoint written by any number of
ranks, as a dict shaped like :func:`noprop.checkpoint.load`'s; :func:`noprop.checkpoint.load`
calls it for a folder, so ``noprop eval``, ``--resume`` and one-process runs read both kinds.

Safety, as for ``checkpoint.pt``: nothing in the folder runs code when read. DCP reads tensors
with ``torch.load(weights_only=True)``; its ``.metadata`` (a pickle) is read with an unpickler
that only builds DCP's metadata classes, torch dtypes and sizes; every file's SHA-256 is checked
against ``run.pt`` before any is read; the declared tensor sizes must fit in the files; every
floating tensor must be finite. A save goes to ``.checkpoint.dcp.tmp`` and replaces the previous
checkpoint by two renames once every rank has written its part.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import pickle
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata

from noprop import checkpoint as ckpt
from noprop.distributed import block_state

NAME = "checkpoint.dcp"
MANIFEST = "run.pt"
TEMPORARY = ".checkpoint.dcp.tmp"
PREVIOUS = ".checkpoint.dcp.old"
MANIFEST_REQUIRED = {key: kind for key, kind in ckpt.REQUIRED.items() if key not in ("model", "optimizer")} | {"sharded": dict}


# ------------------------------------------------------------------------------------------ entries


def _optimizer_named_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The optimizer's parameters by name (in its index order) and its state tensors keyed ``<parameter>/<state>``."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    parameters = dict(model.named_parameters())
    named = {}
    for name in order:
        for key, value in optimizer.state.get(parameters[name], {}).items():
            if not torch.is_tensor(value):
                raise TypeError(f"optimizer: state {key!r} of {name} is a {type(value).__name__}; sharded checkpoints hold tensors only")
            named[f"{name}/{key}"] = value
    return order, named


def _split_optimizer_state(named: dict[str, torch.Tensor], parameters: dict[str, torch.Tensor], T: int | None, blocks: range | None) -> dict:
    """Optimizer state entries: a state tensor shaped like its parameter is split into blocks like it; others are shared."""
    out = {}
    for key, value in named.items():
        parameter = parameters[key.rsplit("/", 1)[0]]
        if value.shape == parameter.shape and block_state.block_rows(key, value, T) is not None:
            out.update(block_state.split({key: value}, T, blocks))
        else:
            out[key] = value
    return out


def entries(model: torch.nn.Module, optimizer: torch.optim.Optimizer, T: int | None, blocks: range | None) -> dict[str, torch.Tensor]:
    """This rank's flat entries (copies): the shared tensors and the slices of ``blocks`` (None: all blocks)."""
    flat = {f"model/{k}": v for k, v in block_state.split(model.state_dict(), T, blocks).items()}
    _, named = _optimizer_named_state(model, optimizer)
    parameters = dict(model.named_parameters())
    flat.update({f"optim/{k}": v for k, v in _split_optimizer_state(named, parameters, T, blocks).items()})
    return {k: v.detach().clone() for k, v in flat.items()}


# ------------------------------------------------------------------------------------------ save


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save(
    folder: pathlib.Path,
    run: dict,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    T: int | None,
    blocks: range | None,
    *,
    rank: int,
    group=None,
) -> pathlib.Path:
    """Write ``folder/checkpoint.dcp`` (every rank calls this; see the module docstring).

    Args:
        folder: the run's output folder (shared by every rank).
        run: the checkpoint's other contents (:data:`MANIFEST_REQUIRED` but ``sharded``), used on rank 0.
        model, optimizer: this rank's.
        T: the model's number of blocks (None for CT and FM).
        blocks: the blocks this rank writes (None: all; in blocks mode its own).
        rank: this rank (rank 0 writes the manifest and renames).
        group: the process group (None: the default one).

    Returns:
        The checkpoint's path.
    """
    temporary, final, previous = folder / TEMPORARY, folder / NAME, folder / PREVIOUS
    if rank == 0:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    dist.barrier(group=group)
    dcp.save(entries(model, optimizer, T, blocks), storage_writer=dcp.FileSystemWriter(temporary), process_group=group)
    dist.barrier(group=group)
    if rank == 0:
        order, _ = _optimizer_named_state(model, optimizer)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]]
        sizes = [len(g["params"]) for g in optimizer.param_groups]
        files = {p.name: _sha256(p) for p in sorted(temporary.iterdir()) if p.is_file()}
        strides = {name: list(p.stride()) for name, p in model.named_parameters()}
        sharded = {"T": T, "files": files, "parameters": order, "param_groups": groups, "group_sizes": sizes, "strides": strides}
        ckpt.save_atomic({**run, "sharded": sharded}, temporary / MANIFEST)
        shutil.rmtree(previous, ignore_errors=True)
        if final.exists():
            os.rename(final, previous)
        os.rename(temporary, final)
        shutil.rmtree(previous, ignore_errors=True)
    dist.barrier(group=group)
    return final


def remove_stale(folder: pathlib.Path) -> None:
    """Delete what an interrupted :func:`save` left in ``folder``."""
    for name in (TEMPORARY, PREVIOUS):
        shutil.rmtree(folder / name, ignore_errors=True)


# ------------------------------------------------------------------------------------------ load


def _laid_out(value: torch.Tensor, parameter: torch.Tensor | None, stride: list[int] | None) -> torch.Tensor:
    """An optimizer state tensor shaped like its parameter, in the parameter's memory layout (``stride``).

    DCP loads contiguous tensors; a state tensor whose strides differ from its parameter's (a
    channels-last convolution's) makes ``torch.optim.AdamW(fused=True)`` on the CPU pair the wrong
    elements (PyTorch 2.14), so the saved layout is restored.
    """
    if parameter is None or stride is None or value.shape != parameter.shape or list(value.stride()) == stride:
        return value
    return torch.empty_strided(value.shape, stride, dtype=value.dtype).copy_(value)


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP's metadata classes, torch dtypes, sizes and layouts, and paths; refuses anything else."""

    def find_class(self, module: str, name: str):
        if module == "torch.distributed.checkpoint.metadata" and isinstance(getattr(dcp_metadata, name, None), type):
            return getattr(dcp_metadata, name)
        if (module, name) == ("torch.distributed.checkpoint.filesystem", "_StorageInfo"):
            from torch.distributed.checkpoint.filesystem import _StorageInfo

            return _StorageInfo
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout
        if module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
            import pathlib as paths

            return getattr(paths, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


class _SafeReader(dcp.FileSystemReader):
    """DCP's file reader with :class:`_MetadataUnpickler` for ``.metadata``."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        with open(pathlib.Path(self.path) / ".metadata", "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise pickle.UnpicklingError(f"its metadata is a {type(metadata).__name__}")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load(path: str | os.PathLike) -> dict:
    """Read a sharded checkpoint folder into the dict :func:`noprop.checkpoint.load` returns for a file.

    ``model`` is the whole model's state dict and ``optimizer`` the optimizer's ``state_dict()``
    (parameter indices in the order of :func:`noprop.train.build_optimizer`); ``sharded`` says
    how it was stored.

    Raises:
        ValueError: ``checkpoint: PATH ...`` naming what is wrong (a missing or altered file, a
            block no rank wrote, metadata that is not DCP's, non-finite values).
    """
    path = pathlib.Path(path)
    run = ckpt.read(path / MANIFEST, MANIFEST_REQUIRED)
    sharded = run["sharded"]
    files = sharded.get("files")
    if not isinstance(files, dict) or ".metadata" not in files:
        raise ValueError(f"checkpoint: {path}: its manifest lists no DCP files")
    for name, digest in files.items():
        file = path / name
        if pathlib.Path(name).name != name or not file.is_file():
            raise ValueError(f"checkpoint: {path}: file {name} is missing")
        if _sha256(file) != digest:
            raise ValueError(f"checkpoint: {path}: {name} is damaged: its contents do not match the SHA-256 in {MANIFEST}")
    reader = _SafeReader(path)
    try:
        metadata = reader.read_metadata()
    except Exception as error:
        raise ValueError(f"checkpoint: {path}: its .metadata is not DCP metadata ({' '.join(str(error).split())[:200]})") from None
    tensors = metadata.state_dict_metadata
    for index, info in metadata.storage_data.items():
        if info.relative_path not in files:
            raise ValueError(f"checkpoint: {path}: its metadata points outside the listed files ({info.relative_path})")
    declared = 0
    for key, info in tensors.items():
        if not isinstance(info, dcp_metadata.TensorStorageMetadata):
            raise ValueError(f"checkpoint: {path}: entry {key} is not a tensor")
        declared += info.size.numel() * torch.empty((), dtype=info.properties.dtype).element_size()
    if declared > sum((path / name).stat().st_size for name in files):
        raise ValueError(f"checkpoint: {path}: its metadata declares more tensor data than its files hold")
    flat = {key: torch.empty(info.size, dtype=info.properties.dtype) for key, info in tensors.items()}
    try:
        with warnings.catch_warnings():  # DCP warns that a load without a process group runs in one process: it does
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(flat, storage_reader=reader, no_dist=True)
    except Exception as error:
        raise ValueError(f"checkpoint: {path}: its tensors do not load ({' '.join(str(error).split())[:200]})") from None
    where = f"checkpoint: {path}"
    T = sharded.get("T")
    model = block_state.join({k.removeprefix("model/"): v for k, v in flat.items() if k.startswith("model/")}, T, where)
    optim = block_state.join({k.removeprefix("optim/"): v for k, v in flat.items() if k.startswith("optim/")}, T, where)
    order = list(sharded["parameters"])
    state = {}
    for index, name in enumerate(order):
        entry = {key.rsplit("/", 1)[1]: _laid_out(value, model.get(name), sharded["strides"].get(name)) for key, value in optim.items() if key.rsplit("/", 1)[0] == name}
        if entry:
            state[index] = entry
    groups, start = [], 0
    for group, size in zip(sharded["param_groups"], sharded["group_sizes"]):
        groups.append({**group, "params": list(range(start, start + size))})
        start += size
    payload = {**{k: v for k, v in run.items() if k != "sharded"}, "model": model, "optimizer": {"state": state, "param_groups": groups}, "sharded": sharded}
    ckpt.check_finite(payload, path)
    return payload

