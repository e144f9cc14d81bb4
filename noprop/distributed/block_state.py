"""Which rows of a model's tensors belong to which block, so each rank can save, send and receive
exactly the blocks it trains.

A NoProp-DT model keeps its T blocks under ``blocks.``, in one of three containers:

* :class:`noprop.stack.BlockStack` and :class:`noprop.user_blocks.FuncBlockStack`: every block
  tensor is stacked block-major along dim 0 (``[T * n, ...]``: block t owns rows ``t*n .. (t+1)*n``);
  a 0-dim tensor (a stacked BatchNorm's ``num_batches_tracked``) is common to all blocks;
* :class:`noprop.stack.BlockList`: ``blocks.blocks.<t>.*`` belongs to block t whole.

Everything else (the embedding, the classifier, the noise schedule; every tensor of CT and FM) is
*shared*: one value, the same on every rank.

:func:`split` turns named tensors into flat entries, one per shared tensor (key ``name``) and one
per block slice (key ``name/block<t>``); :func:`join` reassembles them from the keys alone. The flat form does not
depend on how blocks were assigned to ranks, so a checkpoint written by any number of ranks loads
at any other. :func:`broadcast_blocks` gives every rank every block (each owner sends its own).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

_LISTED = re.compile(r"^blocks\.blocks\.(\d+)\.")
_BLOCK_KEY = re.compile(r"^(.*)/block(\d+)$")


def block_rows(name: str, tensor: torch.Tensor, T: int | None) -> list[tuple[int, slice]] | None:
    """The block slices of tensor ``name``: ``[(t, rows of dim 0)]`` for every block t, or None if it is shared.

    A ``blocks.blocks.<t>.`` tensor belongs to block t whole (``slice(None)``).
    """
    if T is None or not name.startswith("blocks."):
        return None
    listed = _LISTED.match(name)
    if listed:
        return [(int(listed.group(1)), slice(None))]
    if tensor.dim() == 0 or tensor.shape[0] % T:
        return None
    n = tensor.shape[0] // T
    return [(t, slice(t * n, (t + 1) * n)) for t in range(T)]


def split(named: dict[str, torch.Tensor], T: int | None, blocks: range | None = None) -> dict[str, torch.Tensor]:
    """Flat entries of ``named``: ``name`` for a shared tensor, ``name/block<t>`` for block t's slice (views).

    Args:
        named: tensors by name (a state dict, or optimizer state keyed by parameter name).
        T: the model's number of blocks (None: everything is shared).
        blocks: keep only these blocks' slices (None: every block).
    """
    flat = {}
    for name, tensor in named.items():
        rows = block_rows(name, tensor, T)
        if rows is None:
            flat[name] = tensor
            continue
        for t, index in rows:
            if blocks is None or t in blocks:
                flat[f"{name}/block{t}"] = tensor if index == slice(None) else tensor[index]
    return flat


def join(flat: dict[str, torch.Tensor], T: int | None, where: str = "blocks") -> dict[str, torch.Tensor]:
    """Undo :func:`split`: ``name`` entries as they are, the ``name/block<t>`` pieces of a stacked tensor
    concatenated in block order (all T needed), a listed block's one piece as its tensor.

    Raises:
        ValueError: ``WHERE: NAME lacks block(s) [...]`` when a block's piece is missing.
    """
    whole, pieces = {}, {}
    for key, value in flat.items():
        match = _BLOCK_KEY.match(key)
        if match:
            pieces.setdefault(match.group(1), {})[int(match.group(2))] = value
        else:
            whole[key] = value
    for name, parts in pieces.items():
        listed = _LISTED.match(name)
        expected = [int(listed.group(1))] if listed else list(range(T or 0))
        if sorted(parts) != expected:
            raise ValueError(f"{where}: {name} lacks block(s) {sorted(set(expected) - set(parts))} (a rank's part is missing)")
        whole[name] = torch.cat([parts[t] for t in expected]) if len(expected) > 1 else parts[expected[0]]
    return whole


@torch.no_grad()
def broadcast_blocks(model: torch.nn.Module, T: int, ranges: list[range], group=None) -> int:
    """Give every rank every block: the owner of each range (``ranges[r]`` on rank ``r`` of ``group``)
    broadcasts its blocks' parameters and buffers, one flat message per rank and dtype.

    Returns:
        The payload bytes this rank sent or received.
    """
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    moved = 0
    for owner, blocks in enumerate(ranges):
        views = [view for key, view in split(named, T, blocks).items() if "/block" in key]
        for dtype in sorted({v.dtype for v in views}, key=str):
            same = [v for v in views if v.dtype == dtype]
            flat = torch.cat([v.reshape(-1) for v in same])
            dist.broadcast(flat, src=owner if group is None else dist.get_global_rank(group, owner), group=group)
            moved += flat.numel() * flat.element_size()
            offset = 0
            for view in same:
                view.copy_(flat[offset : offset + view.numel()].view(view.shape))
                offset += view.numel()
    return moved
