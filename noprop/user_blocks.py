"""Blocks a user brings: the factory contract, the adapter a user block runs in, and ``FuncBlockStack``.

Every model takes ``block=factory`` (``NoPropDT``, ``NoPropCT``, ``NoPropFM``, ``Backprop``,
``Adjoint``); without it the model builds the paper's block (``DTBlock``/``TimeBlock``, run by the
hand-written :class:`noprop.stack.BlockStack`, the fast path).

**The factory.** Any callable that returns a fresh ``nn.Module``, usually the block's class. The
model calls it once per block (T times for DT and Backprop, once for CT, FM and Adjoint) with
keyword arguments only, from this list:

=================== ============= =============================================================
``num_classes``     int           ``C``, the length of the logits
``in_channels``     int           image channels
``image_size``      int           image height = width
``embed_dim``       int           ``D``, the length of ``z``
``config``          BlockConfig   the paper's widths scaled by the model's ``width`` (use or ignore)
``prototype``       bool          prototype embedding: ``D = C_in * H * W`` (``z`` reads as an image)
``time_conditioned`` bool         the block gets ``t`` (CT, FM, Adjoint) or not (DT, Backprop)
=================== ============= =============================================================

A factory receives only the arguments its signature names (all of them if it takes ``**kwargs``),
so ``block=MyBlock`` works for ``MyBlock(num_classes, embed_dim, width=32)``; a required argument
outside the list is refused by name (bind it with ``functools.partial``).

**The block.** ``block(x [B, C_in, H, W], z [B, D]) -> logits [B, num_classes]`` (DT, Backprop),
``block(x, z, t [B]) -> logits`` with ``t`` in ``[0, 1]`` (CT, FM, Adjoint). The model reads the
logits out as it does the paper's: ``softmax(logits) @ W_embed`` (DT, CT, Backprop) or
``logits @ W_embed`` (FM, Adjoint). Optionally the block splits into ``image(x) -> features`` (any
tensor with a leading batch dimension) and ``head(features, z[, t]) -> logits`` with
``forward(x, z[, t]) == head(image(x), z[, t])``: inference then computes the image features once
(DT: once for all T blocks; CT/FM: once for all steps) instead of running the whole block at every
step. The logits' shape is checked at every call (shapes only: no synchronisation); a wrong one
raises ``ValueError`` naming ``block``.

**T blocks as one network** (DT batched schedule, Backprop): :class:`FuncBlockStack` stacks the
T blocks' parameters and buffers (``[T, ...]`` each) and runs them with ``torch.func``:
``vmap(functional_call(block, state_t, ...))`` over the blocks, ``randomness="different"``. The
batching rules turn T convolutions into one (wider, or grouped) convolution, T matmuls into one
batched matmul, and so on, so the number of kernels per step does not grow with T for any
architecture. What the batched path needs from a block: every tensor it reads is a parameter, a
buffer or a constant; no parameter shared inside a block or between blocks; vmappable operations
(no ``.item()`` or Python branching on tensor values, no in-place writes into its inputs).
BatchNorm works: each block's running statistics are updated from that block's batch (the stacked
buffers are updated in place through the vmapped ``batch_norm``), and dropout masks are drawn
independently per block. ``TrainStep(compile=True)`` traces the whole path (``fullgraph=True``).
Tested on torch 2.14.1 only (no other version was at hand); the APIs used,
``torch.func.functional_call`` and ``vmap(randomness=...)``, are public since torch 2.0, and
``tests/test_user_blocks.py`` checks the BatchNorm statistics on whichever torch runs it.

**Checkpoints.** A factory is code, and a checkpoint holds data only (loading one never imports or
runs anything). ``model.config()`` records the factory as a string ``"module:qualname"`` under
``"block"``, for the record; the state dict holds the weights as usual. To rebuild, pass the factory
in its place and load the weights::

    model = NoPropDT(**{**config, "block": MyBlock})
    model.load_state_dict(state)

Building a model from a config whose ``block`` is that string (``build_model``, ``noprop eval``, the
trainer's ``--resume``) raises ``ValueError`` naming ``block`` and the recorded factory.
"""

