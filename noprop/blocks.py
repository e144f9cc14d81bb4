"""The paper's blocks (Figure 6): each maps an image ``x`` and a noisy label embedding ``z`` to class logits.

A block's output is turned into the predicted embedding ``u_hat = softmax(logits) @ W_embed``
(DT, CT) or the velocity ``v = logits @ W_embed`` (FM) by the fused ops, not by the block.

Conv path (:class:`ConvPath`, shared by every block), for an input ``C x H x W``::

    conv3x3(32, pad 1) -> ReLU -> maxpool2 -> dropout
    -> conv3x3(64, pad 1) -> ReLU -> dropout
    -> conv3x3(128, pad 1) -> ReLU -> maxpool2 -> dropout
    -> flatten (128 * H/4 * W/4: 6272 on MNIST, 8192 on CIFAR) -> FC(256) -> BN (DT) | ReLU (CT/FM)

DT block (:class:`DTBlock`, Figure 6 left)::

    image = conv path ending in BN
    label = h + BN(FC(ReLU(BN(FC(h)))))   with h = ReLU(BN(FC(z)))        (:class:`ResidualLabelPath`)
    logits = FC(C)(ReLU(BN(FC128(ReLU(BN(FC256(concat(image, label)))))))

CT/FM block (:class:`TimeBlock`, Figure 6 right), no BatchNorm anywhere::

    image = conv path ending in ReLU
    label = ReLU(FC256(z));  time = ReLU(FC256(sinusoidal_64(t)))
    logits = FC(C)(ReLU(FC128(ReLU(FC256(concat(image, label, time))))))

With the prototype embedding (``z`` has the image's size ``C * H * W``) the label path is its own
conv path of the image path's shape (separate weights) applied to ``z`` reshaped to ``C x H x W``.

Default widths are the paper's: convs ``(32, 64, 128)``, ``hidden = 256``, fusion ``(256, 128)``,
dropout 0.2, a 64-dim time embedding. ``BlockConfig.scaled(w)`` multiplies every layer width by
``w`` (the learning tests use 0.25); the time embedding stays 64-dim. One DT block on MNIST with
the one-hot embedding has 2,001,290 parameters, as in the paper.

Implementation note: each conv stage's tail, ``dropout(relu(maxpool2(conv)))``, is one fused op
(:func:`noprop.ops.conv_epilogue`; ``maxpool`` runs before ``ReLU``, which commute exactly because
ReLU is monotone). Its dropout mask is counter-based: a pure function of a :class:`DropoutKey`
(the seed and the global index of the batch's first row), the block's index (``block_index``),
the dropout site (conv stage, image or label path) and the element. So a block draws the same mask
alone, inside :class:`noprop.stack.BlockStack`, in a chunk of blocks or on another rank. Without a
key, a block in training mode draws a fresh seed from torch's generator for each forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import nn
import torch.nn.functional as F

from noprop import ops, rng
from noprop.validation import check_number, check_positive_int

POOLED_STAGES = (True, False, True)  # which of the three conv stages end in a 2x2 max-pool
IMAGE_STREAMS = 0  # dropout sites 0, 1, 2: the image path's conv stages
LABEL_STREAMS = len(POOLED_STAGES)  # 3, 4, 5: a prototype label path's conv stages


class DropoutKey(NamedTuple):
    """What a training forward's dropout masks are drawn from (besides block, site and element).

    Attributes:
        seed: int64 tensor with one element (on the data's device).
        row_offset: global index of the batch's first row (data-parallel shards of one batch pass
            their offset, so each row keeps the mask it has in the whole batch).
    """

    seed: torch.Tensor
    row_offset: int = 0


def draw_dropout_key(device: torch.device) -> DropoutKey:
    """A fresh :class:`DropoutKey` with a seed drawn on ``device`` from torch's generator (no host sync)."""
    return DropoutKey(torch.randint(0, rng.SEED_LIMIT // 2, (1,), device=device, dtype=torch.int64))


def active_dropout_key(key: DropoutKey | None, training: bool, p: float, device: torch.device) -> DropoutKey | None:
    """The key a forward draws its masks from: None without dropout (eval mode or ``p = 0``), else
    ``key`` or, when None, a fresh one (:func:`draw_dropout_key`)."""
    if not training or p == 0:
        return None
    return key if key is not None else draw_dropout_key(device)


@dataclass(frozen=True)
class BlockConfig:
    """Layer widths of a block (the paper's by default).

    Attributes:
        conv_channels: output channels of the three 3x3 convolutions.
        hidden: width of the image, label and time features (FC(256) in Figure 6).
        fusion: widths of the two fusion layers before the class logits.
        dropout: dropout probability after every conv stage.
        time_dim: size of the sinusoidal time embedding (CT/FM).
    """

    conv_channels: tuple[int, int, int] = (32, 64, 128)
    hidden: int = 256
    fusion: tuple[int, int] = (256, 128)
    dropout: float = 0.2
    time_dim: int = 64

    @classmethod
    def scaled(cls, width: float, **overrides) -> "BlockConfig":
        """The paper's widths times ``width`` (at least 1 unit each); other fields from ``overrides``."""
        check_number("width", width)
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
    """Spatial size after the conv path's two 2x2 max-pools: ``image_size // 4`` (floor at each pool)."""
    size = image_size
    for pooled in POOLED_STAGES:
        size = size // 2 if pooled else size
    if size < 1:
        raise ValueError(f"image_size: expected at least {2 ** sum(POOLED_STAGES)} pixels per side, got {image_size}")
    return size


def flat_features(config: BlockConfig, image_size: int) -> int:
    """Length of the flattened conv output: ``conv_channels[-1] * (image_size // 4) ** 2`` (6272 on MNIST)."""
    return config.conv_channels[-1] * feature_map_size(image_size) ** 2


def conv_stage_tail(
    conv_output: torch.Tensor,
    stage: int,
    p: float,
    key: DropoutKey | None,
    *,
    first_block: int = 0,
    blocks: int = 1,
    first_stream: int = IMAGE_STREAMS,
    contiguous_output: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """The tail of conv stage ``stage``: ``dropout(relu(maxpool2(conv_output)))`` (no pool in the middle stage).

    ``conv_output [B, blocks * channels, H, W] -> [B, blocks * channels, H // 2, W // 2]`` (pooled) or
    the same shape, through :func:`noprop.ops.conv_epilogue`: blocks ``first_block ..`` side by side,
    dropout site ``first_stream + stage``, no dropout when ``key`` is None.
    """
    return ops.conv_epilogue(
        conv_output,
        pooled=POOLED_STAGES[stage],
        p=p if key is not None else 0.0,
        seed=key.seed if key is not None else None,
        blocks=blocks,
        block_offset=first_block,
        row_offset=key.row_offset if key is not None else 0,
        stream=first_stream + stage,
        contiguous_output=contiguous_output,
        backend=backend,
    )


def sinusoidal_time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style embedding of times ``t [B]`` in ``[0, 1]``: ``[B, dim]``.

    ``[sin(1000 t w_k), cos(1000 t w_k)]`` with ``w_k = 10000^(-k / (dim / 2))``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float().unsqueeze(-1) * freqs
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class ConvPath(nn.Module):
    """Three conv stages, flatten, ``FC(hidden)``, then BN (DT) or ReLU (CT/FM).

    ``x [B, C_in, H, W] -> [B, hidden]``. The image path of every block, and the label path of
    a block with the prototype embedding (applied to ``z`` reshaped to an image). ``first_stream``
    numbers its dropout sites (:data:`IMAGE_STREAMS` or :data:`LABEL_STREAMS`); ``backend`` runs
    the conv epilogues (a model sets it to its own, :func:`noprop.stacked_layers.set_backend`).
    """

    FUSED_OP = "conv_epilogue"

    def __init__(self, in_channels: int, image_size: int, config: BlockConfig, batch_norm: bool, first_stream: int = IMAGE_STREAMS):
        super().__init__()
        c1, c2, c3 = config.conv_channels
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.fc = nn.Linear(flat_features(config, image_size), config.hidden)
        self.bn = nn.BatchNorm1d(config.hidden) if batch_norm else None
        self.dropout = config.dropout
        self.first_stream = first_stream
        self.backend = "auto"

    def forward(self, x: torch.Tensor, dropout_key: DropoutKey | None = None, block_index: int = 0) -> torch.Tensor:
        """``[B, hidden]``; the masks of block ``block_index`` drawn from ``dropout_key`` (fresh if None, in training)."""
        key = active_dropout_key(dropout_key, self.training, self.dropout, x.device)
        for stage, conv in enumerate((self.conv1, self.conv2, self.conv3)):
            x = conv_stage_tail(
                conv(x), stage, self.dropout, key, first_block=block_index, first_stream=self.first_stream, backend=self.backend
            )
        h = self.fc(x.flatten(1))
        return self.bn(h) if self.bn is not None else F.relu(h)


class ResidualLabelPath(nn.Module):
    """DT's label path: ``h = ReLU(BN(FC(z)))``, ``label = h + BN(FC(ReLU(BN(FC(h)))))``; ``[B, D] -> [B, hidden]``."""

    def __init__(self, embed_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.bn2 = nn.BatchNorm1d(hidden)
        self.fc3 = nn.Linear(hidden, hidden)
        self.bn3 = nn.BatchNorm1d(hidden)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.fc1(z)))
        return h + self.bn3(self.fc3(F.relu(self.bn2(self.fc2(h)))))


class DTFusion(nn.Module):
    """DT's fusion layers: ``FC(f1) -> BN -> ReLU -> FC(f2) -> BN -> ReLU -> FC(C)``; ``[B, 2 hidden] -> [B, C]``."""

    def __init__(self, hidden: int, fusion: tuple[int, int], num_classes: int):
        super().__init__()
        f1, f2 = fusion
        self.fc1 = nn.Linear(2 * hidden, f1)
        self.bn1 = nn.BatchNorm1d(f1)
        self.fc2 = nn.Linear(f1, f2)
        self.bn2 = nn.BatchNorm1d(f2)
        self.out = nn.Linear(f2, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.fc1(h)))
        return self.out(F.relu(self.bn2(self.fc2(h))))


def check_block_arguments(num_classes: int, in_channels: int, image_size: int, embed_dim: int, prototype: bool) -> None:
    """Raise ``ValueError`` naming the argument if a block cannot be built from these sizes."""
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("embed_dim", embed_dim)):
        check_positive_int(name, value)
    feature_map_size(check_positive_int("image_size", image_size))
    if prototype and embed_dim != in_channels * image_size * image_size:
        raise ValueError(
            f"embed_dim: a prototype label path reads z as a {in_channels}x{image_size}x{image_size} image, "
            f"so embed_dim must be {in_channels * image_size * image_size}, got {embed_dim}"
        )


