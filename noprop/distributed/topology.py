"""Who does what: the split of the T blocks over ranks, the rows of a batch a rank holds, and the
backend and device rules of a process group.

* :func:`partition`: T blocks over ``world_size`` ranks as contiguous ranges as even as possible
  (sizes differ by at most one; the first ``T % world_size`` ranks get the extra block).
* :func:`batch_rows`: the rows of a global batch a rank holds in data-parallel training, the same
  contiguous split of the batch.
* :class:`Topology`: one rank's role, built by :func:`topology` for a mode.
* :func:`resolve_backend`, :func:`rank_device`: ``auto`` is ``nccl`` on CUDA devices and ``gloo``
  on the CPU; a backend that cannot run tensors of the device is refused by name
  (:data:`BACKEND_DEVICES`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from noprop.config import DIST_BACKENDS, PARALLEL_MODES

# the device types whose tensors each backend's collectives take (what this library supports)
BACKEND_DEVICES = {"gloo": ("cpu",), "nccl": ("cuda",)}


def partition(T: int, world_size: int) -> list[range]:
    """The blocks of every rank: ``T`` blocks in contiguous ranges whose sizes differ by at most one.

    Rank ``r`` gets ``T // world_size + (1 if r < T % world_size else 0)`` blocks, after those of
    ranks ``0..r-1``; e.g. ``partition(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]``.

    Raises:
        ValueError: ``world_size`` above ``T`` (a rank would have no block to train).
    """
    if world_size > T:
        raise ValueError(
            f"world size: {world_size} ranks but the model has T = {T} blocks; block-parallel training needs at most "
            f"one rank per block (use --nproc-per-node {T} or fewer, or --parallel data)"
        )
    base, extra = divmod(T, world_size)
    ranges, start = [], 0
    for rank in range(world_size):
        stop = start + base + (1 if rank < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def batch_rows(batch: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(offset, count)``: rank ``rank``'s contiguous rows of a global batch of ``batch`` rows (sizes differ by at most one)."""
    base, extra = divmod(batch, world_size)
    offset = rank * base + min(rank, extra)
    return offset, base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class Topology:
    """One rank's role in a parallel run.

    Attributes:
        mode: ``"blocks"`` (the T blocks split over the ranks; every rank reads every batch) or
            ``"data"`` (every rank holds the whole model and trains on its rows of every batch).
        rank, world_size, local_rank: this process's place in the group.
        blocks: the blocks this rank trains (``range(T)`` in data mode; None for models without
            DT's T blocks).
        shared_rank: the rank that computes the shared terms (the classifier's CE on ``z_T`` and
            the KL term) in blocks mode: the last rank, which holds block T, the one whose output
            the classifier reads at inference. Every rank in data mode (on its rows).
    """

    mode: str
    rank: int
    world_size: int
    local_rank: int
    blocks: range | None
    shared_rank: int

    @property
    def computes_shared_terms(self) -> bool:
        """Does this rank compute the CE and KL terms?"""
        return self.mode == "data" or self.rank == self.shared_rank

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run's files (metrics, curves, the checkpoint's manifest)."""
        return self.rank == 0


def topology(mode: str, T: int | None, rank: int, world_size: int, local_rank: int) -> Topology:
    """The :class:`Topology` of ``rank`` for ``mode``; ``T`` is the model's number of blocks (None: no blocks).

    Raises:
        ValueError: an unknown mode, ``blocks`` for a model without T blocks, a world size above ``T``.
    """
    if mode == "blocks":
        if T is None:
            raise ValueError("parallel: 'blocks' splits NoProp-DT's T blocks over ranks; this model has no T blocks (use --parallel data)")
        return Topology(mode, rank, world_size, local_rank, partition(T, world_size)[rank], world_size - 1)
    if mode == "data":
        return Topology(mode, rank, world_size, local_rank, None if T is None else range(T), rank)
    raise ValueError(f"parallel: expected one of {', '.join(PARALLEL_MODES[1:])}, got {mode!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The process group backend for tensors on ``device``: ``auto`` is ``nccl`` for CUDA, ``gloo`` for the CPU.

    Raises:
        ValueError: an unknown backend, a backend that does not take ``device``'s tensors
            (``nccl`` on the CPU, ``gloo`` on a GPU: use ``nccl`` there), or one this PyTorch lacks.
    """
    if backend not in DIST_BACKENDS:
        raise ValueError(f"dist_backend: expected one of {', '.join(DIST_BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type not in BACKEND_DEVICES[backend]:
        wanted = [name for name, devices in BACKEND_DEVICES.items() if device.type in devices]
        raise ValueError(
            f"dist_backend: {backend!r} does not run tensors on {device.type} devices in noprop "
            f"(it takes {', '.join(BACKEND_DEVICES[backend])}); use {' or '.join(repr(w) for w in wanted) or 'another device'}"
        )
    available = {"gloo": dist.is_gloo_available, "nccl": dist.is_nccl_available}[backend]()
    if not available:
        raise ValueError(f"dist_backend: this PyTorch build has no {backend!r} backend")
    return backend


def rank_device(device: str, local_rank: int) -> torch.device:
    """The device of the rank with ``local_rank``: ``auto`` and ``cuda`` become ``cuda:<local_rank>`` when CUDA
    is available (``auto`` is the CPU otherwise); ``cpu`` and an explicit ``cuda:N`` are kept.

    Raises:
        ValueError: CUDA requested without a GPU, or fewer GPUs than local ranks.
    """
    if device == "cpu":
        return torch.device("cpu")
    if device == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    resolved = torch.device("cuda" if device == "auto" else device)
    if resolved.type != "cuda":
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N for a parallel run, got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but no CUDA device is available")
    if resolved.index is None:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"device: local rank {local_rank} needs GPU {local_rank}, but only {torch.cuda.device_count()} are visible")
        resolved = torch.device("cuda", local_rank)
    return resolved


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by a launcher (torchrun, :func:`noprop.distributed.spawn`), or 1."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE: expected an integer, got {os.environ['WORLD_SIZE']!r}") from None