from __future__ import annotations

import copy
import functools
import inspect
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, vmap

from noprop.stack import check_block_inputs, clip_per_block_
from noprop.validation import check_positive_int

FACTORY_ARGUMENTS = ("num_classes", "in_channels", "image_size", "embed_dim", "config", "prototype", "time_conditioned")


def factory_name(factory: Callable) -> str:
    """``"module:qualname"`` of a factory (``functools.partial(f, ...)`` is named after ``f``)."""
    if isinstance(factory, functools.partial):
        return f"functools.partial({factory_name(factory.func)})"
    module = getattr(factory, "__module__", None) or type(factory).__module__
    qualname = getattr(factory, "__qualname__", None) or type(factory).__qualname__
    return f"{module}:{qualname}"


def check_factory(block: object) -> Callable[..., nn.Module]:
    """``block`` if it can be a block factory, else an error naming ``block`` that says what to pass."""
    if isinstance(block, str):
        raise ValueError(
            f"block: {block!r} is the name a model records for a user block factory; a checkpoint holds no code, "
            f"so pass the factory itself: Model(**{{**config, 'block': factory}}), then load_state_dict"
        )
    if isinstance(block, nn.Module):
        raise TypeError(
            f"block: expected a factory that builds a block (its class, or a function), got an {type(block).__name__} "
            f"instance; a model builds one block per step (T for NoPropDT), e.g. block={type(block).__name__}"
        )
    if not callable(block):
        raise TypeError(f"block: expected a factory (a class or function returning an nn.Module), got {type(block).__name__}")
    return block


