"""T same-shaped layers with stacked parameters, run for a range of blocks in one call.

The leaves :class:`noprop.stack.BlockStack` is built from. Each holds the parameters of T
independent PyTorch layers and takes ``blocks`` (a range of consecutive block indices) so a model
can run all blocks, one block, or a chunk:

* :class:`StackedLinear`: ``y[j] = x[j] @ weight[t] + bias[t]`` for ``t = blocks[j]`` (batched matmul).
* :class:`StackedBatchNorm`: T ``BatchNorm1d`` as one BatchNorm over ``T * features`` channels.
* :class:`StackedConv2d`: T 3x3 convolutions as one convolution with ``T * out`` channels: a
  shared input (the image, read by every block) or a grouped one (``groups = k``, block ``j``'s
  channels in group ``j``).

Every leaf copies from and to a list of the T PyTorch layers it replaces (``load`` / ``store``),
which is how a stack converts to and from independent blocks exactly.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from noprop import backends, ops


def check_backend(backend: str) -> str:
    """``backend`` if it is ``"auto"`` or a registered backend that has ``stacked_linear``, else ``ValueError``."""
    backend = backends.canonical(backend, allow_auto=True)
    if backend != "auto" and "stacked_linear" in backends.get(backend).lacks:
        raise ValueError(f"backend: {backend!r} has no stacked_linear ({backends.get(backend).lacks['stacked_linear']})")
    return backend


def set_backend(module: nn.Module, backend: str) -> None:
    """Run every fused layer inside ``module`` on the backend a model set to ``backend`` uses for its op.

    A fused layer declares its op in the class attribute ``FUSED_OP`` (:class:`StackedLinear`:
    ``stacked_linear``; the conv paths: ``conv_epilogue``) and reads its attribute ``backend``; it
    gets ``backend`` itself, or the reference where that backend lacks the op (:func:`noprop.backends.for_op`).
    """
    for layer in module.modules():
        op = getattr(type(layer), "FUSED_OP", None)
        if op is not None:
            layer.backend = backends.for_op(backend, op)


class StackedLinear(nn.Module):
    """T independent linear layers as one batched product: ``y[j] = x[j] @ weight[t] + bias[t]``, ``t = blocks[j]``.

    Shapes: ``x [k, B, in]`` for the blocks ``blocks`` (``k = len(blocks)``), ``weight [T, in, out]``,
    ``bias [T, out]``; returns ``[k, B, out]``. Runs :func:`noprop.ops.stacked_linear` on the
    backend in the attribute ``backend`` (``"auto"`` or a backend that has the op; not part of the
    state dict). A model sets it to its own backend (:func:`set_backend`).
    """

    FUSED_OP = "stacked_linear"

    def __init__(self, T: int, in_features: int, out_features: int, backend: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(T, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(T, out_features))
        self.backend = check_backend(backend)
        self.load([nn.Linear(in_features, out_features) for _ in range(T)])  # nn.Linear's init, per block

    def forward(self, x: torch.Tensor, blocks: range) -> torch.Tensor:
        """``x [k, B, in]`` through the layers of ``blocks``: ``[k, B, out]``."""
        weight = self.weight[blocks.start : blocks.stop]
        bias = self.bias[blocks.start : blocks.stop]
        return ops.stacked_linear(x, weight, bias, backend=self.backend)

    @torch.no_grad()
    def load(self, linears: list[nn.Linear]) -> None:
        """Copy the weights of T ``nn.Linear`` layers (``weight [out, in]``) into the stack."""
        self.weight.copy_(torch.stack([layer.weight.t() for layer in linears]))
        self.bias.copy_(torch.stack([layer.bias for layer in linears]))

    @torch.no_grad()
    def store(self, linears: list[nn.Linear]) -> None:
        """Copy the stack's weights back into T ``nn.Linear`` layers."""
        for t, layer in enumerate(linears):
            layer.weight.copy_(self.weight[t].t())
            layer.bias.copy_(self.bias[t])


