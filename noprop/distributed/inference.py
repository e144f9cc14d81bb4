"""Inference and accuracy across ranks.

* :func:`pipeline_predict` (blocks mode): the rank holding blocks ``a..b`` receives ``z_a`` from
  the previous rank, applies Eq. 3 with its own blocks and sends ``z_b`` on; the batch travels in
  micro-batches, so rank ``r`` works on micro-batch ``m`` while rank ``r + 1`` works on ``m - 1``.
  Only ``z`` crosses ranks (``B x D`` numbers per rank boundary); every rank computes its own
  blocks' image features from ``x``, which every rank holds.
* :func:`noprop.distributed.block_state.broadcast_blocks` is the alternative: gather every block
  on every rank (the blocks' parameters cross ranks once), then ``model.predict`` anywhere.
* :func:`evaluate` gives the accuracy of a run on every rank: the pipeline in blocks mode; in data
  mode the evaluation batches are shared out round-robin and the counts of correct predictions
  summed.

The noise is the one-process noise: ``model.predict`` draws one seed per call, so these functions
draw the seed of every evaluation batch in the same order on every rank (torch's generator stays
in step across ranks), ``z_0`` of rows ``a..b`` is ``normal(seed, (b - a, D), offset=a * D)``
and step ``t``'s noise ``normal(seed + t + 1, ...)`` likewise: rows of the full batch's draws.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from noprop import ops
from noprop.distributed.topology import Topology, partition
from noprop.stack import BlockList, BlockStack


def _image_features(blocks_module, x: torch.Tensor, own: range, T: int) -> torch.Tensor:
    """``[T, B, ...]`` image features whose rows ``own`` hold this rank's blocks' features (the others are
    never read). A user-block stack computes all T (its container has no per-range image pass)."""
    if isinstance(blocks_module, BlockStack):
        local = blocks_module.image(x, own)
    elif isinstance(blocks_module, BlockList):
        local = torch.stack([blocks_module.blocks[t].image(x) for t in own])
    else:
        return blocks_module.image_features(x)
    features = local.new_empty((T, *local.shape[1:]))
    features[own.start : own.stop] = local
    return features


@torch.no_grad()
def pipeline_predict(
    model,
    x: torch.Tensor,
    topology: Topology,
    *,
    seed: torch.Tensor,
    deterministic: bool = False,
    micro_batches: int | None = None,
    group=None,
) -> torch.Tensor | None:
    """NoProp-DT's ``predict(x, deterministic=..., seed=seed)`` with the blocks of each rank run on that rank.

    Args:
        model: the NoProp-DT model (this rank's blocks ``topology.blocks`` must be trained here).
        x: the images ``[B, C, H, W]``, the same on every rank.
        topology: a ``"blocks"`` topology; ranks ``0..W-1`` hold consecutive block ranges.
        seed: the inference seed (int64 ``[1]``), the same on every rank.
        deterministic: ``z_0 = 0`` and no noise in the updates.
        micro_batches: pieces the batch travels in (at most ``B``; None: one per rank). More
            pieces keep more ranks busy at once but make smaller, less efficient calls.
        group: the process group (None: the default one).

    Returns:
        The class logits ``[B, num_classes]`` on the last rank, None on the others.
    """
    T, W = model.T, model.embedding.weight
    rank, world = topology.rank, topology.world_size
    own = topology.blocks
    batch, D = x.shape[0], model.embed_dim
    x, _ = model.check_inputs(x)
    features = _image_features(model.blocks, x, own, T)
    pieces = min(world if micro_batches is None else micro_batches, batch)
    bounds = torch.linspace(0, batch, pieces + 1).round().long().tolist()
    sends, logits = [], []
    peer = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
    for m, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if rank == 0:
            z = W.new_zeros((b - a, D)) if deterministic else ops.normal(seed, (b - a, D), offset=a * D, backend=model.backend).to(W.dtype)
        else:
            z = W.new_empty((b - a, D))
            dist.recv(z, src=peer(rank - 1), group=group, tag=m)
        rows = features[:, a:b]
        for t in own:
            step_logits = model.blocks.head(t, rows, z)
            z = ops.latent_update(step_logits, W, z, model.step_a[t], model.step_b[t], 0.0, seed, backend=model.backend)
            if not deterministic:
                z = z + model.step_noise[t] * ops.normal(seed + (t + 1), (b - a, D), offset=a * D, backend=model.backend).to(z.dtype)
        if rank + 1 < world:
            sends.append(dist.isend(z.contiguous(), dst=peer(rank + 1), group=group, tag=m))
        else:
            logits.append(model.classifier(z))
    for handle in sends:
        handle.wait()
    return torch.cat(logits) if logits else None


@torch.no_grad()
def evaluate(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    topology: Topology,
    *,
    steps: int | None = None,
    solver: str | None = None,
    deterministic: bool = False,
    batch_size: int = 1000,
    group=None,
) -> float:
    """Accuracy of the model on ``x``, ``y`` (the same on every rank), computed across ranks; the same value on every rank.

    Batches of ``batch_size`` as :func:`noprop.train.evaluate`, each with the seed one process
    would draw for it. Blocks mode: every batch goes through :func:`pipeline_predict`. Data mode:
    rank ``r`` predicts batches ``r, r + W, ...``.
    """
    was_training = model.training
    model.eval()
    device = x.device
    correct = torch.zeros((), dtype=torch.float64, device=device)
    starts = range(0, x.shape[0], batch_size)
    for index, start in enumerate(starts):
        seed = model.draw_seed(device)  # every rank draws every batch's seed, as one process would
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        if topology.mode == "blocks":
            logits = pipeline_predict(model, xb, topology, seed=seed, deterministic=deterministic, group=group)
        elif index % topology.world_size == topology.rank:
            logits = model.predict(xb, steps=steps, solver=solver, deterministic=deterministic, seed=seed)
        else:
            logits = None
        if logits is not None:
            correct += (logits.argmax(dim=-1) == yb).sum()
    dist.all_reduce(correct, group=group)
    model.train(was_training)
    return correct.item() / x.shape[0] if x.shape[0] else float("nan")


def gather_blocks(model, topology: Topology, group=None) -> int:
    """Give every rank every trained block (:func:`noprop.distributed.block_state.broadcast_blocks`); returns the payload bytes."""
    from noprop.distributed.block_state import broadcast_blocks

    return broadcast_blocks(model, model.T, partition(model.T, topology.world_size), group)
