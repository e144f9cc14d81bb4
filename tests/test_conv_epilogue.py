"""``ops.conv_epilogue`` (``y = dropout(relu(maxpool2(x)))``) on every registered backend.

The dropout mask against an independent scalar Philox and a statistical test of its keep rate;
values and gradients of every backend against the reference composition with the same mask (odd
shapes, odd H and W, both memory formats, ``p`` = 0 and near 1, upstream gradients that are not 1);
the mask depends only on (seed, block, row, element); the bytes saved for the backward against
PyTorch's composition; bad input; (GPU) 16-bit inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from noprop import ops, rng
from op_testing import compared_backends, kernel_backends, saved_bytes

COMPARED = compared_backends("conv_epilogue")
KERNELS = kernel_backends("conv_epilogue")
ALL = ("reference",) + COMPARED

# ---------------------------------------------------------------------------------------------- the mask contract

M32 = 0xFFFFFFFF


def scalar_philox(seed: int, counter: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Philox 4x32-10 on Python ints, written from the published algorithm (an oracle independent of noprop.rng)."""
    c0, c1, c2, c3 = counter
    k0, k1 = seed & M32, (seed >> 32) & M32
    for _ in range(10):
        prod_b, prod_a = 0xCD9E8D57 * c2, 0xD2511F53 * c0
        c0, c1, c2, c3 = ((prod_b >> 32) ^ c1 ^ k0) & M32, prod_b & M32, ((prod_a >> 32) ^ c3 ^ k1) & M32, prod_a & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def scalar_uniform(word: int) -> float:
    x = word - 2**32 if word >= 2**31 else word  # as int32
    x = ~x if x < 0 else x
    return float(torch.tensor(float(x), dtype=torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32))


def test_mask_follows_the_contract_element_by_element():
    seed, p = 2**40 + 12345, 0.3
    rows, blocks, C, H, W = 2, 3, 5, 3, 2
    row_offset, block_offset, stream = 7, 4, 2
    keep = rng.dropout_keep(torch.tensor([seed]), p, (rows, blocks, C, H, W), row_offset, block_offset, stream)
    for r in range(rows):
        for t in range(blocks):
            for c in range(C):
                for h in range(H):
                    for w in range(W):
                        e = (h * W + w) * C + c
                        words = scalar_philox(seed, (e >> 2, row_offset + r, block_offset + t, stream))
                        expected = scalar_uniform(words[e & 3]) >= torch.tensor(p, dtype=torch.float32).item()
                        assert bool(keep[r, t, c, h, w]) == expected, (r, t, c, h, w)


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5, 0.9])
def test_keep_rate_and_independence(p):
    """Keep rate within 5 binomial standard errors of ``1 - p``; masks of other blocks, rows, streams, seeds agree by chance only."""
    shape = (64, 4, 32, 14, 14)
    keep = rng.dropout_keep(torch.tensor([99]), p, shape).float()
    n = keep.numel()
    assert abs(keep.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    agree_by_chance = p * p + (1 - p) * (1 - p)
    per_pair = keep[:, 0].numel()
    tolerance = 5 * math.sqrt(agree_by_chance * (1 - agree_by_chance) / per_pair)
    other_seed = rng.dropout_keep(torch.tensor([100]), p, shape).float()
    other_stream = rng.dropout_keep(torch.tensor([99]), p, shape, stream=1).float()
    for a, b in [
        (keep[:, 0], keep[:, 1]),  # neighbouring blocks
        (keep[:32], keep[32:]),  # other rows
        (keep, other_seed),
        (keep, other_stream),
        (keep[..., 0::2].flatten()[:-1], keep[..., 0::2].flatten()[1:]),  # neighbouring elements
    ]:
        assert abs((a == b).float().mean().item() - agree_by_chance) < 2 * tolerance


# ---------------------------------------------------------------------------------------------- values and gradients

# (B, K, H, W, blocks): one row, odd H and W, several blocks, one channel per block.
SHAPES = [(1, 3, 5, 7, 1), (3, 8, 6, 6, 2), (2, 12, 7, 5, 3), (4, 5, 4, 9, 5)]


def make_input(shape, channels_last: bool, seed: int = 0) -> torch.Tensor:
    B, K, H, W, _ = shape
    x = torch.randn(B, K, H, W, generator=torch.Generator().manual_seed(seed))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def run(backend, x, upstream=None, **kwargs):
    leaf = x.detach().clone().requires_grad_()
    y = ops.conv_epilogue(leaf, backend=backend, **kwargs)
    if upstream is None:
        return y, None
    (grad,) = torch.autograd.grad(y, leaf, upstream)
    return y, grad


def test_reference_is_the_composition_with_the_contract_mask():
    x = make_input((3, 6, 6, 5, 2), channels_last=False)
    seed = torch.tensor([5])
    y = ops.conv_epilogue(x, pooled=True, p=0.25, seed=seed, blocks=2, block_offset=3, row_offset=10, stream=1, backend="reference")
    keep = rng.dropout_keep(seed, 0.25, (3, 2, 3, 3, 2), row_offset=10, block_offset=3, stream=1).reshape(3, 6, 3, 2)
    expected = torch.where(keep, F.relu(F.max_pool2d(x, 2)) / 0.75, 0.0)
    assert_close(y, expected)


@pytest.mark.parametrize("backend", COMPARED)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pooled", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.2, 0.97])
def test_fused_matches_reference(backend, shape, pooled, channels_last, p):
    x = make_input(shape, channels_last, seed=hash((shape, pooled, p)) % 1000)
    kwargs = dict(pooled=pooled, p=p, seed=77, blocks=shape[4], block_offset=2, row_offset=5, stream=3)
    y_ref, _ = run("reference", x, **kwargs)
    upstream = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1)).transpose(2, 3).contiguous().transpose(2, 3)
    y_ref, g_ref = run("reference", x, upstream, **kwargs)
    y, g = run(backend, x, upstream, **kwargs)
    assert torch.equal(y != 0, y_ref != 0), "the kept elements differ"
    assert_close(y, y_ref, msg="y")
    assert_close(g, g_ref, msg="grad_x")
    assert y.is_contiguous(memory_format=torch.channels_last) == y_ref.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", ALL)
