"""A parallel training run's process group, heartbeat and role, and the hooks the trainer calls.

:func:`noprop.train.train` opens a :class:`Session` when ``config.parallel`` is ``blocks`` or
``data``. At start-up the session joins (or starts, from the launcher's environment) the process
group, starts the heartbeat (:mod:`noprop.distributed.liveness`) and compares every rank's
configuration, before any data is read or any step is taken. It then gives the trainer the
parallel step, the batches, the epoch's loss terms combined over ranks, the accuracy computed
across ranks and the sharded checkpoint. If the run fails on a rank the session records the error
for the others, and turns a failed collective into a :class:`RankLostError` naming the rank that
died, hung or failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import pathlib

import torch
import torch.distributed as dist

from noprop.distributed import checkpoint as sharded
from noprop.distributed import inference
from noprop.distributed.comm import CommMeter, has_batch_norm, unsynchronise_batch_norm
from noprop.distributed.liveness import Liveness, RankLostError
from noprop.distributed.steps import BlocksStep, DataStep
from noprop.distributed.topology import Topology, launched_world_size, rank_device, resolve_backend, topology
from noprop.precision import precision_scope
from noprop.run_folder import run_record, write_metrics
from noprop.user_blocks import FuncBlockStack

PER_RANK_OPTIONS = ("device", "progress")  # may differ between ranks; every other option must not


def config_digest(config) -> tuple[str, dict]:
    """``(SHA-256 of the options every rank must share, those options)`` of a :class:`noprop.config.TrainConfig`."""
    shared = {k: v for k, v in dataclasses.asdict(config).items() if k not in PER_RANK_OPTIONS}
    return hashlib.sha256(json.dumps(shared, sort_keys=True, default=str).encode()).hexdigest(), shared


class Session:
    """One rank's view of a parallel run (see the module docstring); use as a context manager.

    Args:
        config: the run's :class:`noprop.config.TrainConfig` (``parallel`` is ``blocks`` or ``data``).

    Attributes (after entering): ``device``, ``topology``, ``group`` (None: the default group),
    ``meter`` (a :class:`noprop.distributed.comm.CommMeter` of the training steps' collectives).
    """

    def __init__(self, config):
        self.config = config
        self.owns_group = False
        self.liveness: Liveness | None = None
        self.group = None
        self.meter = CommMeter()
        self.topology: Topology | None = None
        self.device: torch.device | None = None

    # ------------------------------------------------------------------------------------------ start and stop

    def __enter__(self) -> "Session":
        config = self.config
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = rank_device(config.device, local_rank)
        backend = resolve_backend(config.dist_backend, self.device)
        if not dist.is_initialized():
            missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
            if missing:
                raise ValueError(
                    f"parallel: {config.parallel!r} needs a launcher ({', '.join(missing)} not set): run "
                    "torchrun --nproc-per-node N -m noprop train --parallel ... (or noprop.distributed.spawn from Python)"
                )
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(
                backend, timeout=datetime.timedelta(seconds=config.dist_timeout), device_id=self.device if self.device.type == "cuda" else None
            )
            self.owns_group = True
        elif dist.get_backend() != backend:
            raise ValueError(f"dist_backend: the process group runs {dist.get_backend()!r} but this run needs {backend!r} on {self.device}")
        rank, world = dist.get_rank(), dist.get_world_size()
        try:
            self.liveness = Liveness(dist.distributed_c10d._get_default_store(), rank, world, config.dist_timeout).start()
            self.check_same("config", *config_digest(config))
            T = config.T if config.method == "dt" else None
            self.topology = topology(config.parallel, T, rank, world, local_rank)
        except BaseException as error:
            self.__exit__(type(error), error, None)
            raise
        return self

    def __exit__(self, kind, error, trace) -> None:
        failure = None if error is None else f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
        lost = None
        if isinstance(error, RuntimeError) and not isinstance(error, RankLostError) and self.liveness is not None:
            lost = self.liveness.diagnose(error)
        if self.liveness is not None:
            self.liveness.close(failure)
        if self.owns_group:
            if error is None:
                dist.barrier()
            dist.destroy_process_group()
        if lost is not None:
            raise lost from error

    def check_same(self, what: str, digest: str, values: dict) -> None:
        """Raise ``ValueError`` on every rank unless every rank passed the same ``digest``; the message names
        the ranks and the first differing values (a config mismatch is reported before any step)."""
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (digest, values), group=self.group)
        reference_digest, reference = everyone[0]
        differing = [(rank, theirs) for rank, (d, theirs) in enumerate(everyone) if d != reference_digest]
        if not differing:
            return
        rank, theirs = differing[0]
        keys = [k for k in sorted(set(reference) | set(theirs)) if reference.get(k) != theirs.get(k)]
        details = "; ".join(f"{k} is {theirs.get(k)!r} on rank {rank} but {reference.get(k)!r} on rank 0" for k in keys[:3])
        ranks = ", ".join(str(r) for r, _ in differing)
        raise ValueError(f"{what}: rank(s) {ranks} differ from rank 0 ({details}); every rank must be launched with the same options and data")

    def main_first(self, load):
        """``load()`` on rank 0 first, then on the others (one rank downloads a missing dataset)."""
        if not self.is_main:
            self.barrier()
        value = load()
        if self.is_main:
            self.barrier()
        return value

    def check_same_data(self, dataset) -> None:
        """Every rank must have loaded the same data (its description, fingerprints included)."""
        described = json.loads(json.dumps(dataset.describe(), default=str))
        self.check_same("data", hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest(), described)

    # ------------------------------------------------------------------------------------------ training

    @property
    def is_main(self) -> bool:
        """Is this rank 0 (which writes metrics, curves and the checkpoint's manifest)?"""
        return self.topology.is_main

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def train_step(self, model, optimizer, config):
        """The parallel step for ``model`` (:class:`BlocksStep` or :class:`DataStep`)."""
        if self.topology.mode == "blocks":
            return BlocksStep(model, optimizer, self.topology, block_chunk=config.block_chunk, grad_clip=config.grad_clip, group=self.group, meter=self.meter)
        if isinstance(getattr(model, "blocks", None), FuncBlockStack) and has_batch_norm(model.blocks):
            raise ValueError("parallel: user blocks with BatchNorm cannot share statistics across ranks (they run under torch.func.vmap); use --parallel blocks or blocks without BatchNorm")
        return DataStep(model, optimizer, self.topology, grad_clip=config.grad_clip, group=self.group, meter=self.meter)

    def batches(self, loader, model) -> "FullBatches":
        """The loader's batches, in data mode without a last batch too small to give every rank its rows."""
        smallest = self.topology.world_size * (2 if model._has_batch_norm() else 1) if self.topology.mode == "data" else 1
        if loader.batch_size < smallest:
            raise ValueError(
                f"batch_size: data-parallel training over {self.topology.world_size} ranks needs batches of at least {smallest} "
                f"rows (every rank gets its rows{', at least 2 for BatchNorm' if smallest > self.topology.world_size else ''}), got {loader.batch_size}"
            )
        return FullBatches(loader, smallest)

    def combine(self, means: dict) -> dict:
        """The epoch's loss terms over all ranks, from each rank's :meth:`noprop.train.EpochStats.means`.

        Blocks mode: ``loss`` summed, ``l2`` concatenated in block order, ``ce``/``kl`` from the rank
        that computes them. Data mode: every term summed (each rank's are its share of the batch).
        """
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, means, group=self.group)
        combined: dict = {}
        for rank_means in everyone:
            for name, value in rank_means.items():
                if name not in combined:
                    combined[name] = value
                elif name == "l2" and self.topology.mode == "blocks":
                    combined[name] = combined[name] + value
                elif isinstance(value, list):
                    combined[name] = [a + b for a, b in zip(combined[name], value)]
                else:
                    combined[name] = combined[name] + value
        return combined

    def evaluate(self, model, x, y, precision: str = "fp32", **kwargs) -> tuple[float, None]:
        """Accuracy across ranks (:func:`noprop.distributed.inference.evaluate`) in ``precision``, as ``(accuracy, None)``."""
        with precision_scope(precision, x.device):
            return inference.evaluate(model, x, y, self.topology, group=self.group, **kwargs), None

    def save_epoch(self, out: pathlib.Path, config, model, optimizer, epoch, history, dataset, device, loader_generator) -> pathlib.Path:
        """:func:`noprop.run_folder.save_epoch` for a parallel run: every rank writes its part of
        ``out/checkpoint.dcp``, then rank 0 writes the metrics and curves (and removes a
        ``checkpoint.pt`` of a one-process run this run resumed). Returns the checkpoint's path."""
        record = run_record(config, model, epoch, history, dataset, loader_generator)
        record["rng"]["device_index"] = self.device.index or 0  # whose CUDA generator the seeds came from
        T = getattr(model, "T", None) if self.topology.blocks is not None else None
        blocks = self.topology.blocks if self.topology.mode == "blocks" else None
        path = sharded.save(out, record, model, optimizer, T, blocks, rank=self.topology.rank, group=self.group)
        if self.is_main:
            (out / "checkpoint.pt").unlink(missing_ok=True)
            write_metrics(out, config, history, dataset, device)
        self.barrier()
        return path

    def restore_device_rng(self, rng: dict) -> None:
        """Put the saving rank's CUDA generator state on this rank's device (every rank draws the same seeds)."""
        if self.device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state(rng["cuda"][rng.get("device_index", 0)], self.device)

    def finish(self, model) -> None:
        """Leave a model that works outside the process group: in blocks mode every rank gets every trained
        block; in data mode the BatchNorm layers normalise locally again."""
        if self.topology.mode == "blocks":
            inference.gather_blocks(model, self.topology, self.group)
        else:
            unsynchronise_batch_norm(model)


class FullBatches:
    """The batches of a loader, without a last one smaller than ``smallest`` rows."""

    def __init__(self, loader, smallest: int):
        self.loader, self.smallest = loader, smallest

    def __len__(self) -> int:
        n, size = self.loader.x.shape[0], self.loader.batch_size
        full = len(self.loader)
        last = n - (full - 1) * size
        return full - (1 if full and last < self.smallest else 0)

    def __iter__(self):
        for index, batch in enumerate(self.loader):
            if index < len(self):
                yield batch


def open_session(config, stack: contextlib.ExitStack) -> Session | None:
    """The run's :class:`Session`, entered on ``stack``, or None for ``parallel="none"``.

    Raises:
        ValueError: ``parallel="none"`` in a process a launcher started as one of several ranks
            (every rank would train the same run into the same folder).
    """
    if config.parallel == "none":
        world = dist.get_world_size() if dist.is_initialized() else launched_world_size()
        if world > 1:
            raise ValueError(
                f"parallel: this process is one of {world} ranks but --parallel is 'none' (every rank would train the same run "
                "into the same folder); pass --parallel blocks or --parallel data, or launch one process"
            )
        return None
    return stack.enter_context(Session(config))
