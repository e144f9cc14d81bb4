"""One parallel training step: :class:`BlocksStep` (the T blocks split over ranks) and
:class:`DataStep` (DistributedDataParallel over the rows of every batch).

Both draw the step's noise and dropout seeds once per step from torch's generator, which every
rank seeded alike and advances alike, so every rank holds the same seeds without communicating;
the counter-based noise and dropout contract (:mod:`noprop.rng`, :func:`noprop.ops.conv_epilogue`)
then gives block ``t`` and batch row ``i`` the same noise and mask on any rank as in one process.

**Blocks** (NoProp-DT): every rank holds the whole model, reads every batch and computes
``model.loss_terms(x, y, blocks=<its range>, shared_terms=<last rank>, seeds=...)``: the L2 terms
of its own blocks, plus, on the last rank only (it holds block T), the classifier's cross-entropy
on ``z_T`` and the KL term. After the backward pass the shared parameters' gradients (embedding,
classifier) are summed over the ranks in one all-reduce (the blocks' own are disjoint and never
sent), each rank clips as one process would, and the optimizer steps. Parameters of other ranks'
blocks receive no gradient on this rank; their values there are never read (checkpoints,
inference and :func:`noprop.distributed.block_state.broadcast_blocks` take each block from its owner).

**Data**: rank ``r`` of ``W`` trains on rows ``offset_r .. offset_r + B_r`` of every global batch
of ``B`` rows (:func:`noprop.distributed.topology.batch_rows`) with ``rows=BatchRows(offset_r, B)``
(the noise, times and masks of those rows of the global batch), BatchNorm statistics over all ranks'
rows (:func:`noprop.distributed.comm.synchronise_batch_norm`), and DistributedDataParallel's
gradient all-reduce. The local loss (a mean over ``B_r`` rows) is scaled by ``W * B_r / B`` before
the backward pass, so DDP's average over ranks is the gradient of the mean over the global batch:
the step equals one process's step on the whole batch. The returned terms are this rank's share
(``B_r / B`` of its means), which sum over the ranks to the global batch's terms.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from noprop.distributed.comm import CommMeter, all_reduce_gradients, counting_allreduce_hook, synchronise_batch_norm
from noprop.distributed.topology import Topology, batch_rows
from noprop.models import NoPropModel
from noprop.models.base import BatchRows
from noprop.objectives import LossTerms
from noprop.validation import check_positive_int


def shared_parameters(model: NoPropModel) -> list[nn.Parameter]:
    """The trainable parameters outside ``model.blocks`` (embedding, classifier, schedule), in a fixed order."""
    return [p for name, p in model.named_parameters() if not name.startswith("blocks.") and p.requires_grad]


class BlocksStep:
    """A callable ``(x, y) -> LossTerms`` that trains this rank's blocks of a NoProp-DT model for one step.

    Args:
        model: the whole model (the same on every rank).
        optimizer: its optimizer (over all parameters; other ranks' blocks get no gradient here).
        topology: this rank's role (mode ``"blocks"``).
        block_chunk: run this rank's blocks this many at a time (None: all at once).
        grad_clip: clip every block's gradient norm, and the shared parameters' jointly, to this.
        group: the process group (None: the default one).
        meter: counts the bytes the step communicates.

    Returns (per call) this rank's :class:`LossTerms`: the L2 terms of its blocks (``parts["l2"]``
    of length ``len(topology.blocks)``), plus ``ce`` and ``kl`` on the rank that computes them.
    """

    def __init__(
        self,
        model: NoPropModel,
        optimizer: torch.optim.Optimizer,
        topology: Topology,
        *,
        block_chunk: int | None = None,
        grad_clip: float | None = None,
        group=None,
        meter: CommMeter | None = None,
    ):
        if topology.mode != "blocks" or topology.blocks is None:
            raise ValueError(f"topology: BlocksStep needs a 'blocks' topology, got mode {topology.mode!r}")
        if getattr(model, "schedule", "batched") != "batched":
            raise ValueError("schedule: block-parallel training needs schedule 'batched' (the paper schedule trains one block at a time)")
        self.model, self.optimizer, self.topology = model, optimizer, topology
        self.block_chunk = None if block_chunk is None else check_positive_int("block_chunk", block_chunk)
        self.grad_clip = grad_clip
        self.group, self.meter = group, meter
        self.shared = shared_parameters(model)

    def _chunks(self) -> list[range]:
        own = self.topology.blocks
        size = self.block_chunk or len(own)
        return [range(start, min(start + size, own.stop)) for start in range(own.start, own.stop, size)]

    def __call__(self, x: torch.Tensor, y: torch.Tensor, blocks: range | None = None) -> LossTerms:
        """Train this rank's blocks on the batch ``x [B, ...]``, ``y [B]`` (the same batch on every rank)."""
        if blocks is not None:
            raise ValueError("blocks: a block-parallel step trains the blocks of its rank; the paper schedule is not supported")
        self.optimizer.zero_grad(set_to_none=True)
        seeds = self.model.draw_step_seeds(x.device)
        total, parts = None, {}
        for index, chunk in enumerate(self._chunks()):
            shared = self.topology.computes_shared_terms and index == 0
            terms = self.model.loss_terms(x, y, blocks=chunk, shared_terms=shared, seeds=seeds)
            terms.total.backward()
            total = terms.total.detach() if total is None else total + terms.total.detach()
            for name, value in terms.parts.items():
                parts[name] = value if name not in parts else torch.cat([parts[name], value])
        all_reduce_gradients(self.shared, self.group, self.meter)
        if self.grad_clip is not None:
            self.model.clip_grad_norm_(self.grad_clip)
        self.optimizer.step()
        return LossTerms(total, parts)


