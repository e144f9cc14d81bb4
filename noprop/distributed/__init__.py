"""Block-parallel and data-parallel NoProp on ``torch.distributed``.

NoProp's blocks need no gradient from each other, so they can train on different devices with
almost no communication. Two modes, launched with ``torchrun --nproc-per-node N -m noprop train
--parallel blocks|data ...`` (or :func:`spawn` from Python):

* ``blocks`` (NoProp-DT): the T blocks are split over the ranks in contiguous ranges
  (:func:`partition`); every rank reads every batch, draws the same noise and dropout seeds, trains
  its own blocks, and the ranks all-reduce only the shared parameters' gradients (label embedding,
  classifier): a few thousand numbers per step, whatever the blocks' size. The last rank, which
  holds block T, computes the cross-entropy on ``z_T`` and the KL term. Inference pipelines ``z``
  from rank to rank in micro-batches.
* ``data`` (every method of NoProp: DT, CT, FM): DistributedDataParallel over the rows of every
  batch, with BatchNorm statistics over all ranks; every parameter's gradient is all-reduced.

Both are exact: a parallel step computes the step one process computes on the whole batch
(:mod:`noprop.distributed.steps`). Checkpoints are sharded with ``torch.distributed.checkpoint``
and load at any world size (:mod:`noprop.distributed.checkpoint`); a rank that dies is named by
the others (:mod:`noprop.distributed.liveness`).
"""

from noprop.distributed.comm import CommMeter, synchronise_batch_norm
from noprop.distributed.inference import evaluate, gather_blocks, pipeline_predict
from noprop.distributed.launch import RankOutcome, SpawnError, spawn
from noprop.distributed.liveness import RankLostError
from noprop.distributed.session import Session
from noprop.distributed.steps import BlocksStep, DataStep
from noprop.distributed.topology import Topology, batch_rows, partition, topology

__all__ = [
    "BlocksStep",
    "CommMeter",
    "DataStep",
    "RankLostError",
    "RankOutcome",
    "Session",
    "SpawnError",
    "Topology",
    "batch_rows",
    "evaluate",
    "gather_blocks",
    "partition",
    "pipeline_predict",
    "spawn",
    "synchronise_batch_norm",
    "topology",
]
