"""Containers of the T same-shaped DT blocks: ``BlockStack`` (one wide network) and ``BlockList``.

The T blocks of NoProp-DT have the same shape and read the same images, so ``BlockStack`` runs
them as one network whose every layer covers all blocks at once (DESIGN section 4):

* the first convolution has ``T * c1`` output channels (its input is shared);
* later convolutions are grouped (``groups = T``), in ``channels_last`` memory format;
* fully connected layers are batched matrix products over a leading T dimension;
* BatchNorm of every block is one BatchNorm over ``T * features`` channels;
* dropout masks are drawn per element, so independently for every block.

Summing the blocks' losses and calling backward once gives every block exactly the gradient it
would get alone (the parameters are disjoint), and the number of kernels per step does not grow
with T. ``BlockList`` holds T independent :class:`noprop.blocks.DTBlock` modules and runs them one
after another (the paper's per-block schedule, and the oracle of the parity tests).
``BlockStack.from_blocks`` / ``to_blocks`` convert between the two exactly.

Both containers have the same interface, so a model does not care which it holds:

* ``forward(x [B, C_in, H, W], z [k, B, D], blocks=range(k0, k0 + k)) -> logits [k, B, C]``:
  block ``blocks[j]`` reads ``z[j]``; ``blocks`` defaults to all T.
* ``image_features(x) -> [T, B, hidden]``: every block's image path (independent of ``z``, so
  inference computes it once).
* ``head(t, features, z [B, D]) -> [B, C]``: block ``t``'s label path and fusion layers.
* ``clip_grad_norm_(max_norm)``: clip every block's gradient norm separately (a global norm over
  all blocks would couple them); returns the per-block norms ``[T]``.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from noprop import ops
from noprop.blocks import BlockConfig, DTBlock, feature_map_size
from noprop.validation import check_choice, check_positive_int


def check_block_range(blocks: range | None, T: int) -> range:
    """``blocks`` (a range of consecutive block indices within ``[0, T)``) or ``range(T)`` for None."""
    if blocks is None:
        return range(T)
    if not isinstance(blocks, range) or blocks.step != 1 or not 0 <= blocks.start < blocks.stop <= T:
        raise ValueError(f"blocks: expected a non-empty range of consecutive block indices within [0, {T}), got {blocks!r}")
    return blocks


def check_block_inputs(blocks: range | None, T: int, z: torch.Tensor) -> range:
    """:func:`check_block_range`, then ``z``'s shape: one latent ``[B, D]`` per block in the range."""
    blocks = check_block_range(blocks, T)
    if z.dim() != 3 or z.shape[0] != len(blocks):
        raise ValueError(f"z: expected [{len(blocks)}, B, D] (one latent per block), got shape {list(z.shape)}")
    return blocks


def clip_per_block_(gradients: list[torch.Tensor], T: int, max_norm: float) -> torch.Tensor:
    """Scale block t's gradients so their joint norm is at most ``max_norm``, for every block t.

    Every tensor in ``gradients`` has a leading dimension of ``T * n`` laid out block-major (rows
    ``t * n .. (t + 1) * n`` belong to block t). Returns the per-block norms ``[T]`` before
    clipping. No host synchronisation: the scale stays a tensor.
    """
    blocks = [g.unflatten(0, (T, -1)) for g in gradients]
    norms = sum(b.float().square().flatten(1).sum(dim=1) for b in blocks).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for b in blocks:
        b.mul_(scale.to(b.dtype).view(T, *([1] * (b.dim() - 1))))
    return norms


