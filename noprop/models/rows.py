"""The random draws of rows of a larger batch, for CT and FM in data-parallel training.

A data-parallel rank trains on rows ``offset .. offset + B`` of a global batch of ``total`` rows
(:class:`noprop.models.base.BatchRows`). For its step to be the one-process step on the whole batch,
those rows must get the times and the noise they get in the whole batch: the times are rows of
``torch.rand(total)`` (every rank draws all of them from a generator in the same state), and the
noise is rows of ``normal(seed, (k, total, D))``, the draw :func:`noprop.ops.noised_latents` makes
for the whole batch.
"""

from __future__ import annotations

import torch
from torch import nn

from noprop import ops
from noprop.blocks import DropoutKey, TimeBlock
from noprop.models.base import BatchRows, StepSeeds


def row_span(rows: BatchRows | None, batch: int) -> tuple[int, int]:
    """``(offset, total)`` of a batch of ``batch`` rows: ``(0, batch)`` without ``rows``.

    Raises:
        ValueError: the rows do not fit the global batch.
    """
    if rows is None:
        return 0, batch
    if rows.offset < 0 or rows.offset + batch > rows.total:
        raise ValueError(f"rows: {batch} rows from {rows.offset} do not fit a batch of {rows.total}")
    return rows.offset, rows.total


def uniform_times(rows: BatchRows | None, batch: int, device: torch.device) -> torch.Tensor:
    """``t ~ U(0, 1)`` of the batch's rows: ``torch.rand(total)[offset : offset + batch]``, ``[batch]``."""
    offset, total = row_span(rows, batch)
    return torch.rand(total, device=device)[offset : offset + batch]


def row_noise(seed: torch.Tensor, k: int, rows: BatchRows, batch: int, D: int, backend: str) -> torch.Tensor:
    """``eps [k, batch, D]``: rows ``offset .. offset + batch`` of ``normal(seed, (k, total, D))``."""
    offset, total = row_span(rows, batch)
    return ops.normal(seed, (k, total, D), offset=0, backend=backend)[:, offset : offset + batch]


def noised_latents(W: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, seed: torch.Tensor, rows: BatchRows | None, backend: str) -> torch.Tensor:
    """:func:`noprop.ops.noised_latents` (``z = a W[y] + b eps``, ``a, b [k, B]``) with, given ``rows``, the noise
    of those rows of the whole batch (:func:`row_noise`; differentiable in ``W``, ``a`` and ``b`` either way)."""
    if rows is None:
        return ops.noised_latents(W, y, a, b, seed, backend=backend)
    eps = row_noise(seed, a.shape[0], rows, y.shape[0], W.shape[1], backend).to(W.dtype)
    return a.unsqueeze(-1) * W[y] + b.unsqueeze(-1) * eps


def dropout_keyword(block: nn.Module, seeds: StepSeeds, rows: BatchRows | None) -> dict:
    """The ``dropout_key`` argument of the paper's :class:`noprop.blocks.TimeBlock` for this step (the masks of
    the rows' global indices); a user's block takes none (it draws its own dropout)."""
    if not isinstance(block, TimeBlock):
        return {}
    return {"dropout_key": DropoutKey(seeds.dropout, rows.offset if rows is not None else 0)}