def test_contiguous_output_and_probability_one(backend):
    x = make_input((2, 4, 6, 6, 2), channels_last=True)
    y = ops.conv_epilogue(x, pooled=True, p=0.4, seed=3, blocks=2, contiguous_output=True, backend=backend)
    assert y.is_contiguous()
    assert_close(y, ops.conv_epilogue(x, pooled=True, p=0.4, seed=3, blocks=2, backend="reference"))
    y, g = run(backend, x, torch.ones(2, 4, 3, 3), pooled=True, p=1.0, seed=3)
    assert not y.any() and not g.any(), "p = 1 drops everything, gradients included"


@pytest.mark.parametrize("backend", ALL)
def test_mask_depends_only_on_seed_block_row_and_element(backend):
    """Block t alone (``blocks=1, block_offset=t``) draws the mask it draws inside a stack of 5; rows likewise."""
    C, T = 3, 5
    stack_input = make_input((4, T * C, 8, 6, T), channels_last=True)
    stacked = ops.conv_epilogue(stack_input, pooled=True, p=0.5, seed=11, blocks=T, backend=backend)
    for t in range(T):
        alone_input = stack_input[:, t * C : (t + 1) * C].contiguous()
        alone = ops.conv_epilogue(alone_input, pooled=True, p=0.5, seed=11, block_offset=t, backend=backend)
        torch.testing.assert_close(alone, stacked[:, t * C : (t + 1) * C], rtol=0, atol=0)
    # rows 2..3 of the batch, alone
    tail = ops.conv_epilogue(stack_input[2:], pooled=True, p=0.5, seed=11, blocks=T, row_offset=2, backend=backend)
    torch.testing.assert_close(tail, stacked[2:], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("backend", KERNELS)
def test_saved_bytes_against_pytorch_composition(backend):
    """Bytes kept for the backward per input element in float32 (p = 0.2).

    Fused, pooled: ``y`` (4 bytes per output element, the tensor the next layer saves anyway) and a
    one-byte argmax: 5 / 4 = 1.25 bytes per input element, of which only the argmax (0.25) is the
    op's own; unpooled: ``y`` alone, 4. PyTorch's ``dropout(relu(max_pool2d(x)))`` keeps the pool
    input (4) and int64 indices (8 / 4 = 2), the ReLU output and the dropout mask: 8.0 measured with
    torch 2.14 (at least 7.25 by that count); ``dropout(relu(x))`` 8.0 as well.
    """
    x = make_input((8, 16, 14, 14, 2), channels_last=True)
    numel = x.numel()

    def per_element(fn) -> float:
        return saved_bytes(fn) / numel

    for pooled, fused_bytes in ((True, 1.25), (False, 4.0)):
        fused = per_element(lambda: ops.conv_epilogue(x.detach().requires_grad_(), pooled=pooled, p=0.2, seed=1, blocks=2, backend=backend))

        def composition():
            h = x.detach().requires_grad_()
            F.dropout(F.relu(F.max_pool2d(h, 2) if pooled else h), 0.2, training=True)

        assert fused == pytest.approx(fused_bytes), pooled
        assert per_element(composition) >= (7.25 if pooled else 5.0), pooled


@pytest.mark.parametrize("backend", KERNELS)
def test_custom_op_passes_opcheck(backend):
    from noprop import _custom_ops

    x = make_input((2, 4, 5, 6, 2), channels_last=True).requires_grad_()
    args = (x, rng.as_seed_tensor(4), 0.3, True, 2, 0, 0, 1, False, backend)
    torch.library.opcheck(_custom_ops.conv_epilogue, args)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pooled=True, p=1.5, seed=1), "p: expected a drop probability"),
        (dict(pooled=True, p=0.2), "seed: required"),
        (dict(pooled=True, blocks=3), "blocks: x has 4 channels"),
        (dict(pooled=True, blocks=0), "blocks: expected an int >= 1"),
        (dict(pooled=True, row_offset=-1), "row_offset: expected an int >= 0"),
        (dict(pooled=False, p=True, seed=1), "p: expected a drop probability"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ops.conv_epilogue(torch.randn(2, 4, 6, 6), **kwargs)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="x: expected conv outputs"):
        ops.conv_epilogue(torch.randn(4, 6, 6), pooled=False)
    with pytest.raises(ValueError, match="x: a 2x2 max-pool needs H, W >= 2"):
        ops.conv_epilogue(torch.randn(1, 2, 1, 6), pooled=True)


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", COMPARED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_cuda_matches_reference(backend, dtype, channels_last):
    x = make_input((16, 20, 15, 14, 4), channels_last).cuda().to(dtype)
    upstream = torch.randn(16, 20, 7, 7, device="cuda", dtype=dtype)
    kwargs = dict(pooled=True, p=0.2, seed=5, blocks=4, block_offset=1, row_offset=3, stream=2)
    y_ref, g_ref = run("reference", x.float(), upstream.float(), **kwargs)
    y, g = run(backend, x, upstream, **kwargs)
    assert y.dtype == dtype and g.dtype == dtype
    assert torch.equal((y != 0).cpu(), (y_ref != 0).cpu()), "the kept elements differ"
    assert_close(y, y_ref, dtype)
    assert_close(g, g_ref, dtype)


def test_auto_on_a_cpu_tensor_takes_the_extension_host_loop():
    """The reference draws its mask with int64 tensor arithmetic; auto prefers the extension's host loop where built."""
    from noprop import backends

    expected = "extension" if "cpu" in backends.statuses()["extension"].devices else "reference"
    assert ops.resolve_backend("conv_epilogue", "auto", torch.device("cpu"), (torch.float32,)) == expected
    assert ops.resolve_backend("conv_epilogue", "auto", torch.device("cpu"), (torch.float64,)) == "reference"
    assert ops.resolve_backend("noised_latents", "auto", torch.device("cpu"), (torch.float32,)) == "reference"
