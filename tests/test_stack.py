"""BlockStack against a loop of independent blocks: outputs, gradients, statistics, training steps."""

from __future__ import annotations

import copy

import pytest
import torch

from noprop import NoPropDT
from noprop.blocks import BlockConfig, DropoutKey, DTBlock
from noprop.stack import BlockList, BlockStack

TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # fp32; the stack sums in a different order than the loop


def assert_grads_close(actual: DTBlock, expected: DTBlock, label: str) -> None:
    """Gradients of one block, with an absolute tolerance relative to the block's largest gradient.

    Some gradients are zero in exact arithmetic (a linear bias followed by BatchNorm) and are left
    with rounding noise of the size of the other gradients times 1e-6, which differs by layout.
    """
    scale = max(p.grad.abs().max().item() for p in expected.parameters())
    for (name, p), g in zip(expected.named_parameters(), actual.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=2e-5 * scale, msg=f"{label} {name}")


CONFIG = BlockConfig.scaled(0.125)  # dropout 0.2, on: the counter-based masks match between layouts
KEY = DropoutKey(torch.tensor([2024]))  # one training forward's dropout key, passed to both layouts


def _blocks(T=4, size=28, channels=1, classes=10, dim=10, seed=0, prototype=False):
    torch.manual_seed(seed)
    dim = channels * size * size if prototype else dim
    return [DTBlock(classes, channels, size, dim, CONFIG, prototype=prototype) for _ in range(T)]


def _inputs(T=4, B=6, size=28, channels=1, dim=10, seed=1, prototype=False):
    g = torch.Generator().manual_seed(seed)
    dim = channels * size * size if prototype else dim
    return torch.randn(B, channels, size, size, generator=g), torch.randn(T, B, dim, generator=g)


def _as_block_grads(stack: BlockStack) -> list[DTBlock]:
    """The stack's gradients laid out as T DTBlocks (a stack whose weights are the gradients)."""
    grads = copy.deepcopy(stack)
    with torch.no_grad():
        for param, source in zip(grads.parameters(), stack.parameters()):
            param.copy_(source.grad)
    return grads.to_blocks()


def test_round_trip_is_exact():
    blocks = _blocks()
    for block in blocks:  # non-trivial BatchNorm statistics
        block(*_inputs(T=1, B=8)[:1], torch.randn(8, 10), dropout_key=KEY)
    back = BlockStack.from_blocks(blocks).to_blocks()
    for original, restored in zip(blocks, back):
        for (name, a), (_, b) in zip(original.state_dict().items(), restored.state_dict().items()):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("size,channels,prototype", [(28, 1, False), (32, 3, False), (9, 1, False), (12, 3, True)])
def test_forward_and_gradients_match_a_loop_of_blocks(size, channels, prototype):
    T, B = 4, 6
    blocks = _blocks(T, size, channels, prototype=prototype)
    stack = BlockStack.from_blocks(blocks)
    x, z = _inputs(T, B, size, channels, prototype=prototype)
    upstream = torch.randn(T, B, 10, generator=torch.Generator().manual_seed(9))

    looped = BlockList(blocks)(x, z, dropout_key=KEY)
    (looped * upstream).sum().backward()
    stacked = stack(x, z, dropout_key=KEY)
    (stacked * upstream).sum().backward()

    torch.testing.assert_close(stacked, looped, **TOLERANCE)
    for t, (block, grads) in enumerate(zip(blocks, _as_block_grads(stack))):
        assert_grads_close(grads, block, f"block {t}")
    for t, (block, restored) in enumerate(zip(blocks, stack.to_blocks())):  # BatchNorm running statistics
        label_norm = "label.bn.running_var" if prototype else "label.bn2.running_var"
        for name in ("image.bn.running_mean", label_norm, "fusion.bn1.running_mean"):
            torch.testing.assert_close(restored.state_dict()[name], block.state_dict()[name], **TOLERANCE)