class StackedBatchNorm(nn.BatchNorm1d):
    """T BatchNorms over ``features`` each, as one BatchNorm over ``T * features`` channels.

    ``x [k, B, features]`` for the blocks ``blocks``; channel ``t * features + f`` is block t's
    feature f, so the running statistics of block t are a contiguous slice.
    """

    def __init__(self, T: int, features: int):
        super().__init__(T * features)
        self.T = T
        self.features = features

    def forward(self, x: torch.Tensor, blocks: range) -> torch.Tensor:  # type: ignore[override]
        """Normalise ``x [k, B, features]`` with the statistics and affine slices of ``blocks``; same shape."""
        k, batch, features = x.shape
        lo, hi = blocks.start * features, blocks.stop * features
        flat = x.permute(1, 0, 2).reshape(batch, k * features)
        if self.training:
            self.num_batches_tracked.add_(1)
        out = F.batch_norm(
            flat,
            self.running_mean[lo:hi],
            self.running_var[lo:hi],
            self.weight[lo:hi],
            self.bias[lo:hi],
            self.training,
            self.momentum,
            self.eps,
        )
        return out.reshape(batch, k, features).permute(1, 0, 2)

    @torch.no_grad()
    def load(self, norms: list[nn.BatchNorm1d]) -> None:
        """Copy the affine parameters and running statistics of T ``BatchNorm1d`` into the stack."""
        for field in ("weight", "bias", "running_mean", "running_var"):
            getattr(self, field).copy_(torch.cat([getattr(n, field) for n in norms]))
        self.num_batches_tracked.copy_(norms[0].num_batches_tracked)

    @torch.no_grad()
    def store(self, norms: list[nn.BatchNorm1d]) -> None:
        """Copy the stack's slices back into T ``BatchNorm1d``."""
        width = self.features
        for t, norm in enumerate(norms):
            for field in ("weight", "bias", "running_mean", "running_var"):
                getattr(norm, field).copy_(getattr(self, field)[t * width : (t + 1) * width])
            norm.num_batches_tracked.copy_(self.num_batches_tracked)


class StackedConv2d(nn.Module):
    """T 3x3 convolutions (padding 1) as one: ``weight [T * out, in, 3, 3]``, block t's filters in rows ``t * out ..``.

    ``shared_input``: the input ``[B, in, H, W]`` is read by every block (one convolution with
    ``k * out`` output channels). Otherwise block ``j`` of the range reads channels
    ``j * in .. (j + 1) * in`` of ``[B, k * in, H, W]`` (a grouped convolution, ``groups = k``).
    Returns ``[B, k * out, H, W]`` either way.
    """

    def __init__(self, T: int, in_channels: int, out_channels: int, shared_input: bool):
        super().__init__()
        self.out_channels = out_channels
        self.shared_input = shared_input
        self.weight = nn.Parameter(torch.empty(T * out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.empty(T * out_channels))
        self.load([nn.Conv2d(in_channels, out_channels, 3, padding=1) for _ in range(T)])  # Conv2d's init, per block

    def forward(self, x: torch.Tensor, blocks: range) -> torch.Tensor:
        rows = slice(blocks.start * self.out_channels, blocks.stop * self.out_channels)
        groups = 1 if self.shared_input else len(blocks)
        return F.conv2d(x, self.weight[rows], self.bias[rows], padding=1, groups=groups)

    @torch.no_grad()
    def load(self, convs: list[nn.Conv2d]) -> None:
        """Copy the filters of T ``nn.Conv2d`` into the stack."""
        self.weight.copy_(torch.cat([conv.weight for conv in convs]))
        self.bias.copy_(torch.cat([conv.bias for conv in convs]))

    @torch.no_grad()
    def store(self, convs: list[nn.Conv2d]) -> None:
        """Copy the stack's filters back into T ``nn.Conv2d``."""
        n = self.out_channels
        for t, conv in enumerate(convs):
            conv.weight.copy_(self.weight[t * n : (t + 1) * n])
            conv.bias.copy_(self.bias[t * n : (t + 1) * n])


STACKED_LEAVES = (StackedLinear, StackedBatchNorm, StackedConv2d)
