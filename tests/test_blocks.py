"""The blocks are exactly the paper's Figure 6: sizes, parameter counts and wiring, derived by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from noprop import NoPropCT, NoPropDT, NoPropFM
from noprop.blocks import BlockConfig, ConvPath, DTBlock, ResidualLabelPath, TimeBlock

# ---------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("channels,size,expected", [(1, 28, 6272), (3, 32, 8192)])
@pytest.mark.parametrize("block_class", [DTBlock, TimeBlock])
def test_flattened_image_feature_size(block_class, channels, size, expected):
    """128 channels at H/4 x W/4 after two 2x2 pools: 128 * 7 * 7 = 6272 (MNIST), 128 * 8 * 8 = 8192 (CIFAR)."""
    block = block_class(10, channels, size, 10)
    seen = {}

    def record_input(module, args):
        seen["shape"] = tuple(args[0].shape)

    block.image.fc.register_forward_pre_hook(record_input)
    t = (torch.rand(2),) if block_class is TimeBlock else ()
    block(torch.randn(2, channels, size, size), torch.randn(2, 10), *t)
    assert seen["shape"] == (2, expected)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# Figure 6 by hand. A conv3x3 has 9 * in * out weights and out biases; FC(in -> out) has in * out + out;
# BatchNorm1d(n) has 2n (its running statistics are buffers, not parameters).
CONVS_MNIST = (9 * 1 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 128 + 128)  # 320 + 18,496 + 73,856 = 92,672
CONVS_CIFAR = (9 * 3 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 128 + 128)  # 896 + 18,496 + 73,856 = 93,248
IMAGE_FC_MNIST = 6272 * 256 + 256  # 1,605,888
IMAGE_FC_CIFAR = 8192 * 256 + 256  # 2,097,408
BN256 = 2 * 256
DT_LABEL_ONEHOT10 = (10 * 256 + 256) + BN256 + 2 * ((256 * 256 + 256) + BN256)  # FC+BN, then FC+BN, FC+BN = 135,936
DT_FUSION10 = (512 * 256 + 256) + BN256 + (256 * 128 + 128) + 2 * 128 + (128 * 10 + 10)  # 166,282
CT_FUSION10 = (768 * 256 + 256) + (256 * 128 + 128) + (128 * 10 + 10)  # 231,050
CT_TIME = 64 * 256 + 256  # 16,640
CT_LABEL_ONEHOT10 = 10 * 256 + 256  # 2,816


@pytest.mark.parametrize(
    "build,expected",
    [
        # one DT block, MNIST, one-hot: the paper's 2,001,290
        (lambda: DTBlock(10, 1, 28, 10), CONVS_MNIST + IMAGE_FC_MNIST + BN256 + DT_LABEL_ONEHOT10 + DT_FUSION10),
        # learned embedding, D = 20: the label path's first FC reads 20 inputs instead of 10
        (lambda: DTBlock(10, 1, 28, 20), CONVS_MNIST + IMAGE_FC_MNIST + BN256 + DT_LABEL_ONEHOT10 + 10 * 256 + DT_FUSION10),
        (lambda: DTBlock(10, 3, 32, 10), CONVS_CIFAR + IMAGE_FC_CIFAR + BN256 + DT_LABEL_ONEHOT10 + DT_FUSION10),
        # prototype: the label path is a second conv path (ending in FC + BN) on z as a 1x28x28 image
        (lambda: DTBlock(10, 1, 28, 784, prototype=True), 2 * (CONVS_MNIST + IMAGE_FC_MNIST + BN256) + DT_FUSION10),
        (lambda: TimeBlock(10, 1, 28, 10), CONVS_MNIST + IMAGE_FC_MNIST + CT_LABEL_ONEHOT10 + CT_TIME + CT_FUSION10),
        (lambda: TimeBlock(10, 1, 28, 784, prototype=True), 2 * (CONVS_MNIST + IMAGE_FC_MNIST) + CT_TIME + CT_FUSION10),
    ],
    ids=["dt-mnist-onehot", "dt-mnist-learned20", "dt-cifar-onehot", "dt-mnist-prototype", "ct-mnist-onehot", "ct-mnist-prototype"],
)
def test_parameter_counts_match_figure_6(build, expected):
    assert _count(build()) == expected


def test_dt_block_has_the_papers_2001290_parameters():
    assert _count(DTBlock(10, 1, 28, 10)) == 2_001_290


def test_ct_and_fm_models_hold_one_figure_6_block():
    for cls in (NoPropCT, NoPropFM):
        block = cls(10, 1, 28).block
        assert _count(block) == CONVS_MNIST + IMAGE_FC_MNIST + CT_LABEL_ONEHOT10 + CT_TIME + CT_FUSION10
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in block.modules())


# ---------------------------------------------------------------------------------------------- wiring


def _set_batch_norm(norm: torch.nn.BatchNorm1d, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random affine parameters and running statistics; returns them for the hand computation."""
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            getattr(norm, name).copy_(torch.randn(norm.num_features, generator=g))
        norm.running_var.copy_(torch.rand(norm.num_features, generator=g) + 0.5)
    return norm.weight.detach(), norm.bias.detach(), norm.running_mean, norm.running_var