class StackedLinear(nn.Module):
    """T independent linear layers as one batched product: ``y[t] = x[t] @ weight[t] + bias[t]``.

    Shapes: ``x [k, B, in]`` for the blocks ``blocks`` (default all T), ``weight [T, in, out]``,
    ``bias [T, out]``; returns ``[k, B, out]``. Runs :func:`noprop.ops.stacked_linear` on the
    backend in the attribute ``backend`` (``"auto"``, ``"reference"`` or ``"triton"``; not part of
    the state dict), which a model may set after construction.
    """

    def __init__(self, T: int, in_features: int, out_features: int, backend: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(T, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(T, out_features))
        self.backend = check_choice("backend", backend, ("auto",) + ops.STACKED_LINEAR_BACKENDS)
        self.load_linears([nn.Linear(in_features, out_features) for _ in range(T)])  # nn.Linear's init, per block

    def forward(self, x: torch.Tensor, blocks: range) -> torch.Tensor:
        """``x [k, B, in]`` through the layers of ``blocks`` (``k = len(blocks)``): ``[k, B, out]``."""
        weight = self.weight[blocks.start : blocks.stop]
        bias = self.bias[blocks.start : blocks.stop]
        return ops.stacked_linear(x, weight, bias, backend=self.backend)

    @torch.no_grad()
    def load_linears(self, linears: list[nn.Linear]) -> None:
        """Copy the weights of T ``nn.Linear`` layers (``weight [out, in]``) into the stack."""
        self.weight.copy_(torch.stack([layer.weight.t() for layer in linears]))
        self.bias.copy_(torch.stack([layer.bias for layer in linears]))

    @torch.no_grad()
    def store_linears(self, linears: list[nn.Linear]) -> None:
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
        use_batch_stats = self.training or self.running_mean is None
        if self.training:
            self.num_batches_tracked.add_(1)
        out = F.batch_norm(
            flat,
            self.running_mean[lo:hi],
            self.running_var[lo:hi],
            self.weight[lo:hi],
            self.bias[lo:hi],
            use_batch_stats,
            self.momentum,
            self.eps,
        )
        return out.reshape(batch, k, features).permute(1, 0, 2)


class BlockStack(nn.Module):
    """T DT blocks with stacked parameters, run as one wide network (see the module docstring).

    Every layer is initialised as in T separate ``DTBlock`` modules. ``from_blocks`` copies given
    blocks instead.
    """

    def __init__(self, T: int, num_classes: int, in_channels: int, image_size: int, embed_dim: int, config: BlockConfig):
        super().__init__()
        self.T = check_positive_int("T", T)
        self.config = config
        self.dims = dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size, embed_dim=embed_dim)
        c1, c2, c3 = config.conv_channels
        hidden, (f1, f2) = config.hidden, config.fusion
        self.channels = (c1, c2, c3)
        self.conv1 = nn.Conv2d(in_channels, T * c1, 3, padding=1)
        self.conv2 = nn.Conv2d(T * c1, T * c2, 3, padding=1, groups=T)
        self.conv3 = nn.Conv2d(T * c2, T * c3, 3, padding=1, groups=T)
        self.dropout = nn.Dropout(config.dropout)
        self.image_fc = StackedLinear(T, c3 * feature_map_size(image_size) ** 2, hidden)
        self.image_bn = StackedBatchNorm(T, hidden)
        self.label_fc1 = StackedLinear(T, embed_dim, hidden)
        self.label_bn1 = StackedBatchNorm(T, hidden)
        self.label_fc2 = StackedLinear(T, hidden, hidden)
        self.label_bn2 = StackedBatchNorm(T, hidden)
        self.fuse_fc1 = StackedLinear(T, 2 * hidden, f1)
        self.fuse_bn1 = StackedBatchNorm(T, f1)
        self.fuse_fc2 = StackedLinear(T, f1, f2)
        self.fuse_bn2 = StackedBatchNorm(T, f2)
        self.out = StackedLinear(T, f2, num_classes)
        self.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------------------------------ conversion

    @classmethod
    def build(
        cls, T: int, num_classes: int, in_channels: int, image_size: int, embed_dim: int, config: BlockConfig
    ) -> "BlockStack":
        """A stack of ``T`` freshly initialised blocks (the constructor; named like ``BlockList.build``)."""
        return cls(T, num_classes, in_channels, image_size, embed_dim, config)

    @classmethod
    @torch.no_grad()
    def from_blocks(cls, blocks: list[DTBlock]) -> "BlockStack":
        """Stack the parameters and BatchNorm statistics of same-shaped ``DTBlock`` modules."""
        if not blocks:
            raise ValueError("blocks: expected at least one DTBlock")
        first = blocks[0]
        if any(b.dims != first.dims or b.config != first.config for b in blocks):
            raise ValueError("blocks: expected DTBlock modules built with the same arguments")
        stack = cls(len(blocks), config=first.config, **first.dims).to(first.out.weight.device)
        for name in ("conv1", "conv2", "conv3"):
            getattr(stack, name).weight.copy_(torch.cat([getattr(b.image, name).weight for b in blocks]))
            getattr(stack, name).bias.copy_(torch.cat([getattr(b.image, name).bias for b in blocks]))
        for stacked_name, (module_path, attribute) in _LINEAR_LAYERS.items():
            getattr(stack, stacked_name).load_linears([_resolve(b, module_path, attribute) for b in blocks])
        for stacked_name, (module_path, attribute) in _BATCH_NORMS.items():
            norms = [_resolve(b, module_path, attribute) for b in blocks]
            target = getattr(stack, stacked_name)
            for field in ("weight", "bias", "running_mean", "running_var"):
                getattr(target, field).copy_(torch.cat([getattr(n, field) for n in norms]))
            target.num_batches_tracked.copy_(norms[0].num_batches_tracked)
        return stack

    @torch.no_grad()
    def to_blocks(self) -> list[DTBlock]:
        """The T blocks as independent ``DTBlock`` modules (copies; same device and dtype)."""
        dims = self.dims
        device = self.conv1.weight.device
        blocks = [
            DTBlock(dims["num_classes"], dims["in_channels"], dims["image_size"], dims["embed_dim"], self.config).to(device)
            for _ in range(self.T)
        ]
        for name, channels in zip(("conv1", "conv2", "conv3"), self.channels):
            stacked = getattr(self, name)
            for t, block in enumerate(blocks):
                rows = slice(t * channels, (t + 1) * channels)
                getattr(block.image, name).weight.copy_(stacked.weight[rows])
                getattr(block.image, name).bias.copy_(stacked.bias[rows])
        for stacked_name, (module_path, attribute) in _LINEAR_LAYERS.items():
            getattr(self, stacked_name).store_linears([_resolve(b, module_path, attribute) for b in blocks])
        for stacked_name, (module_path, attribute) in _BATCH_NORMS.items():
            source = getattr(self, stacked_name)
            width = source.features
            for t, block in enumerate(blocks):
                norm = _resolve(block, module_path, attribute)
                for field in ("weight", "bias", "running_mean", "running_var"):
                    getattr(norm, field).copy_(getattr(source, field)[t * width : (t + 1) * width])
                norm.num_batches_tracked.copy_(source.num_batches_tracked)
        for block in blocks:
            block.train(self.training)
        return blocks

    # ------------------------------------------------------------------------------------------ forward

    def _conv(self, x: torch.Tensor, conv: nn.Conv2d, channels: int, blocks: range, groups: int) -> torch.Tensor:
        rows = slice(blocks.start * channels, blocks.stop * channels)
        out = F.conv2d(x, conv.weight[rows], conv.bias[rows], padding=1, groups=groups)
        return self.dropout(F.relu(F.max_pool2d(out, 2)))  # pool first, as in DTBlock's ImageEncoder

    def _image_features(self, x: torch.Tensor, blocks: range) -> torch.Tensor:
        k = len(blocks)
        h = x.contiguous(memory_format=torch.channels_last)
        h = self._conv(h, self.conv1, self.channels[0], blocks, groups=1)
        h = self._conv(h, self.conv2, self.channels[1], blocks, groups=k)
        h = self._conv(h, self.conv3, self.channels[2], blocks, groups=k)
        batch = h.shape[0]
        # [B, k * c3, s, s] -> [k, B, c3 * s * s]: each block's features flattened channel-major, as in DTBlock
        h = h.reshape(batch, k, -1).transpose(0, 1)
        return F.relu(self.image_bn(self.image_fc(h, blocks), blocks))

    def _head(self, features: torch.Tensor, z: torch.Tensor, blocks: range) -> torch.Tensor:
        label = F.relu(self.label_bn1(self.label_fc1(z, blocks), blocks))
        label = F.relu(self.label_bn2(self.label_fc2(label, blocks), blocks) + label)
        h = torch.cat([features, label], dim=-1)
        h = F.relu(self.fuse_bn1(self.fuse_fc1(h, blocks), blocks))
        h = F.relu(self.fuse_bn2(self.fuse_fc2(h, blocks), blocks))
        return self.out(h, blocks)

    def forward(self, x: torch.Tensor, z: torch.Tensor, blocks: range | None = None) -> torch.Tensor:
        """Every block's logits at once: ``logits[j] = block_t(x, z[j])`` for ``t = blocks[j]``.

        Args:
            x: images ``[B, C_in, H, W]``, shared by all blocks.
            z: one noised latent per block, ``[k, B, D]`` with ``k = len(blocks)``.
            blocks: a range of consecutive block indices (default all T).
        Returns:
            ``[k, B, num_classes]``.
        """
        blocks = check_block_inputs(blocks, self.T, z)
        return self._head(self._image_features(x, blocks), z, blocks)

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """Every block's image features, for inference: ``[T, B, hidden]`` from ``x [B, C_in, H, W]``."""
        return self._image_features(x, range(self.T))

    def head(self, t: int, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Block ``t``'s logits ``[B, num_classes]`` from its image features ``features[t]`` and ``z [B, D]``."""
        return self._head(features[t : t + 1], z.unsqueeze(0), range(t, t + 1))[0]

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip each block's gradient norm to ``max_norm`` separately; returns the norms ``[T]`` before clipping."""
        gradients = [p.grad for p in self.parameters() if p.grad is not None]
        if not gradients:
            return torch.zeros(self.T, device=self.conv1.weight.device)
        return clip_per_block_(gradients, self.T, max_norm)


_LINEAR_LAYERS = {  # BlockStack attribute: (path in DTBlock, attribute)
    "image_fc": ("image", "fc"),
    "label_fc1": ("", "label_fc1"),
    "label_fc2": ("", "label_fc2"),
    "fuse_fc1": ("", "fuse_fc1"),
    "fuse_fc2": ("", "fuse_fc2"),
    "out": ("", "out"),
}
_BATCH_NORMS = {
    "image_bn": ("image", "bn"),
    "label_bn1": ("", "label_bn1"),
    "label_bn2": ("", "label_bn2"),
    "fuse_bn1": ("", "fuse_bn1"),
    "fuse_bn2": ("", "fuse_bn2"),
}


def _resolve(block: DTBlock, module_path: str, attribute: str) -> nn.Module:
    owner = getattr(block, module_path) if module_path else block
    return getattr(owner, attribute)


class BlockList(nn.Module):
    """T independent DT blocks, run one after another.

    Args:
        blocks: the ``DTBlock`` modules, all built with the same arguments.
    """

    def __init__(self, blocks: list[DTBlock]):
        super().__init__()
        if not blocks:
            raise ValueError("blocks: expected at least one DTBlock")
        self.blocks = nn.ModuleList(blocks)

    @classmethod
    def build(
        cls, T: int, num_classes: int, in_channels: int, image_size: int, embed_dim: int, config: BlockConfig
    ) -> "BlockList":
        """``T`` freshly initialised blocks."""
        check_positive_int("T", T)
        return cls([DTBlock(num_classes, in_channels, image_size, embed_dim, config) for _ in range(T)])

    @property
    def T(self) -> int:
        """Number of blocks."""
        return len(self.blocks)

    def forward(self, x: torch.Tensor, z: torch.Tensor, blocks: range | None = None) -> torch.Tensor:
        """:meth:`BlockStack.forward`'s contract (``[k, B, num_classes]``), one block after another."""
        blocks = check_block_inputs(blocks, self.T, z)
        return torch.stack([self.blocks[t](x, z[j]) for j, t in enumerate(blocks)])

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """Every block's image features, for inference: ``[T, B, hidden]`` from ``x [B, C_in, H, W]``."""
        return torch.stack([block.image(x) for block in self.blocks])

    def head(self, t: int, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Block ``t``'s logits ``[B, num_classes]`` from its image features ``features[t]`` and ``z [B, D]``."""
        return self.blocks[t].head(features[t], z)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip each block's gradient norm to ``max_norm`` separately; returns the norms ``[T]`` before clipping."""
        norms = []
        for block in self.blocks:
            gradients = [p.grad.unsqueeze(0) for p in block.parameters() if p.grad is not None]
            if gradients:
                norms.append(clip_per_block_(gradients, 1, max_norm)[0])
            else:
                norms.append(torch.zeros((), device=next(block.parameters()).device))
        return torch.stack(norms)