def label_image(z: torch.Tensor, in_channels: int, image_size: int) -> torch.Tensor:
    """A prototype-embedding latent ``z [..., C*H*W]`` viewed as images ``[..., C, H, W]``."""
    return z.unflatten(-1, (in_channels, image_size, image_size))


class PaperBlock(nn.Module):
    """What both Figure 6 blocks share: their arguments (checked), and the label path's input.

    Args:
        num_classes, in_channels, image_size: the task.
        embed_dim: ``D``, the label embedding's dimension.
        config: layer widths.
        prototype: the label path is a conv path reading ``z`` as an image (``D = C_in * H * W``).

    Subclasses build ``image`` and ``label`` (modules returning ``[B, hidden]``) and the fusion layers.
    ``block_index`` is the block's place among a model's blocks (0 alone): its dropout masks are
    those of that block (:class:`DropoutKey`).
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int, embed_dim: int, config: BlockConfig, prototype: bool):
        super().__init__()
        check_block_arguments(num_classes, in_channels, image_size, embed_dim, prototype)
        self.config = config
        self.dims = dict(
            num_classes=num_classes, in_channels=in_channels, image_size=image_size, embed_dim=embed_dim, prototype=prototype
        )
        self.block_index = 0

    def dropout_key(self, key: DropoutKey | None, device: torch.device) -> DropoutKey | None:
        """The key of one training forward (image and label path share it; see :func:`active_dropout_key`)."""
        return active_dropout_key(key, self.training, self.config.dropout, device)

    def image_features(self, x: torch.Tensor, dropout_key: DropoutKey | None = None) -> torch.Tensor:
        """The image path: ``x [B, C_in, H, W] -> [B, hidden]``."""
        return self.image(x, dropout_key, self.block_index)

    def label_features(self, z: torch.Tensor, dropout_key: DropoutKey | None = None) -> torch.Tensor:
        """The label path: ``z [B, D] -> [B, hidden]`` (a prototype ``z`` viewed as a ``C x H x W`` image first)."""
        if self.dims["prototype"]:
            return self.label(label_image(z, self.dims["in_channels"], self.dims["image_size"]), dropout_key, self.block_index)
        return self.label(z)


class DTBlock(PaperBlock):
    """One NoProp-DT block (Figure 6 left): ``(x [B, C_in, H, W], z [B, D]) -> logits [B, num_classes]``.

    Args: see :class:`PaperBlock`.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        embed_dim: int,
        config: BlockConfig = BlockConfig(),
        prototype: bool = False,
    ):
        super().__init__(num_classes, in_channels, image_size, embed_dim, config, prototype)
        self.image = ConvPath(in_channels, image_size, config, batch_norm=True)
        if prototype:
            self.label = ConvPath(in_channels, image_size, config, batch_norm=True, first_stream=LABEL_STREAMS)
        else:
            self.label = ResidualLabelPath(embed_dim, config.hidden)
        self.fusion = DTFusion(config.hidden, config.fusion, num_classes)

    def head(self, image_features: torch.Tensor, z: torch.Tensor, dropout_key: DropoutKey | None = None) -> torch.Tensor:
        """Logits ``[B, num_classes]`` from precomputed image features ``[B, hidden]`` and ``z [B, D]``."""
        return self.fusion(torch.cat([image_features, self.label_features(z, dropout_key)], dim=-1))

    def forward(self, x: torch.Tensor, z: torch.Tensor, *, dropout_key: DropoutKey | None = None) -> torch.Tensor:
        """Logits ``[B, num_classes]``; dropout masks from ``dropout_key`` (a fresh one if None, in training)."""
        key = self.dropout_key(dropout_key, x.device)
        return self.head(self.image_features(x, key), z, key)