class _Objective(nn.Module):
    """The model's loss as a module, so that DistributedDataParallel's forward runs it."""

    def __init__(self, model: NoPropModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor, blocks: range | None, rows: BatchRows, seeds) -> tuple[torch.Tensor, dict]:
        kwargs = {} if blocks is None else {"blocks": blocks}
        terms = self.model.loss_terms(x, y, rows=rows, seeds=seeds, **kwargs)
        return terms.total, terms.parts


def _plain_strides(model: nn.Module) -> None:
    """Give a parameter that is contiguous in both memory formats (a channels-last convolution with one
    input channel) the default strides, the ones autograd gives its gradient: DDP compares gradient
    and bucket strides literally and warns of a slow path otherwise. The memory order is the same."""
    for p in model.parameters():
        plain = [1] * p.dim()
        for d in range(p.dim() - 2, -1, -1):
            plain[d] = plain[d + 1] * p.shape[d + 1]
        if p.is_contiguous() and list(p.stride()) != plain:
            p.data = p.data.as_strided(p.shape, plain)


class DataStep:
    """A callable ``(x, y, blocks=None) -> LossTerms`` that trains the whole model on this rank's rows of the batch.

    Args:
        model: the whole model (the same on every rank). Its BatchNorm layers are synchronised
            over ``group`` in place.
        optimizer: its optimizer.
        topology: this rank's role (mode ``"data"``).
        grad_clip: clip gradient norms as one process would (after the all-reduce).
        group: the process group (None: the default one).
        meter: counts the bytes the step communicates.
    """

    def __init__(
        self,
        model: NoPropModel,
        optimizer: torch.optim.Optimizer,
        topology: Topology,
        *,
        grad_clip: float | None = None,
        group=None,
        meter: CommMeter | None = None,
    ):
        if topology.mode != "data":
            raise ValueError(f"topology: DataStep needs a 'data' topology, got mode {topology.mode!r}")
        self.model, self.optimizer, self.topology = model, optimizer, topology
        self.grad_clip = grad_clip
        synchronise_batch_norm(model, group, meter)
        _plain_strides(model)
        device = next(model.parameters()).device
        # synchronised BatchNorm keeps the running statistics equal on every rank: no buffer broadcasts
        # (PyTorch 2.14 renamed the option; older releases know only broadcast_buffers)
        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
        self.ddp = DistributedDataParallel(
            _Objective(model),
            device_ids=[device] if device.type == "cuda" else None,
            process_group=group,
            find_unused_parameters=getattr(model, "schedule", "batched") == "paper",  # one block per pass
            gradient_as_bucket_view=True,  # gradients in the parameters' own layouts (channels_last convolutions)
            **({"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}),
        )
        if meter is not None:
            self.ddp.register_comm_hook(meter, counting_allreduce_hook)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, blocks: range | None = None) -> LossTerms:
        """Train on this rank's rows of the global batch ``x [B, ...]``, ``y [B]`` (the same batch on every rank)."""
        batch = x.shape[0]
        world = self.topology.world_size
        offset, count = batch_rows(batch, self.topology.rank, world)
        self.optimizer.zero_grad(set_to_none=True)
        seeds = self.model.draw_step_seeds(x.device)
        total, parts = self.ddp(x[offset : offset + count], y[offset : offset + count], blocks, BatchRows(offset, batch), seeds)
        share = count / batch
        (total * (world * share)).backward()
        if self.grad_clip is not None:
            self.model.clip_grad_norm_(self.grad_clip)
        self.optimizer.step()
        return LossTerms(total.detach() * share, {name: value * share for name, value in parts.items()})

