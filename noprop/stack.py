"""Containers of the T same-shaped DT blocks: ``BlockStack`` (one wide network) and ``BlockList``.

The T blocks of NoProp-DT have the same shape and read the same images, so ``BlockStack`` runs
them as one network whose every layer covers all blocks at once:

* the image path's first convolution has ``T * c1`` output channels (its input is shared);
* later convolutions, and every convolution of a prototype label path (each block reads its own
  ``z`` as an image), are grouped (``groups = T``), in ``channels_last`` memory format;
* fully connected layers are batched matrix products over a leading T dimension;
* BatchNorm of every block is one BatchNorm over ``T * features`` channels;
* every conv stage's tail is one :func:`noprop.ops.conv_epilogue` over all blocks' channels, whose
  counter-based dropout masks are keyed by the global block index: block t draws the mask it
  draws alone (:class:`noprop.blocks.DropoutKey`), so training is the same, dropout on, as T
  independent blocks.

Summing the blocks' losses and calling backward once gives every block exactly the gradient it
would get alone (the parameters are disjoint), and the number of kernels per step does not grow
with T. The stacked layers themselves live in :mod:`noprop.stacked_layers`. ``BlockList`` holds T independent :class:`noprop.blocks.DTBlock` modules and runs them one
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

from noprop.blocks import (
    IMAGE_STREAMS,
    LABEL_STREAMS,
    POOLED_STAGES,
    BlockConfig,
    DropoutKey,
    DTBlock,
    active_dropout_key,
    check_block_arguments,
    conv_stage_tail,
    flat_features,
    label_image,
)
from noprop.stacked_layers import STACKED_LEAVES, StackedBatchNorm, StackedConv2d, StackedLinear
from noprop.validation import check_positive_int


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


class StackedConvPath(nn.Module):
    """T :class:`noprop.blocks.ConvPath` at once: ``[k, B, hidden]`` for the blocks ``blocks``.

    ``shared_input``: every block reads the same images ``x [B, C_in, H, W]`` (the image path).
    Otherwise block ``j`` reads its own ``x[j]`` from ``[k, B, C_in * H * W]`` viewed as images
    (the prototype label path, dropout sites from :data:`noprop.blocks.LABEL_STREAMS`).
    Convolutions run in ``channels_last``; the last epilogue writes NCHW, so each block's
    flattened features are a strided view that the stacked FC reads without a copy.
    """

    FUSED_OP = "conv_epilogue"

    def __init__(self, T: int, in_channels: int, image_size: int, config: BlockConfig, batch_norm: bool, shared_input: bool):
        super().__init__()
        c1, c2, c3 = config.conv_channels
        self.in_channels, self.image_size = in_channels, image_size
        self.shared_input = shared_input
        self.conv1 = StackedConv2d(T, in_channels, c1, shared_input=shared_input)
        self.conv2 = StackedConv2d(T, c1, c2, shared_input=False)
        self.conv3 = StackedConv2d(T, c2, c3, shared_input=False)
        self.fc = StackedLinear(T, flat_features(config, image_size), config.hidden)
        self.bn = StackedBatchNorm(T, config.hidden) if batch_norm else None
        self.dropout = config.dropout
        self.first_stream = IMAGE_STREAMS if shared_input else LABEL_STREAMS
        self.backend = "auto"
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, blocks: range, dropout_key: DropoutKey | None = None) -> torch.Tensor:
        k = len(blocks)
        if not self.shared_input:  # [k, B, C*H*W] -> [B, k*C, H, W]: block j's image in channel group j
            x = label_image(x.transpose(0, 1), self.in_channels, self.image_size).flatten(1, 2)
        h = x.contiguous(memory_format=torch.channels_last)
        key = active_dropout_key(dropout_key, self.training, self.dropout, x.device)
        last = len(POOLED_STAGES) - 1
        for stage, conv in enumerate((self.conv1, self.conv2, self.conv3)):
            h = conv_stage_tail(
                conv(h, blocks), stage, self.dropout, key, first_block=blocks.start, blocks=k,
                first_stream=self.first_stream, contiguous_output=stage == last, backend=self.backend,
            )
        # [B, k * c3, s, s] -> [k, B, c3 * s * s]: each block's features flattened channel-major, as in ConvPath
        h = self.fc(h.reshape(h.shape[0], k, -1).transpose(0, 1), blocks)
        return self.bn(h, blocks) if self.bn is not None else F.relu(h)


class StackedResidualLabelPath(nn.Module):
    """T :class:`noprop.blocks.ResidualLabelPath` at once: ``z [k, B, D] -> [k, B, hidden]``."""

    def __init__(self, T: int, embed_dim: int, hidden: int):
        super().__init__()
        self.fc1 = StackedLinear(T, embed_dim, hidden)
        self.bn1 = StackedBatchNorm(T, hidden)
        self.fc2 = StackedLinear(T, hidden, hidden)
        self.bn2 = StackedBatchNorm(T, hidden)
        self.fc3 = StackedLinear(T, hidden, hidden)
        self.bn3 = StackedBatchNorm(T, hidden)

    def forward(self, z: torch.Tensor, blocks: range) -> torch.Tensor:
        h = F.relu(self.bn1(self.fc1(z, blocks), blocks))
        return h + self.bn3(self.fc3(F.relu(self.bn2(self.fc2(h, blocks), blocks)), blocks), blocks)


class StackedDTFusion(nn.Module):
    """T :class:`noprop.blocks.DTFusion` at once: ``[k, B, 2 hidden] -> logits [k, B, C]``."""

    def __init__(self, T: int, hidden: int, fusion: tuple[int, int], num_classes: int):
        super().__init__()
        f1, f2 = fusion
        self.fc1 = StackedLinear(T, 2 * hidden, f1)
        self.bn1 = StackedBatchNorm(T, f1)
        self.fc2 = StackedLinear(T, f1, f2)
        self.bn2 = StackedBatchNorm(T, f2)
        self.out = StackedLinear(T, f2, num_classes)

    def forward(self, h: torch.Tensor, blocks: range) -> torch.Tensor:
        h = F.relu(self.bn1(self.fc1(h, blocks), blocks))
        return self.out(F.relu(self.bn2(self.fc2(h, blocks), blocks)), blocks)


class BlockStack(nn.Module):
    """T DT blocks with stacked parameters, run as one wide network (see the module docstring).

    Its module tree mirrors :class:`noprop.blocks.DTBlock`'s (``image``, ``label``, ``fusion`` and
    their layers under the same names), with a stacked leaf wherever the block has a PyTorch layer;
    that correspondence is what :meth:`from_blocks` and :meth:`to_blocks` copy along. Every layer
    is initialised as in T separate ``DTBlock`` modules.

    Args: ``T`` and the arguments of :class:`noprop.blocks.DTBlock`.
    """

    def __init__(
        self,
        T: int,
        num_classes: int,
        in_channels: int,
        image_size: int,
        embed_dim: int,
        config: BlockConfig,
        prototype: bool = False,
    ):
        super().__init__()
        self.T = check_positive_int("T", T)
        self.config = config
        self.dims = dict(
            num_classes=num_classes, in_channels=in_channels, image_size=image_size, embed_dim=embed_dim, prototype=prototype
        )
        check_block_arguments(**self.dims)
        self.image = StackedConvPath(T, in_channels, image_size, config, batch_norm=True, shared_input=True)
        if prototype:
            self.label = StackedConvPath(T, in_channels, image_size, config, batch_norm=True, shared_input=False)
        else:
            self.label = StackedResidualLabelPath(T, embed_dim, config.hidden)
        self.fusion = StackedDTFusion(T, config.hidden, config.fusion, num_classes)

    # ------------------------------------------------------------------------------------------ conversion

    @classmethod
    def build(
        cls, T: int, num_classes: int, in_channels: int, image_size: int, embed_dim: int, config: BlockConfig, prototype: bool = False
    ) -> "BlockStack":
        """A stack of ``T`` freshly initialised blocks (the constructor; named like ``BlockList.build``)."""
        return cls(T, num_classes, in_channels, image_size, embed_dim, config, prototype)

    def _leaves(self):
        return [(name, module) for name, module in self.named_modules() if isinstance(module, STACKED_LEAVES)]

    @classmethod
    @torch.no_grad()
    def from_blocks(cls, blocks: list[DTBlock]) -> "BlockStack":
        """Stack the parameters and BatchNorm statistics of same-shaped ``DTBlock`` modules."""
        if not blocks:
            raise ValueError("blocks: expected at least one DTBlock")
        first = blocks[0]
        if any(b.dims != first.dims or b.config != first.config for b in blocks):
            raise ValueError("blocks: expected DTBlock modules built with the same arguments")
        stack = cls(len(blocks), config=first.config, **first.dims).to(next(first.parameters()).device)
        for name, leaf in stack._leaves():
            leaf.load([block.get_submodule(name) for block in blocks])
        return stack

    @torch.no_grad()
    def to_blocks(self) -> list[DTBlock]:
        """The T blocks as independent ``DTBlock`` modules (copies; same device and dtype)."""
        device = next(self.parameters()).device
        blocks = [DTBlock(config=self.config, **self.dims).to(device) for _ in range(self.T)]
        for name, leaf in self._leaves():
            leaf.store([block.get_submodule(name) for block in blocks])
        for t, block in enumerate(blocks):
            block.train(self.training)
            block.block_index = t
        return blocks

    # ------------------------------------------------------------------------------------------ forward

    def _head(self, features: torch.Tensor, z: torch.Tensor, blocks: range, dropout_key: DropoutKey | None = None) -> torch.Tensor:
        label = self.label(z, blocks, dropout_key) if self.dims["prototype"] else self.label(z, blocks)
        return self.fusion(torch.cat([features, label], dim=-1), blocks)

    def forward(
        self, x: torch.Tensor, z: torch.Tensor, blocks: range | None = None, *, dropout_key: DropoutKey | None = None
    ) -> torch.Tensor:
        """Every block's logits at once: ``logits[j] = block_t(x, z[j])`` for ``t = blocks[j]``.

        Args:
            x: images ``[B, C_in, H, W]``, shared by all blocks.
            z: one noised latent per block, ``[k, B, D]`` with ``k = len(blocks)``.
            blocks: a range of consecutive block indices (default all T).
            dropout_key: the masks' key (training; a fresh one if None): block t's masks are those
                ``DTBlock`` number t draws from the same key.
        Returns:
            ``[k, B, num_classes]``.
        """
        blocks = check_block_inputs(blocks, self.T, z)
        key = active_dropout_key(dropout_key, self.training, self.config.dropout, x.device)
        return self._head(self.image(x, blocks, key), z, blocks, key)

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """Every block's image features, for inference: ``[T, B, hidden]`` from ``x [B, C_in, H, W]``."""
        return self.image(x, range(self.T))

    def head(self, t: int, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Block ``t``'s logits ``[B, num_classes]`` from its image features ``features[t]`` and ``z [B, D]``."""
        return self._head(features[t : t + 1], z.unsqueeze(0), range(t, t + 1))[0]

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip each block's gradient norm to ``max_norm`` separately; returns the norms ``[T]`` before clipping."""
        gradients = [p.grad for p in self.parameters() if p.grad is not None]
        if not gradients:
            return torch.zeros(self.T, device=next(self.parameters()).device)
        return clip_per_block_(gradients, self.T, max_norm)


class BlockList(nn.Module):
    """T independent DT blocks, run one after another.

    Args:
        blocks: the ``DTBlock`` modules, all built with the same arguments, or a user's blocks
            behind :class:`noprop.user_blocks.UserBlock` (which has ``DTBlock``'s ``image``/``head``).
    """

    def __init__(self, blocks: list[DTBlock]):
        super().__init__()
        if not blocks:
            raise ValueError("blocks: expected at least one DTBlock")
        self.blocks = nn.ModuleList(blocks)
        for t, block in enumerate(blocks):
            if isinstance(block, DTBlock):
                block.block_index = t  # its dropout masks are those of block t

    @classmethod
    def build(
        cls, T: int, num_classes: int, in_channels: int, image_size: int, embed_dim: int, config: BlockConfig, prototype: bool = False
    ) -> "BlockList":
        """``T`` freshly initialised blocks."""
        check_positive_int("T", T)
        return cls([DTBlock(num_classes, in_channels, image_size, embed_dim, config, prototype) for _ in range(T)])

    @property
    def T(self) -> int:
        """Number of blocks."""
        return len(self.blocks)

    def forward(
        self, x: torch.Tensor, z: torch.Tensor, blocks: range | None = None, *, dropout_key: DropoutKey | None = None
    ) -> torch.Tensor:
        """:meth:`BlockStack.forward`'s contract (``[k, B, num_classes]``), one block after another.

        The paper's blocks get one ``dropout_key`` for the whole call (drawn once if None); a user's
        blocks draw their own randomness.
        """
        blocks = check_block_inputs(blocks, self.T, z)
        if not isinstance(self.blocks[0], DTBlock):
            return torch.stack([self.blocks[t](x, z[j]) for j, t in enumerate(blocks)])
        key = active_dropout_key(dropout_key, self.training, self.blocks[0].config.dropout, x.device)
        return torch.stack([self.blocks[t](x, z[j], dropout_key=key) for j, t in enumerate(blocks)])

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