class TimeBlock(PaperBlock):
    """The CT/FM block (Figure 6 right): ``(x, z [B, D], t [B]) -> logits [B, num_classes]``, no BatchNorm.

    The label path is ``ReLU(FC(z))``, or the conv path on ``z`` as an image. Args: see :class:`PaperBlock`.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        embed_dim: int,
        config: BlockConfig = BlockConfig(),
        prototype: bool = False,
    ):
        super().__init__(num_classes, in_channels, image_size, embed_dim, config, prototype)
        hidden, (f1, f2) = config.hidden, config.fusion
        self.image = ConvPath(in_channels, image_size, config, batch_norm=False)
        if prototype:
            self.label = ConvPath(in_channels, image_size, config, batch_norm=False, first_stream=LABEL_STREAMS)
        else:
            self.label = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU())
        self.time = nn.Linear(config.time_dim, hidden)
        self.fuse_fc1 = nn.Linear(3 * hidden, f1)
        self.fuse_fc2 = nn.Linear(f1, f2)
        self.out = nn.Linear(f2, num_classes)

    def head(
        self, image_features: torch.Tensor, z: torch.Tensor, t: torch.Tensor, dropout_key: DropoutKey | None = None
    ) -> torch.Tensor:
        """Logits from precomputed image features ``[B, hidden]``, ``z [B, D]`` and times ``t [B]``."""
        time = F.relu(self.time(sinusoidal_time_embedding(t, self.config.time_dim)))
        h = F.relu(self.fuse_fc1(torch.cat([image_features, self.label_features(z, dropout_key), time], dim=-1)))
        return self.out(F.relu(self.fuse_fc2(h)))

    def forward(self, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor, *, dropout_key: DropoutKey | None = None) -> torch.Tensor:
        """Logits ``[B, num_classes]``; dropout masks from ``dropout_key`` (a fresh one if None, in training)."""
        key = self.dropout_key(dropout_key, x.device)
        return self.head(self.image_features(x, key), z, t, key)