def factory_arguments(factory: Callable, arguments: dict) -> dict:
    """The keyword arguments ``factory`` is called with: those of ``arguments`` its signature names (all with ``**kwargs``)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # no introspectable signature (some builtins): pass everything
        return dict(arguments)
    parameters = signature.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(arguments)
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = {k: v for k, v in arguments.items() if k in parameters and parameters[k].kind in named}
    try:
        signature.bind(**accepted)
    except TypeError as error:
        raise ValueError(
            f"block: the factory {factory_name(factory)} cannot be called with the arguments a model passes "
            f"({', '.join(arguments)}): {error}; bind its other arguments with functools.partial"
        ) from None
    return accepted


class UserBlock(nn.Module):
    """A user's block behind the paper's block interface: ``forward``, ``image``, ``head``, with checked logits.

    ``module`` is the user's ``nn.Module`` (its weights are under ``module.``). Without an
    ``image``/``head`` split, ``image(x)`` is ``x`` itself and ``head(x, z[, t])`` runs the whole block.
    """

    def __init__(self, module: nn.Module, num_classes: int, time_conditioned: bool, name: str = "block"):
        super().__init__()
        self.module = module
        self.num_classes = num_classes
        self.time_conditioned = time_conditioned
        self.name = name
        self.split = callable(getattr(module, "image", None)) and callable(getattr(module, "head", None))

    def _checked(self, logits: object, z: torch.Tensor) -> torch.Tensor:
        expected = [z.shape[0], self.num_classes]
        if isinstance(logits, torch.Tensor) and list(logits.shape) == expected:
            return logits
        got = f"shape {list(logits.shape)}" if isinstance(logits, torch.Tensor) else f"a {type(logits).__name__}"
        contract = "(x, z, t) -> logits" if self.time_conditioned else "(x, z) -> logits"
        raise ValueError(
            f"block: {self.name} returned {got}; the block contract is {contract} [B, num_classes] = {expected} "
            f"(see noprop.user_blocks)"
        )

    def image(self, x: torch.Tensor) -> torch.Tensor:
        """Image features (the block's ``image(x)``), or ``x`` itself for a block without the split."""
        return self.module.image(x) if self.split else x

    def head(self, features: torch.Tensor, z: torch.Tensor, *t: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` from :meth:`image`'s features, ``z [B, D]`` (and ``t [B]``)."""
        return self._checked(self.module.head(features, z, *t) if self.split else self.module(features, z, *t), z)

    def forward(self, x: torch.Tensor, z: torch.Tensor, *t: torch.Tensor) -> torch.Tensor:
        return self._checked(self.module(x, z, *t), z)


def build_blocks(factory: Callable, count: int, arguments: dict) -> list[UserBlock]:
    """``count`` blocks from ``factory`` (called with :func:`factory_arguments`), each in a :class:`UserBlock`.

    ``arguments`` holds :data:`FACTORY_ARGUMENTS`. Raises ``TypeError`` naming ``block`` if the
    factory returns something other than an ``nn.Module``.
    """
    factory = check_factory(factory)
    kwargs = factory_arguments(factory, arguments)
    name = factory_name(factory)
    blocks = []
    for _ in range(count):
        module = factory(**kwargs)
        if not isinstance(module, nn.Module):
            raise TypeError(f"block: the factory {name} returned a {type(module).__name__}, expected an nn.Module")
        blocks.append(UserBlock(module, arguments["num_classes"], arguments["time_conditioned"], name))
    return blocks


# ---------------------------------------------------------------------------------------------- FuncBlockStack


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor, parameter: bool) -> None:
    """Put ``value`` in the slot of parameter or buffer ``name`` (dotted) of ``module``, keeping its registration."""
    prefix, _, leaf = name.rpartition(".")
    owner = module.get_submodule(prefix)
    (owner._parameters if parameter else owner._buffers)[leaf] = value


class _Method(nn.Module):
    """Calls ``method`` of the wrapped module: ``torch.func.functional_call`` only calls ``forward``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, method: str, *args: torch.Tensor) -> torch.Tensor:
        return getattr(self.module, method)(*args)


def _check_same_blocks(blocks: list[nn.Module]) -> None:
    if not blocks:
        raise ValueError("blocks: expected at least one block")
    first = blocks[0]
    layout = [(k, v.shape, v.dtype, v.device) for k, v in first.state_dict(keep_vars=True).items()]
    for block in blocks[1:]:
        if type(block) is not type(first) or [(k, v.shape, v.dtype, v.device) for k, v in block.state_dict(keep_vars=True).items()] != layout:
            raise ValueError("blocks: expected blocks of one type with the same parameter and buffer names, shapes, dtypes and devices")
    for block in blocks:
        if len(list(block.named_parameters(remove_duplicate=False))) != len(list(block.named_parameters())):
            raise ValueError("block: a block whose modules share a parameter (tied weights) cannot be stacked; untie them")
    tensors = [id(t) for block in blocks for t in (*block.parameters(), *block.buffers())]
    if len(set(tensors)) != len(tensors):
        raise ValueError("block: the blocks share a parameter or buffer; every block must own its weights (build each one afresh)")


class FuncBlockStack(nn.Module):
    """T same-shaped blocks of any architecture run as one batched network through ``torch.func``.

    The interface of :class:`noprop.stack.BlockStack` and :class:`noprop.stack.BlockList`:
    ``forward(x, z [k, B, D], blocks) -> [k, B, C]``, ``image_features(x) -> [T, B, ...]``,
    ``head(t, features, z) -> [B, C]``, ``clip_grad_norm_``, ``from_blocks``/``to_blocks``.

    ``stacked`` is a copy of the first block whose every parameter and buffer holds all T blocks'
    values stacked along a new leading dimension (``[T, *shape]``, block-major: block t's values are
    row t; its state dict keys are the block's own). A call runs ``vmap`` over the blocks of
    ``functional_call(stacked, {name: tensor[t]}, ...)`` with ``randomness="different"`` (dropout
    masks independent per block); the images are shared (``in_dims=None``), which the batching
    rules turn into one convolution with ``T x`` the output channels, and the ``z`` of each block is
    its own. BatchNorm running statistics are rows of the stacked buffers, updated in place by each
    block's batch. See the module docstring for what a block must satisfy.

    Args:
        blocks: same-shaped modules (same type, parameter and buffer names, shapes, dtypes), each
            owning its weights; copied, not kept.
    """

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        _check_same_blocks(blocks)
        self.T = len(blocks)
        first = blocks[0]
        originals = {id(t): t for t in (*first.parameters(), *first.buffers())}
        stacked = copy.deepcopy(first, memo=dict(originals))  # the module tree; tensors replaced below
        with torch.no_grad():
            for name, p in first.named_parameters():
                value = torch.stack([b.get_parameter(name).detach() for b in blocks])
                _set_tensor(stacked, name, nn.Parameter(value, requires_grad=p.requires_grad), parameter=True)
            for name, _ in first.named_buffers():
                _set_tensor(stacked, name, torch.stack([b.get_buffer(name) for b in blocks]), parameter=False)
        self.stacked = stacked
        # calls stacked's methods under functional_call; kept out of the module tree (no second copy
        # of the weights in the state dict), built once (torch.compile does not trace a module built per call)
        self.__dict__["_caller"] = _Method(stacked)
        self.train(first.training)

    @classmethod
    def build(cls, T: int, factory: Callable, arguments: dict) -> "FuncBlockStack":
        """``T`` blocks from ``factory`` (see :func:`build_blocks`), stacked."""
        return cls(build_blocks(factory, check_positive_int("T", T), arguments))

    @classmethod
    def from_blocks(cls, blocks: list[nn.Module]) -> "FuncBlockStack":
        """Stack the parameters and buffers of same-shaped blocks (copies)."""
        return cls(blocks)

    def _named_tensors(self) -> list[tuple[str, torch.Tensor, bool]]:
        return [(n, p, True) for n, p in self.stacked.named_parameters()] + [(n, b, False) for n, b in self.stacked.named_buffers()]

    @torch.no_grad()
    def to_blocks(self) -> list[nn.Module]:
        """The T blocks as independent modules (copies of row t of every tensor; same device, dtype and mode)."""
        named = self._named_tensors()
        blocks = []
        for t in range(self.T):
            block = copy.deepcopy(self.stacked, memo={id(tensor): tensor for _, tensor, _ in named})
            for name, tensor, parameter in named:
                value = tensor[t].clone()
                _set_tensor(block, name, nn.Parameter(value, requires_grad=tensor.requires_grad) if parameter else value, parameter)
            blocks.append(block)
        return blocks

    def _state(self, index: slice | int) -> dict[str, torch.Tensor]:
        """``{"module." + name: tensor[index]}`` for :class:`_Method` (views: gradients and BatchNorm updates reach the stack)."""
        return {"module." + name: tensor[index] for name, tensor, _ in self._named_tensors()}

    def _vmapped(self, method: str, blocks: range, args: tuple, in_dims: tuple) -> torch.Tensor:
        caller = self._caller

        def one_block(state: dict, *inputs: torch.Tensor) -> torch.Tensor:
            return functional_call(caller, state, (method, *inputs))

        run = vmap(one_block, in_dims=(0, *in_dims), randomness="different")
        return run(self._state(slice(blocks.start, blocks.stop)), *args)

    def forward(self, x: torch.Tensor, z: torch.Tensor, blocks: range | None = None) -> torch.Tensor:
        """Every block's logits at once: ``logits[j] = block_t(x, z[j])`` for ``t = blocks[j]``; ``[k, B, C]``.

        Args: as :meth:`noprop.stack.BlockStack.forward` (``x`` shared, ``z [k, B, D]``, a range of blocks).
        """
        blocks = check_block_inputs(blocks, self.T, z)
        return self._vmapped("forward", blocks, (x, z), (None, 0))

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """Every block's ``image(x)``, ``[T, B, ...]`` (for a block without the split, ``x`` broadcast: a view)."""
        return self._vmapped("image", range(self.T), (x,), (None,))

    def head(self, t: int, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Block ``t``'s logits ``[B, C]`` from its image features ``features[t]`` and ``z [B, D]`` (one block, no vmap)."""
        return functional_call(self._caller, self._state(t), ("head", features[t], z))

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip each block's gradient norm to ``max_norm`` separately; returns the norms ``[T]`` before clipping."""
        gradients = [p.grad for p in self.parameters() if p.grad is not None]
        if not gradients:
            return torch.zeros(self.T, device=next(self.parameters()).device)
        return clip_per_block_(gradients, self.T, max_norm)
