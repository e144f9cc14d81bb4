"""The collectives a parallel training step makes, each counted by a :class:`CommMeter`, and the
BatchNorm whose statistics span every rank's rows.

What a step communicates (payload: the bytes of the tensors handed to the collectives; a ring
all-reduce moves ``2 (W - 1) / W`` times its payload in and out of every rank):

* blocks mode: one all-reduce of the shared parameters' gradients (:func:`all_reduce_gradients`);
* data mode: DistributedDataParallel's all-reduce of every parameter's gradient (counted by
  :func:`counting_allreduce_hook`), plus, for every BatchNorm layer in training mode, two
  all-reduces forward and two backward (:func:`sync_batch_norm`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from noprop.stacked_layers import StackedBatchNorm


@dataclass
class CommMeter:
    """Payload bytes and calls of the collectives counted so far, by kind (``"gradients"``, ``"batch_norm"``, ...)."""

    bytes: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, tensor: torch.Tensor) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + tensor.numel() * tensor.element_size()
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def total(self) -> int:
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()


def all_reduce_gradients(parameters: list[nn.Parameter], group=None, meter: CommMeter | None = None) -> None:
    """Sum the gradients of ``parameters`` over the ranks of ``group``, in one all-reduce per dtype.

    A parameter without a gradient on this rank contributes zeros (and gets the sum). Every rank
    must pass the same parameters in the same order.
    """
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in parameters:
        by_dtype.setdefault(p.dtype, []).append(p)
    for dtype, same in by_dtype.items():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in same])
        dist.all_reduce(flat, group=group)
        if meter is not None:
            meter.add("gradients", flat)
        offset = 0
        for p in same:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()


def counting_allreduce_hook(meter, bucket):  # no annotations: DDP compares them with dist.GradBucket itself
    """A DistributedDataParallel communication hook: the default averaging all-reduce of ``bucket``
    (a ``dist.GradBucket``), counted in ``meter`` (a :class:`CommMeter`); returns its future."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    meter.add("gradients", bucket.buffer())
    return allreduce_hook(None, bucket)


class _AllReduceSum(torch.autograd.Function):
    """``y = sum over ranks of x``; the gradient of every rank's ``x`` is the sum of every rank's gradient of ``y``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, meter: CommMeter | None) -> torch.Tensor:
        ctx.group, ctx.meter = group, meter
        y = x.clone()
        dist.all_reduce(y, group=group)
        if meter is not None:
            meter.add("batch_norm", y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        if ctx.meter is not None:
            ctx.meter.add("batch_norm", grad)
        return grad, None, None


def sync_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    momentum: float,
    eps: float,
    group=None,
    meter: CommMeter | None = None,
) -> torch.Tensor:
    """Training-mode BatchNorm of ``x [N, C, *]`` with the statistics of every rank's rows together.

    ``mean = sum_ranks sum x / n`` and ``var = sum_ranks sum (x - mean)^2 / n`` (``n`` the rows of
    all ranks times the spatial size; the two-pass variance, as ``F.batch_norm``), so the output
    and, through the all-reduces' backward, the gradients equal BatchNorm on the concatenated
    batch. The running statistics move by ``momentum`` towards ``mean`` and the unbiased
    ``var * n / (n - 1)``, as in PyTorch. Computed in float32; returns float32 ``[N, C, *]``.
    """
    x = x.float()  # as F.batch_norm under autocast
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    local = torch.cat([x.sum(dims), x.new_full((1,), x.numel() // x.shape[1])])
    total = _AllReduceSum.apply(local, group, meter)
    n = total[-1]
    mean = total[:-1] / n
    centered = x - mean.view(shape)
    var = _AllReduceSum.apply(centered.square().sum(dims), group, meter) / n
    out = centered * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        out = out * weight.view(shape) + bias.view(shape)
    if running_mean is not None:
        with torch.no_grad():
            running_mean.lerp_(mean.detach().to(running_mean.dtype), momentum)
            running_var.lerp_((var.detach() * n / (n - 1)).to(running_var.dtype), momentum)
    return out


def _momentum(norm: nn.modules.batchnorm._BatchNorm) -> float:
    """The running statistics' update factor of this call (``momentum``, or the cumulative ``1 / steps``)."""
    if norm.momentum is not None:
        return norm.momentum
    return 1.0 / float(norm.num_batches_tracked)


class _SyncedBatchNorm:
    """Mixin of the synchronised BatchNorm classes: ``sync_group`` and ``sync_meter`` are set by :func:`synchronise_batch_norm`."""

    sync_group = None
    sync_meter: CommMeter | None = None


class SyncedStackedBatchNorm(_SyncedBatchNorm, StackedBatchNorm):
    """:class:`noprop.stacked_layers.StackedBatchNorm` whose training statistics span every rank's rows."""

    original_class = StackedBatchNorm

    def forward(self, x: torch.Tensor, blocks: range) -> torch.Tensor:  # type: ignore[override]
        if not self.training:
            return super().forward(x, blocks)
        k, batch, features = x.shape
        lo, hi = blocks.start * features, blocks.stop * features
        flat = x.permute(1, 0, 2).reshape(batch, k * features)
        self.num_batches_tracked.add_(1)
        out = sync_batch_norm(
            flat, self.running_mean[lo:hi], self.running_var[lo:hi], self.weight[lo:hi], self.bias[lo:hi],
            _momentum(self), self.eps, self.sync_group, self.sync_meter,
        )
        return out.reshape(batch, k, features).permute(1, 0, 2)


def _synced_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not self.training:
        return self.original_class.forward(self, x)
    self._check_input_dim(x)
    if self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
    return sync_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, _momentum(self), self.eps, self.sync_group, self.sync_meter)


_SYNCED: dict[type, type] = {StackedBatchNorm: SyncedStackedBatchNorm}


def synchronise_batch_norm(model: nn.Module, group=None, meter: CommMeter | None = None) -> int:
    """Make every BatchNorm layer of ``model`` normalise with the statistics of all ranks of ``group``, in place.

    Each layer keeps its parameters, buffers and state-dict keys; only its class changes (to a
    subclass whose training-mode forward calls :func:`sync_batch_norm`; evaluation is unchanged).
    ``torch.nn.SyncBatchNorm`` would do this on GPUs only; this one runs on any device and backend.

    Returns:
        The number of layers changed.
    """
    changed = 0
    for module in model.modules():
        cls = type(module)
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or isinstance(module, _SyncedBatchNorm):
            continue
        if cls not in _SYNCED:
            _SYNCED[cls] = type(f"Synced{cls.__name__}", (_SyncedBatchNorm, cls), {"forward": _synced_forward, "original_class": cls})
        module.__class__ = _SYNCED[cls]
        module.sync_group, module.sync_meter = group, meter
        changed += 1
    return changed


def unsynchronise_batch_norm(model: nn.Module) -> None:
    """Undo :func:`synchronise_batch_norm` in place (each layer back to its own class, which normalises locally)."""
    for module in model.modules():
        if isinstance(module, _SyncedBatchNorm):
            module.__class__ = module.original_class
            del module.sync_group, module.sync_meter


def has_batch_norm(module: nn.Module) -> bool:
    """Does ``module`` hold a BatchNorm layer?"""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())

