"""The paper's blocks: each maps an image ``x`` and a noisy label embedding ``z`` to class logits.

A block's output is turned into the predicted embedding ``u_hat = softmax(logits) @ W_embed``
(DT, CT) or the velocity ``v = logits @ W_embed`` (FM) by the fused ops, not by the block.

DT block (``DTBlock``)::

    x -> [conv3x3(c1) maxpool2 relu dropout] -> [conv3x3(c2) ...] -> [conv3x3(c3) ...]
      -> flatten -> fc(hidden) -> BN -> relu                                    = image features
    z -> fc(hidden) -> BN -> relu = h;  relu(BN(fc(hidden)(h)) + h)             = label features
    concat(image, label) -> fc(f1) -> BN -> relu -> fc(f2) -> BN -> relu -> fc(C) = logits

CT/FM block (``TimeBlock``): the same without BatchNorm, plus a 64-dim sinusoidal embedding of
``t`` through ``fc(64) -> relu``, concatenated with the image and label features.

Default widths are the paper's: ``c = (32, 64, 128)``, ``hidden = 256``, ``f = (256, 128)``,
dropout 0.2. ``BlockConfig.scaled(w)`` multiplies every width by ``w`` (tests use 0.25).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn
import torch.nn.functional as F

from noprop.validation import check_positive_int

POOLINGS = 3  # three conv stages, each halving the spatial size


@dataclass(frozen=True)
class BlockConfig:
    """Layer widths of a block (the paper's by default)."""

    conv_channels: tuple[int, int, int] = (32, 64, 128)
    hidden: int = 256
    fusion: tuple[int, int] = (256, 128)
    dropout: float = 0.2
    time_dim: int = 64

    @classmethod
    def scaled(cls, width: float, **overrides) -> "BlockConfig":
        """The paper's widths times ``width`` (at least 1 unit each); other fields from ``overrides``."""
        if not width > 0:
            raise ValueError(f"width: expected a positive multiplier, got {width}")
        base = cls()

        def scale(n: int) -> int:
            return max(1, round(n * width))

        return replace(
            base,
            conv_channels=tuple(scale(c) for c in base.conv_channels),
            hidden=scale(base.hidden),
            fusion=tuple(scale(f) for f in base.fusion),
            **overrides,
        )


def feature_map_size(image_size: int) -> int:
    """Spatial size after the three 2x2 max-pools: ``image_size // 8`` (floor at each stage)."""
    size = image_size
    for _ in range(POOLINGS):
        size //= 2
    if size < 1:
        raise ValueError(f"image_size: expected at least {2**POOLINGS} pixels per side, got {image_size}")
    return size


def sinusoidal_time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style embedding of times ``t [B]`` in ``[0, 1]``: ``[B, dim]``.

    ``[sin(1000 t w_k), cos(1000 t w_k)]`` with ``w_k = 10000^(-k / (dim / 2))``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float().unsqueeze(-1) * freqs
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class ImageEncoder(nn.Module):
    """Three conv stages and a fully connected layer: ``x [B, C_in, H, W] -> [B, hidden]``."""

    def __init__(self, in_channels: int, image_size: int, config: BlockConfig, batch_norm: bool):
        super().__init__()
        c1, c2, c3 = config.conv_channels
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.dropout = nn.Dropout(config.dropout)
        self.fc = nn.Linear(c3 * feature_map_size(image_size) ** 2, config.hidden)
        self.bn = nn.BatchNorm1d(config.hidden) if batch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv1, self.conv2, self.conv3):
            # relu(maxpool(.)) == maxpool(relu(.)) (relu is monotone); on the pooled map it is 4x cheaper
            x = self.dropout(F.relu(F.max_pool2d(conv(x), 2)))
        return F.relu(self.bn(self.fc(x.flatten(1))))


class DTBlock(nn.Module):
    """One NoProp-DT block: ``(x [B, C_in, H, W], z [B, D]) -> logits [B, num_classes]``."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, embed_dim: int, config: BlockConfig = BlockConfig()):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("embed_dim", embed_dim)):
            check_positive_int(name, value)
        self.config = config
        self.dims = dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size, embed_dim=embed_dim)
        hidden, (f1, f2) = config.hidden, config.fusion
        self.image = ImageEncoder(in_channels, image_size, config, batch_norm=True)
        self.label_fc1 = nn.Linear(embed_dim, hidden)
        self.label_bn1 = nn.BatchNorm1d(hidden)
        self.label_fc2 = nn.Linear(hidden, hidden)
        self.label_bn2 = nn.BatchNorm1d(hidden)
        self.fuse_fc1 = nn.Linear(2 * hidden, f1)
        self.fuse_bn1 = nn.BatchNorm1d(f1)
        self.fuse_fc2 = nn.Linear(f1, f2)
        self.fuse_bn2 = nn.BatchNorm1d(f2)
        self.out = nn.Linear(f2, num_classes)

    def label_features(self, z: torch.Tensor) -> torch.Tensor:
        """The label path with its skip connection: ``z [B, D] -> [B, hidden]``."""
        h = F.relu(self.label_bn1(self.label_fc1(z)))
        return F.relu(self.label_bn2(self.label_fc2(h)) + h)

    def head(self, image_features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Logits from precomputed image features ``[B, hidden]`` and ``z [B, D]``."""
        h = torch.cat([image_features, self.label_features(z)], dim=-1)
        h = F.relu(self.fuse_bn1(self.fuse_fc1(h)))
        h = F.relu(self.fuse_bn2(self.fuse_fc2(h)))
        return self.out(h)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.image(x), z)


class TimeBlock(nn.Module):
    """The CT/FM block: ``(x, z [B, D], t [B]) -> logits [B, num_classes]``, no BatchNorm."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, embed_dim: int, config: BlockConfig = BlockConfig()):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("embed_dim", embed_dim)):
            check_positive_int(name, value)
        self.config = config
        hidden, (f1, f2), time_dim = config.hidden, config.fusion, config.time_dim
        self.image = ImageEncoder(in_channels, image_size, config, batch_norm=False)
        self.label_fc1 = nn.Linear(embed_dim, hidden)
        self.label_fc2 = nn.Linear(hidden, hidden)
        self.time_fc = nn.Linear(time_dim, time_dim)
        self.fuse_fc1 = nn.Linear(2 * hidden + time_dim, f1)
        self.fuse_fc2 = nn.Linear(f1, f2)
        self.out = nn.Linear(f2, num_classes)

    def head(self, image_features: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits from precomputed image features, ``z [B, D]`` and times ``t [B]``."""
        h = F.relu(self.label_fc1(z))
        label = F.relu(self.label_fc2(h) + h)
        time = F.relu(self.time_fc(sinusoidal_time_embedding(t, self.config.time_dim)))
        h = F.relu(self.fuse_fc1(torch.cat([image_features, label, time], dim=-1)))
        h = F.relu(self.fuse_fc2(h))
        return self.out(h)

    def forward(self, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.image(x), z, t)
