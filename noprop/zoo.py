"""Example blocks that follow the block contract of :mod:`noprop.user_blocks`: an MLP, a small ResNet and a small MLP-Mixer.

Pass the class as the factory; its own sizes are keyword arguments (bind them with ``functools.partial``)::

    NoPropDT(10, 1, 28, block=noprop.zoo.ResNetBlock)
    NoPropFM(10, 1, 28, block=functools.partial(noprop.zoo.MixerBlock, dim=64, depth=2))

Both take ``t`` when the model passes ``time_conditioned=True`` (CT, FM, Adjoint) and ignore the
model's ``config`` (the paper block's widths): they are sized by their own arguments.

* :class:`MLPBlock` splits into ``image(x)`` (one hidden layer on the flattened pixels) and a
  ``head``: the smallest useful template, and fast on a CPU.
* :class:`ResNetBlock` splits into ``image(x)`` (a ResNet with BatchNorm) and ``head(features, z[, t])``,
  so inference computes the image features once.
* :class:`MixerBlock` has no split: ``z`` (and ``t``) enter as an extra token mixed with the image
  patches from the first layer on, so every inference step runs the whole block.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from noprop.blocks import sinusoidal_time_embedding


class MLPBlock(nn.Module):
    """An MLP block: ``(x [B, C_in, H, W], z [B, D][, t [B]]) -> logits [B, num_classes]``.

    ``image(x)``: flatten -> FC(hidden) -> BN -> ReLU -> dropout. ``head(features, z[, t])``:
    ``concat(features, ReLU(BN(FC(z)))[, ReLU(FC(sinusoidal(t)))])`` -> FC(hidden) -> BN -> ReLU -> FC(num_classes).

    Args:
        num_classes, in_channels, image_size, embed_dim, time_conditioned: from the model (the contract).
        hidden: width of every hidden layer.
        dropout: dropout on the image features.
        time_dim: size of the sinusoidal time embedding.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        embed_dim: int,
        time_conditioned: bool = False,
        *,
        hidden: int = 128,
        dropout: float = 0.0,
        time_dim: int = 64,
    ):
        super().__init__()
        self.image_fc = nn.Linear(in_channels * image_size * image_size, hidden)
        self.image_bn = nn.BatchNorm1d(hidden)
        self.dropout = nn.Dropout(dropout)
        self.label_fc = nn.Linear(embed_dim, hidden)
        self.label_bn = nn.BatchNorm1d(hidden)
        self.time_dim = time_dim
        self.time = nn.Linear(time_dim, hidden) if time_conditioned else None
        self.fuse = nn.Linear(hidden * (3 if time_conditioned else 2), hidden)
        self.fuse_bn = nn.BatchNorm1d(hidden)
        self.out = nn.Linear(hidden, num_classes)

    def image(self, x: torch.Tensor) -> torch.Tensor:
        """Image features ``[B, hidden]`` (independent of ``z`` and ``t``)."""
        return self.dropout(F.relu(self.image_bn(self.image_fc(x.flatten(1)))))

    def head(self, features: torch.Tensor, z: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, num_classes]`` from :meth:`image`'s features, ``z [B, D]`` (and ``t [B]``)."""
        parts = [features, F.relu(self.label_bn(self.label_fc(z)))]
        if self.time is not None:
            parts.append(F.relu(self.time(sinusoidal_time_embedding(t, self.time_dim).to(z.dtype))))
        return self.out(F.relu(self.fuse_bn(self.fuse(torch.cat(parts, dim=-1)))))

    def forward(self, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.image(x), z, t)


