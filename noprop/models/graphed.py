"""A model's whole sampling loop captured in one CUDA graph (CT/FM inference on a GPU).

CT and FM inference runs ``steps`` (paper: 1000) block evaluations and latent updates, each a
handful of small kernels, so on a GPU it is bound by kernel launches rather than by work.
:func:`run_graphed` captures a sampling function ``sample(x, seed) -> logits`` (image features,
``z_0``, every step, the readout) in one ``torch.cuda.CUDAGraph`` per key and replays it:

1. first call for a key: copy ``x`` and ``seed`` into static buffers, run ``sample`` eagerly
   :data:`WARMUP_CALLS` times on a side stream (Triton compiles, cuBLAS allocates its workspace),
   then capture one call;
2. every call: copy ``x`` and ``seed`` into the buffers, replay, return a copy of the logits.

The noise is a pure function of the seed tensor's *value* (:mod:`noprop.rng`), which the kernels
read at replay, so each replay draws the noise of the seed it was given: for the same images and
seed a replay returns what an eager call returns. The graph reads the model's parameters and
buffers in place, so in-place updates (optimizer steps, ``load_state_dict``) reach later replays;
replacing them (``model.to(...)``, assigning a new ``Parameter``) changes their addresses, which
drops every cached graph of that model.

Under ``torch.autocast`` the capture runs with autocast's weight cache off, so the bfloat16
copies of the weights are made inside the graph (from the current weights) at every replay; the
autocast dtype is part of the key.

A key is the caller's (steps, solver, ...) plus the shape, dtype and device of ``x``, the
autocast dtype and the TF32 settings (:func:`noprop.precision.tf32_state`); at most
:data:`MAX_GRAPHS` graphs per model are kept (the least recently used goes first), each with its
own memory pool.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable

import torch
from torch import nn

from noprop.precision import tf32_state

MAX_GRAPHS = 8  # per model: e.g. full and last partial evaluation batches of a few step counts
WARMUP_CALLS = 2  # eager calls on a side stream before the capture


@dataclass
class CapturedSampler:
    """One captured sampling loop: its graph, static inputs ``x [B, ...]``, ``seed [1]``, static output ``logits``."""

    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    seed: torch.Tensor
    logits: torch.Tensor


class SamplingGraphs:
    """The captured sampling loops of one model, by key (see the module docstring)."""

    def __init__(self) -> None:
        self.graphs: OrderedDict[Hashable, CapturedSampler] = OrderedDict()
        self.addresses: tuple[int, ...] = ()

    def get(self, key: Hashable, addresses: tuple[int, ...]) -> CapturedSampler | None:
        """The graph captured for ``key``, or None; drops every graph if the model's tensors moved (``addresses``)."""
        if addresses != self.addresses:
            self.graphs.clear()
            self.addresses = addresses
        captured = self.graphs.get(key)
        if captured is not None:
            self.graphs.move_to_end(key)
        return captured

    def put(self, key: Hashable, captured: CapturedSampler) -> None:
        """Keep ``captured`` under ``key``, dropping the least recently used graph beyond :data:`MAX_GRAPHS`."""
        self.graphs[key] = captured
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)


_CACHES: weakref.WeakKeyDictionary[nn.Module, SamplingGraphs] = weakref.WeakKeyDictionary()


def sampling_graphs(model: nn.Module) -> SamplingGraphs:
    """The cache of ``model``'s captured sampling loops (it lives as long as the model)."""
    cache = _CACHES.get(model)
    if cache is None:
        cache = _CACHES[model] = SamplingGraphs()
    return cache


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


Sampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, seed) -> logits


def capture(sample: Sampler, x: torch.Tensor, seed: torch.Tensor) -> CapturedSampler:
    """Warm ``sample`` up on a side stream, then capture one call of it on static copies of ``x`` and ``seed``.

    Raises:
        RuntimeError: the capture failed, with PyTorch's reason and the usual cause named.
    """
    static_x, static_seed = x.clone(), seed.clone()
    autocast_dtype = _autocast_dtype("cuda")
    no_weight_cache = contextlib.nullcontext()
    if autocast_dtype is not None:
        no_weight_cache = torch.autocast("cuda", dtype=autocast_dtype, cache_enabled=False)
    with torch.cuda.device(x.device), no_weight_cache:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                sample(static_x, static_seed)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                logits = sample(static_x, static_seed)
        except RuntimeError as error:
            raise RuntimeError(
                f"cuda_graph: capturing the sampling loop failed ({error}); a block that reads a tensor's value on the "
                "host (.item(), bool(tensor), data-dependent shapes) cannot be captured: use cuda_graph=False"
            ) from error
    return CapturedSampler(graph, static_x, static_seed, logits)


def run_graphed(
    model: nn.Module,
    sample: Sampler,
    x: torch.Tensor,
    seed: torch.Tensor,
    key: Hashable,
) -> torch.Tensor:
    """``sample(x, seed)`` through ``model``'s CUDA graph for ``key`` (captured on the first call): logits ``[B, C]``.

    Args:
        model: the model ``sample`` runs (its parameters and buffers are what the graph reads).
        sample: ``(x, seed) -> logits``, with no host synchronisation (capturable).
        x: checked inputs ``[B, ...]`` on a CUDA device.
        seed: int64 ``[1]`` on ``x``'s device.
        key: what else selects the graph (steps, solver, ...).

    Raises:
        ValueError: ``cuda_graph`` with CPU tensors (there is nothing to capture; pass
            ``cuda_graph=False``) or with the model in training mode (dropout would draw inside the graph).
    """
    if x.device.type != "cuda":
        raise ValueError(
            f"cuda_graph: CUDA graphs capture GPU work only, got x on {x.device}; use cuda_graph=False there"
        )
    if model.training:
        raise ValueError(
            "cuda_graph: the model is in training mode (dropout would draw inside the graph); call model.eval() first"
        )
    cache = sampling_graphs(model)
    addresses = tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))
    full_key = (key, tuple(x.shape), x.dtype, x.device, _autocast_dtype("cuda"), tf32_state())
    captured = cache.get(full_key, addresses)
    if captured is None:
        captured = capture(sample, x, seed)
        cache.put(full_key, captured)
    captured.x.copy_(x)
    captured.seed.copy_(seed)
    captured.graph.replay()
    return captured.logits.clone()