def test_dt_label_path_is_h_plus_branch_of_h():
    """``label = h + BN3(FC3(ReLU(BN2(FC2(h)))))`` with ``h = ReLU(BN1(FC1(z)))``, no ReLU after the add."""
    g = torch.Generator().manual_seed(0)
    path = ResidualLabelPath(7, 16).eval()
    layers = []
    for fc, norm in ((path.fc1, path.bn1), (path.fc2, path.bn2), (path.fc3, path.bn3)):
        with torch.no_grad():
            fc.weight.copy_(torch.randn(fc.weight.shape, generator=g) / 4)
            fc.bias.copy_(torch.randn(fc.bias.shape, generator=g))
        layers.append((fc.weight.detach(), fc.bias.detach(), *_set_batch_norm(norm, g)))

    def affine_norm(v, weight, bias, gamma, beta, mean, var):
        return (v @ weight.T + bias - mean) / torch.sqrt(var + 1e-5) * gamma + beta

    z = torch.randn(32, 7, generator=g)
    h = affine_norm(z, *layers[0]).clamp(min=0)
    expected = h + affine_norm(affine_norm(h, *layers[1]).clamp(min=0), *layers[2])
    actual = path(z)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert (actual < 0).any(), "no ReLU after the residual add: the output takes negative values"


def test_dt_image_path_ends_in_batchnorm_without_relu_and_ct_in_relu():
    x = torch.randn(16, 1, 28, 28)
    dt_features = DTBlock(10, 1, 28, 10).image(x)
    assert (dt_features < 0).float().mean() > 0.2  # BN output, not rectified
    ct_features = TimeBlock(10, 1, 28, 10).image(x)
    assert (ct_features >= 0).all()


def test_conv_path_stage_order():
    """conv -> ReLU -> pool -> dropout, conv -> ReLU -> dropout, conv -> ReLU -> pool -> dropout, against F calls."""
    config = BlockConfig.scaled(0.25, dropout=0.0)
    path = ConvPath(3, 12, config, batch_norm=False).eval()
    x = torch.randn(4, 3, 12, 12)
    h = F.max_pool2d(F.relu(path.conv1(x)), 2)
    h = F.relu(path.conv2(h))
    h = F.max_pool2d(F.relu(path.conv3(h)), 2)
    expected = F.relu(path.fc(h.flatten(1)))
    torch.testing.assert_close(path(x), expected)


def test_time_path_and_fusion_widths():
    block = TimeBlock(10, 1, 28, 10)
    assert (block.time.in_features, block.time.out_features) == (64, 256)
    assert block.fuse_fc1.in_features == 768  # image 256 + label 256 + time 256
    assert DTBlock(10, 1, 28, 10).fusion.fc1.in_features == 512  # image 256 + label 256


def test_prototype_label_path_reads_z_as_an_image():
    """The prototype label path is a conv path applied to ``z`` reshaped to ``C x H x W``."""
    block = DTBlock(3, 2, 8, 2 * 8 * 8, BlockConfig.scaled(0.25), prototype=True).eval()
    assert isinstance(block.label, ConvPath) and block.label is not block.image
    z = torch.randn(5, 128)
    torch.testing.assert_close(block.label_features(z), block.label(z.reshape(5, 2, 8, 8)))


@pytest.mark.parametrize("cls", [NoPropDT, NoPropCT, NoPropFM])
def test_models_build_prototype_blocks_for_the_prototype_embedding(cls):
    model = cls(10, 1, 12, embedding="prototype", width=0.125)
    block = model.blocks.to_blocks()[0] if cls is NoPropDT else model.block
    assert block.dims["prototype"] and block.dims["embed_dim"] == 144


def test_blocks_reject_a_prototype_dimension_that_is_not_the_image_size():
    with pytest.raises(ValueError, match="embed_dim"):
        DTBlock(10, 1, 28, 100, prototype=True)
