"""One optimisation step (forward, backward, optional per-block clipping, optimizer step), four ways.

* eager: the model's ``loss_terms``, ``backward``, ``optimizer.step``;
* ``block_chunk=k`` (NoProp-DT, batched schedule): the T blocks run k at a time, each chunk's
  loss backpropagated before the next chunk runs, so activations of only k blocks are alive;
* ``compile=True``: the loss is ``torch.compile``-d (the fused ops are ``torch.library`` custom
  ops, so the graph has no breaks) and so is the optimizer step;
* ``cuda_graphs=True``: the whole step (forward, backward, clipping, optimizer) is captured once
  in a CUDA graph and replayed; batches are copied into static input buffers. Needs static shapes
  (the trainer drops the last incomplete batch), a capturable optimizer (``build_optimizer``
  makes one) and no host synchronisation inside the step (value checks are skipped during
  capture; the data was checked when it was loaded).

Every mode returns the step's :class:`noprop.objectives.LossTerms` with detached values, and all
of them compute the same losses for the same seed (tests compare them).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from noprop.models import NoPropModel
from noprop.models.base import StepSeeds
from noprop.models.dt import NoPropDT
from noprop.objectives import LossTerms
from noprop.validation import check_positive_int

WARMUP_STEPS = 3  # eager steps on a side stream before capture (cuBLAS/cuDNN workspaces, allocator)
ZERO_INITIALISED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)


def snapshot_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """Copies of every tensor in ``optimizer.state``, keyed by parameter then by state name."""
    return {p: {k: v.clone() for k, v in state.items() if torch.is_tensor(v)} for p, state in optimizer.state.items()}


@torch.no_grad()
def restore_optimizer_state_(optimizer: torch.optim.Optimizer, snapshot: dict) -> None:
    """Put the optimizer's state back to ``snapshot`` in place, keeping every state tensor object.

    A tensor that existed at the snapshot gets its old value; one created since (the lazily
    initialised state of a fresh optimizer) is zeroed, which is Adam's and AdamW's initial state
    (``step``, ``exp_avg``, ``exp_avg_sq``). In place matters for graph capture: a state that is
    missing when the step is captured would be created inside the graph, and every replay would
    re-zero it.
    """
    if not isinstance(optimizer, ZERO_INITIALISED_OPTIMIZERS):
        raise TypeError(f"optimizer: restoring a fresh state needs Adam or AdamW (zero initial state), got {type(optimizer).__name__}")
    for p, state in optimizer.state.items():
        before = snapshot.get(p, {})
        for name, value in state.items():
            if torch.is_tensor(value):
                value.copy_(before[name]) if name in before else value.zero_()


class TrainStep:
    """A callable ``(x, y, blocks=None) -> LossTerms`` that trains ``model`` for one step.

    Args:
        model: the model to train.
        optimizer: its optimizer (one for all parameters).
        block_chunk: NoProp-DT only: run the blocks this many at a time (None: all at once).
        grad_clip: clip gradient norms to this value, every DT block separately.
        compile: ``torch.compile`` the loss and the optimizer step.
        cuda_graphs: capture the whole step in a CUDA graph (CUDA tensors only).
    """

    def __init__(
        self,
        model: NoPropModel,
        optimizer: torch.optim.Optimizer,
        *,
        block_chunk: int | None = None,
        grad_clip: float | None = None,
        compile: bool = False,
        cuda_graphs: bool = False,
    ):
        self.model = model
        self.optimizer = optimizer
        if block_chunk is not None:
            check_positive_int("block_chunk", block_chunk)
            if getattr(model, "schedule", None) != "batched":
                raise ValueError("block_chunk: only NoProp-DT with schedule='batched' runs its blocks in chunks")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip: expected a positive norm, got {grad_clip}")
        if compile and cuda_graphs:
            raise ValueError("compile, cuda_graphs: choose one (torch.compile(mode='reduce-overhead') captures graphs itself)")
        if cuda_graphs and getattr(model, "schedule", "batched") != "batched":
            raise ValueError("cuda_graphs: the paper schedule changes the trained block every pass; use schedule='batched'")
        if cuda_graphs and not isinstance(optimizer, ZERO_INITIALISED_OPTIMIZERS):
            raise TypeError(f"optimizer: cuda_graphs supports Adam and AdamW (capturable=True), got {type(optimizer).__name__}")
        self.block_chunk = block_chunk
        self.grad_clip = grad_clip
        self.cuda_graphs = cuda_graphs
        self._loss: Callable[..., LossTerms] = self._chunked_loss_and_backward
        self._optimizer_step: Callable[[], None] = optimizer.step
        if compile:
            compiled = torch.compile(self._loss_terms, fullgraph=True)

            def compiled_loss(*args):
                # eager's random streams (noise seeds, dropout) rather than inductor's own, so a
                # compiled run reproduces the eager run with the same seed
                with torch._inductor.config.patch(fallback_random=True):
                    return compiled(*args)

            self._compiled_loss = compiled_loss
            if next(model.parameters()).device.type == "cuda":  # on the CPU the eager fused step is as fast
                self._optimizer_step = torch.compile(optimizer.step, fullgraph=False)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: dict = {}
        self._compiled = compile

    # ------------------------------------------------------------------------------------------ pieces

    def _loss_terms(
        self, x: torch.Tensor, y: torch.Tensor, blocks: range | None, shared_terms: bool, seeds: StepSeeds | None
    ) -> LossTerms:
        if seeds is None:
            return self.model.loss_terms(x, y)
        return self.model.loss_terms(x, y, blocks, shared_terms=shared_terms, seeds=seeds)

    def _chunks(self, blocks: range | None) -> list[tuple[range | None, bool]]:
        if self.block_chunk is None:
            return [(blocks, True)]
        T = self.model.T
        return [(range(start, min(start + self.block_chunk, T)), start == 0) for start in range(0, T, self.block_chunk)]

    def _chunked_loss_and_backward(self, x: torch.Tensor, y: torch.Tensor, blocks: range | None) -> LossTerms:
        """Forward and backward of every chunk; returns the summed loss and the concatenated parts.

        NoProp-DT draws the step's seeds once, so every chunk trains its blocks on the noise and
        dropout masks they would get in one pass.
        """
        total = None
        parts: dict[str, torch.Tensor] = {}
        loss_fn = self._compiled_loss if self._compiled else self._loss_terms
        seeds = self.model.draw_step_seeds(x.device) if isinstance(self.model, NoPropDT) else None
        for chunk, shared in self._chunks(blocks):
            terms = loss_fn(x, y, chunk, shared, seeds)
            terms.total.backward()
            total = terms.total.detach() if total is None else total + terms.total.detach()
            for name, value in terms.parts.items():
                parts[name] = value if name not in parts else torch.cat([parts[name], value])
        return LossTerms(total, parts)

    def _eager_step(self, x: torch.Tensor, y: torch.Tensor, blocks: range | None) -> LossTerms:
        self.optimizer.zero_grad(set_to_none=not self.cuda_graphs)
        terms = self._loss(x, y, blocks)
        if self.grad_clip is not None:
            self.model.clip_grad_norm_(self.grad_clip)
        self._optimizer_step()
        return terms

    # ------------------------------------------------------------------------------------------ graphs

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Warm up on a side stream, restore the pre-warm-up state in place, then capture one step.

        The warm-up also creates the optimizer's state, so that the captured graph only updates it.
        """
        model_state = copy.deepcopy(self.model.state_dict())
        optimizer_state = snapshot_optimizer_state(self.optimizer)
        rng_state = torch.cuda.get_rng_state(x.device)
        self._static = {"x": x.clone(), "y": y.clone()}
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._eager_step(self._static["x"], self._static["y"], None)
        torch.cuda.current_stream(x.device).wait_stream(side)
        # the warm-up steps must not count as training: put everything back as it was
        self.model.load_state_dict(model_state)  # copies into the existing parameters and buffers
        restore_optimizer_state_(self.optimizer, optimizer_state)
        torch.cuda.set_rng_state(rng_state, x.device)
        self.optimizer.zero_grad(set_to_none=False)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._static["terms"] = self._eager_step(self._static["x"], self._static["y"], None)
        self._graph = graph

    def __call__(self, x: torch.Tensor, y: torch.Tensor, blocks: range | None = None) -> LossTerms:
        """Train one step on the batch ``x [B, ...]``, ``y [B]`` (``blocks``: DT's paper schedule)."""
        if not self.cuda_graphs:
            return self._eager_step(x, y, blocks)
        if x.device.type != "cuda":
            raise ValueError(f"cuda_graphs: needs CUDA tensors, got a batch on {x.device}")
        if self._graph is None:
            self._capture(x, y)
        elif x.shape != self._static["x"].shape:
            raise ValueError(f"x: a captured step needs the batch shape it was captured with, {list(self._static['x'].shape)}, got {list(x.shape)}")
        self._static["x"].copy_(x, non_blocking=True)
        self._static["y"].copy_(y, non_blocking=True)
        self._graph.replay()
        return self._static["terms"]