def test_a_range_of_blocks_and_inference_helpers_match():
    blocks = _blocks()
    stack = BlockStack.from_blocks(blocks).eval()
    loop = BlockList(blocks).eval()
    x, z = _inputs()
    torch.testing.assert_close(stack(x, z[1:3], range(1, 3)), loop(x, z[1:3], range(1, 3)), **TOLERANCE)
    features = stack.image_features(x)
    torch.testing.assert_close(features, loop.image_features(x), **TOLERANCE)
    for t in range(4):
        torch.testing.assert_close(stack.head(t, features, z[t]), loop.head(t, features, z[t]), **TOLERANCE)


def test_per_block_gradient_clipping_matches():
    blocks = _blocks()
    stack = BlockStack.from_blocks(blocks)
    loop = BlockList(blocks)
    x, z = _inputs()
    scales = torch.tensor([1.0, 10.0, 100.0, 0.01])[:, None, None]
    (loop(x, z, dropout_key=KEY) * scales).sum().backward()
    (stack(x, z, dropout_key=KEY) * scales).sum().backward()
    norms_loop = loop.clip_grad_norm_(1.0)
    norms_stack = stack.clip_grad_norm_(1.0)
    torch.testing.assert_close(norms_stack, norms_loop, **TOLERANCE)
    assert norms_loop[0] != norms_loop[2]  # the blocks' norms really differ
    for t, (block, grads) in enumerate(zip(blocks, _as_block_grads(stack))):
        clipped = torch.sqrt(sum(p.grad.square().sum() for p in block.parameters()))
        assert clipped <= 1.0 + 1e-4
        assert_grads_close(grads, block, f"block {t}")


def test_a_block_draws_the_same_masks_alone_and_inside_a_stack_of_five():
    """Block t alone (``block_index = t``) and as block t of a stack of 5: the same training-mode output."""
    blocks = _blocks(T=5)
    stack = BlockStack.from_blocks(blocks)
    x, z = _inputs(T=5)
    stacked = stack(x, z, dropout_key=KEY)
    for t, block in enumerate(stack.to_blocks()):
        alone = block(x, z[t], dropout_key=KEY)
        torch.testing.assert_close(alone, stacked[t], **TOLERANCE)
        assert not torch.allclose(alone, block(x, z[t], dropout_key=DropoutKey(torch.tensor([1])))), "dropout is on"


def test_training_steps_give_the_same_parameters_both_ways():
    """Five optimizer steps of NoProp-DT, dropout on, from one initial state and seed: BlockStack vs the loop.

    SGD with momentum and weight decay: Adam's first step is ``lr * sign(g)``, so gradients that
    are zero in exact arithmetic (a bias before BatchNorm) move by ``lr`` in a direction set by
    rounding noise, which differs between layouts, and the comparison would test the rounding.
    """
    torch.manual_seed(0)
    stacked = NoPropDT(10, 1, 28, T=3, embedding="learned", width=0.125)
    looped = copy.deepcopy(stacked)
    looped.blocks = BlockList(stacked.blocks.to_blocks())
    assert stacked.blocks.config.dropout > 0
    models = {"stack": stacked, "loop": looped}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-3) for name, m in models.items()}
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(5)]
    for name, model in models.items():
        torch.manual_seed(123)  # the same noise and dropout seeds for both
        for x, y in batches:
            optimizers[name].zero_grad()
            model.loss(x, y).backward()
            optimizers[name].step()
    for a, b in zip(stacked.blocks.to_blocks(), looped.blocks.blocks):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(stacked.embedding.weight, looped.embedding.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stacked.classifier.weight, looped.classifier.weight, rtol=1e-4, atol=1e-5)


def test_from_blocks_rejects_mismatched_blocks():
    with pytest.raises(ValueError, match="blocks"):
        BlockStack.from_blocks([])
    mixed = [DTBlock(10, 1, 28, 10, CONFIG), DTBlock(10, 1, 32, 10, CONFIG)]
    with pytest.raises(ValueError, match="same arguments"):
        BlockStack.from_blocks(mixed)