class ResidualUnit(nn.Module):
    """``relu(x' + BN(conv3x3(relu(BN(conv3x3_stride(x))))))``, with ``x'`` a strided 1x1 conv + BN when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.shortcut(x) + self.bn2(self.conv2(h)))


class ResNetBlock(nn.Module):
    """A small ResNet block: ``(x [B, C_in, H, W], z [B, D][, t [B]]) -> logits [B, num_classes]``.

    ``image(x)``: conv3x3 stride 2 (``channels``) -> BN -> ReLU -> residual unit (``channels``) ->
    residual unit (``2 channels``, stride 2) -> global average pool -> dropout -> ``[B, 2 channels]``.
    ``head(features, z[, t])``: ``concat(features, ReLU(FC(z))[, ReLU(FC(sinusoidal(t)))])`` -> FC(hidden)
    -> ReLU -> FC(num_classes).

    Args:
        num_classes, in_channels, embed_dim, time_conditioned: from the model (the contract).
        channels: width of the first stage (the second has twice as many).
        hidden: width of the label, time and fusion layers.
        dropout: dropout on the pooled image features.
        time_dim: size of the sinusoidal time embedding.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        embed_dim: int,
        time_conditioned: bool = False,
        *,
        channels: int = 16,
        hidden: int = 128,
        dropout: float = 0.0,
        time_dim: int = 64,
    ):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, 2, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        self.stage1 = ResidualUnit(channels, channels)
        self.stage2 = ResidualUnit(channels, 2 * channels, stride=2)
        self.dropout = nn.Dropout(dropout)
        self.label = nn.Linear(embed_dim, hidden)
        self.time_dim = time_dim
        self.time = nn.Linear(time_dim, hidden) if time_conditioned else None
        inputs = 2 * channels + hidden * (2 if time_conditioned else 1)
        self.fuse = nn.Linear(inputs, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def image(self, x: torch.Tensor) -> torch.Tensor:
        """Image features ``[B, 2 channels]`` (independent of ``z`` and ``t``)."""
        h = self.stage2(self.stage1(self.stem(x)))
        return self.dropout(h.mean(dim=(2, 3)))

    def head(self, features: torch.Tensor, z: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, num_classes]`` from :meth:`image`'s features, ``z [B, D]`` (and ``t [B]``)."""
        parts = [features, F.relu(self.label(z))]
        if self.time is not None:
            parts.append(F.relu(self.time(sinusoidal_time_embedding(t, self.time_dim).to(z.dtype))))
        return self.out(F.relu(self.fuse(torch.cat(parts, dim=-1))))

    def forward(self, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.image(x), z, t)


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Non-overlapping ``patch x patch`` patches of ``x [B, C, H, W]``: ``[B, (H // patch) * (W // patch), C * patch**2]``.

    Row-major over the grid, each patch flattened channel-major (``F.unfold``'s layout, without its
    im2col kernel, which is slow on the CPU). Pixels beyond the last whole patch are dropped.
    """
    batch, channels, height, width = x.shape
    rows, cols = height // patch, width // patch
    x = x[:, :, : rows * patch, : cols * patch].reshape(batch, channels, rows, patch, cols, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, channels * patch * patch)


class MixerLayer(nn.Module):
    """One MLP-Mixer layer on ``[B, N, dim]``: token mixing (an MLP across the N tokens), then channel mixing."""

    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, token_hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(token_hidden, tokens))
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(nn.Linear(dim, channel_hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(channel_hidden, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.token_mlp(self.norm1(h).transpose(1, 2)).transpose(1, 2)
        return h + self.channel_mlp(self.norm2(h))


class MixerBlock(nn.Module):
    """A small MLP-Mixer block: ``(x [B, C_in, H, W], z [B, D][, t [B]]) -> logits [B, num_classes]``.

    The image is cut into a ``grid x grid`` of square patches (side ``image_size // grid``; a
    remainder of pixels at the right and bottom is dropped), each embedded by one linear layer;
    ``z`` is embedded as one more token (plus the embedded time for CT/FM). ``depth`` Mixer layers
    mix the ``grid**2 + 1`` tokens, and the logits are a linear layer on the mean token after a
    LayerNorm. No BatchNorm; dropout inside every MLP.

    Args:
        num_classes, in_channels, image_size, embed_dim, time_conditioned: from the model (the contract).
        grid: patches per side.
        dim: token width.
        depth: Mixer layers.
        dropout: dropout probability inside the MLPs.
        time_dim: size of the sinusoidal time embedding.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        embed_dim: int,
        time_conditioned: bool = False,
        *,
        grid: int = 4,
        dim: int = 64,
        depth: int = 2,
        dropout: float = 0.1,
        time_dim: int = 64,
    ):
        super().__init__()
        if not 1 <= grid <= image_size:
            raise ValueError(f"grid: expected 1..{image_size} patches per side, got {grid}")
        self.patch = image_size // grid
        self.patches = nn.Linear(in_channels * self.patch * self.patch, dim)
        self.label = nn.Linear(embed_dim, dim)
        self.time_dim = time_dim
        self.time = nn.Linear(time_dim, dim) if time_conditioned else None
        tokens = grid * grid + 1
        self.layers = nn.Sequential(*[MixerLayer(tokens, dim, 2 * tokens, 2 * dim, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        patches = patchify(x, self.patch)
        label = self.label(z)
        if self.time is not None:
            label = label + self.time(sinusoidal_time_embedding(t, self.time_dim).to(z.dtype))
        h = torch.cat([self.patches(patches), label.unsqueeze(1)], dim=1)
        return self.out(self.norm(self.layers(h)).mean(dim=1))
