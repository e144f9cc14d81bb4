"""Blocks a user brings: FuncBlockStack against a loop of independent blocks, launches, contract and rebuild.

Tolerance of every batched-vs-loop comparison (fp32): ``rtol=1e-4, atol=1e-5`` on outputs and
running statistics; gradients with ``atol`` relative to the block's largest gradient
(``2e-5 * max|g|``), as in tests/test_stack.py (the batched convolutions and matmuls sum in
another order than T separate ones).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from noprop import Adjoint, Backprop, NoPropCT, NoPropDT, NoPropFM, zoo
from noprop.models import build_model
from noprop.stack import BlockList
from noprop.step import TrainStep
from noprop.train import TrainConfig, build_optimizer
from noprop.user_blocks import FuncBlockStack, build_blocks
from test_step import CountOps

TOLERANCE = dict(rtol=1e-4, atol=1e-5)


class TinyBlock(nn.Module):
    """A test block with BatchNorm on both paths (the z path's statistics differ per block) and dropout.

    ``image(x)``: conv3x3(4) -> BN -> ReLU -> maxpool(4) -> dropout -> flatten; ``head``: concat with
    ReLU(BN(FC(z))) -> FC(num_classes).
    """

    def __init__(self, num_classes, in_channels, image_size, embed_dim, dropout=0.0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.bn_image = nn.BatchNorm2d(4)
        self.fc_z = nn.Linear(embed_dim, 16)
        self.bn_z = nn.BatchNorm1d(16)
        self.out = nn.Linear(4 * (image_size // 4) ** 2 + 16, num_classes)
        self.dropout = dropout

    def image(self, x):
        h = F.max_pool2d(F.relu(self.bn_image(self.conv(x))), 4)
        return F.dropout(h, self.dropout, self.training).flatten(1)

    def head(self, features, z):
        return self.out(torch.cat([features, F.relu(self.bn_z(self.fc_z(z)))], dim=-1))

    def forward(self, x, z):
        return self.head(self.image(x), z)


ARGUMENTS = dict(num_classes=10, in_channels=1, image_size=12, embed_dim=10, config=None, prototype=False, time_conditioned=False)
FACTORIES = {
    "tiny": TinyBlock,
    "resnet": functools.partial(zoo.ResNetBlock, channels=4, hidden=16),
    "mixer": functools.partial(zoo.MixerBlock, dim=16, depth=2, dropout=0.0),
    "mlp": functools.partial(zoo.MLPBlock, hidden=16),
}


def _blocks(name, T=4, seed=0):
    torch.manual_seed(seed)
    return build_blocks(FACTORIES[name], T, ARGUMENTS)


def _inputs(T=4, B=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, 12, 12, generator=g), torch.randn(T, B, 10, generator=g)


def _assert_grads_close(actual: nn.Module, expected: nn.Module, label: str) -> None:
    scale = max(p.grad.abs().max().item() for p in expected.parameters())
    for (name, p), q in zip(expected.named_parameters(), actual.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=2e-5 * scale, msg=f"{label} {name}")


def _stack_grads_as_blocks(stack: FuncBlockStack) -> list[nn.Module]:
    """Row t of every stacked gradient, as block t's ``.grad``."""
    blocks = stack.to_blocks()
    for block in blocks:
        for p in block.parameters():
            p.grad = torch.zeros_like(p)
    for name, p in stack.stacked.named_parameters():
        for t, block in enumerate(blocks):
            block.get_parameter(name).grad.copy_(p.grad[t])
    return blocks


@pytest.mark.parametrize("name", list(FACTORIES))
def test_batched_blocks_match_a_loop_of_copies(name):
    """Outputs, every gradient and the BatchNorm statistics (mean, var, count) of T user blocks run as one network."""
    T, B = 4, 6
    blocks = _blocks(name, T)
    stack = FuncBlockStack.from_blocks(blocks)
    x, z = _inputs(T, B)
    upstream = torch.randn(T, B, 10, generator=torch.Generator().manual_seed(9))
    for _ in range(2):  # two steps: the running statistics move twice
        looped = BlockList(blocks)(x, z)
        (looped * upstream).sum().backward()
        stacked = stack(x, z)
        (stacked * upstream).sum().backward()
        torch.testing.assert_close(stacked, looped, **TOLERANCE)
    for t, (block, grads) in enumerate(zip(blocks, _stack_grads_as_blocks(stack))):
        _assert_grads_close(grads, block, f"block {t}")
    restored = stack.to_blocks()
    buffers = dict(blocks[0].named_buffers())
    if name != "mixer":
        assert any(k.endswith("running_var") for k in buffers)
    for t, (block, copy_t) in enumerate(zip(blocks, restored)):
        for key, value in block.named_buffers():
            torch.testing.assert_close(copy_t.get_buffer(key), value, **TOLERANCE, msg=f"block {t} {key}")
    if name == "tiny":  # the z path's statistics differ between blocks (each reads its own z)
        assert not torch.allclose(restored[0].module.bn_z.running_mean, restored[1].module.bn_z.running_mean)
        assert int(restored[2].module.bn_z.num_batches_tracked) == 2


@pytest.mark.parametrize("name", ["tiny", "mixer"])
def test_range_of_blocks_inference_helpers_and_round_trip(name):
    blocks = _blocks(name)
    for block in blocks:
        block.eval()
    stack = FuncBlockStack.from_blocks(blocks).eval()
    loop = BlockList(blocks).eval()
    x, z = _inputs()
    torch.testing.assert_close(stack(x, z[1:3], range(1, 3)), loop(x, z[1:3], range(1, 3)), **TOLERANCE)
    features = stack.image_features(x)
    torch.testing.assert_close(features, loop.image_features(x), **TOLERANCE)
    for t in range(4):
        torch.testing.assert_close(stack.head(t, features, z[t]), loop.head(t, features, z[t]), **TOLERANCE)
    for original, back in zip(blocks, stack.to_blocks()):  # exact
        for (key, a), b in zip(original.state_dict().items(), back.state_dict().values()):
            assert torch.equal(a, b), key
        assert not back.training


def test_per_block_gradient_clipping_matches_the_loop():
    blocks = _blocks("tiny")
    stack, loop = FuncBlockStack.from_blocks(blocks), BlockList(blocks)
    x, z = _inputs()
    scales = torch.tensor([1.0, 10.0, 100.0, 0.01])[:, None, None]
    (loop(x, z) * scales).sum().backward()
    (stack(x, z) * scales).sum().backward()
    norms_loop, norms_stack = loop.clip_grad_norm_(1.0), stack.clip_grad_norm_(1.0)
    torch.testing.assert_close(norms_stack, norms_loop, **TOLERANCE)
    assert norms_loop[0] != norms_loop[2]
    for t, (block, grads) in enumerate(zip(blocks, _stack_grads_as_blocks(stack))):
        _assert_grads_close(grads, block, f"block {t}")


def test_dropout_masks_are_independent_per_block():
    """T copies of one block (same weights, same inputs) differ only through their dropout masks."""
    torch.manual_seed(0)
    one = build_blocks(functools.partial(TinyBlock, dropout=0.5), 1, ARGUMENTS)[0]
    stack = FuncBlockStack.from_blocks([copy.deepcopy(one) for _ in range(3)])
    x, z = _inputs(T=1)
    z = z.expand(3, -1, -1)
    out = stack(x, z)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
    stack.eval()
    out = stack(x, z)
    torch.testing.assert_close(out[0], out[1])


def test_dt_training_steps_give_the_same_parameters_batched_and_looped():
    """Three SGD steps of NoPropDT with a user block: FuncBlockStack vs a BlockList of the same blocks."""
    torch.manual_seed(0)
    stacked = NoPropDT(10, 1, 12, T=3, embedding="learned", block=TinyBlock)
    looped = copy.deepcopy(stacked)
    looped.blocks = BlockList(stacked.blocks.to_blocks())
    optimizers = {id(m): torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-3) for m in (stacked, looped)}
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(8, 1, 12, 12, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]
    for model in (stacked, looped):
        torch.manual_seed(123)
        for x, y in batches:
            optimizers[id(model)].zero_grad()
            model.loss(x, y).backward()
            optimizers[id(model)].step()
    for a, b in zip(stacked.blocks.to_blocks(), looped.blocks.blocks):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(stacked.embedding.weight, looped.embedding.weight, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet", "mixer"])
def test_launches_per_dt_step_with_a_user_block_do_not_grow_with_T(name):
    """ATen ops of a whole training step (forward, backward, AdamW) at T = 4 and T = 16, within 5%."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 12, 12, generator=g), torch.randint(0, 10, (8,), generator=g)
    counts = {}
    for T in (4, 16):
        torch.manual_seed(0)
        model = NoPropDT(10, 1, 12, T=T, block=FACTORIES[name])
        step = TrainStep(model, build_optimizer(model, TrainConfig()))
        step(x, y)  # creates the optimizer state
        with CountOps() as counter:
            step(x, y)
        counts[T] = counter.count
    print(f"ATen ops per DT training step ({name} block, FuncBlockStack):", counts)
    assert max(counts.values()) <= 1.05 * min(counts.values())


# ---------------------------------------------------------------------------------------------- every model


def _time_factories():
    return [
        functools.partial(zoo.ResNetBlock, channels=4, hidden=16),
        functools.partial(zoo.MixerBlock, dim=16, depth=1),
        functools.partial(zoo.MLPBlock, hidden=16),
    ]


@pytest.mark.parametrize("factory", _time_factories(), ids=["resnet", "mixer", "mlp"])
@pytest.mark.parametrize(
    "model_class,kwargs,steps",
    [(NoPropCT, {}, 4), (NoPropFM, {}, 4), (NoPropFM, {"embedding": "learned"}, 4), (Adjoint, {"ode_steps": 2}, 2)],
    ids=["ct", "fm", "fm-learned", "adjoint"],
)
def test_time_conditioned_models_run_a_user_block_end_to_end(model_class, kwargs, steps, factory):
    torch.manual_seed(0)
    model = model_class(10, 1, 12, block=factory, **kwargs)
    x, y = _inputs(B=6)[0], torch.randint(0, 10, (6,))
    loss = model.loss(x, y)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.block.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.eval()
    for solver in model_class.solvers:
        logits = model.predict(x, steps=steps, solver=solver, seed=3)
        assert logits.shape == (6, 10) and torch.isfinite(logits).all()


@pytest.mark.parametrize("schedule", ["batched", "paper"])
def test_dt_and_backprop_run_a_user_block_end_to_end(schedule):
    for model in (NoPropDT(10, 1, 12, T=3, block=zoo.MixerBlock, schedule=schedule), Backprop(10, 1, 12, T=3, block=zoo.MixerBlock)):
        x, y = _inputs(B=6)[0], torch.randint(0, 10, (6,))
        model.loss(x, y).backward()
        assert all(p.grad is not None for p in model.blocks.parameters())
        model.eval()
        assert model.predict(x, seed=1).shape == (6, 10)


# ---------------------------------------------------------------------------------------------- contract


def test_factory_receives_the_arguments_its_signature_names():
    seen = {}

    def everything(**kwargs):
        seen.update(kwargs)
        return TinyBlock(kwargs["num_classes"], kwargs["in_channels"], kwargs["image_size"], kwargs["embed_dim"])

    NoPropDT(10, 1, 12, T=2, block=everything, width=0.5)
    assert set(seen) == {"num_classes", "in_channels", "image_size", "embed_dim", "config", "prototype", "time_conditioned"}
    assert seen["time_conditioned"] is False and seen["config"].hidden == 128
    NoPropFM(10, 1, 12, block=everything)
    assert seen["time_conditioned"] is True


def test_wrong_logits_shape_is_named_on_first_use():
    class Wrong(nn.Module):
        def __init__(self, embed_dim):
            super().__init__()
            self.fc = nn.Linear(embed_dim, 7)

        def forward(self, x, z, t=None):
            return self.fc(z)

    x, y = _inputs(B=6)[0], torch.randint(0, 10, (6,))
    for model in (NoPropDT(10, 1, 12, T=2, block=Wrong), NoPropCT(10, 1, 12, block=Wrong), Backprop(10, 1, 12, T=2, block=Wrong)):
        with pytest.raises(ValueError, match=r"block: .*Wrong returned shape \[6, 7\].*\[6, 10\]"):
            model.loss(x, y)


def test_bad_factories_are_refused_by_name():
    with pytest.raises(TypeError, match="block: expected a factory .* TinyBlock instance"):
        NoPropDT(10, 1, 12, T=2, block=TinyBlock(10, 1, 12, 10))
    with pytest.raises(TypeError, match="block: the factory .* returned a int"):
        NoPropDT(10, 1, 12, T=2, block=lambda **_: 3)
    with pytest.raises(ValueError, match="block: the factory .*needs.* functools.partial"):
        NoPropDT(10, 1, 12, T=2, block=lambda num_classes, needs: None)
    with pytest.raises(TypeError, match="block: expected a factory"):
        NoPropCT(10, 1, 12, block=42)
    shared = nn.Linear(10, 10)
    with pytest.raises(ValueError, match="block: the blocks share a parameter"):
        NoPropDT(10, 1, 12, T=2, block=lambda **_: nn.Sequential(shared))


def test_config_records_the_factory_and_rebuilding_needs_it(tmp_path):
    torch.manual_seed(0)
    model = NoPropDT(10, 1, 12, T=2, block=TinyBlock).eval()
    config = model.config()
    assert config["block"] == "test_user_blocks:TinyBlock"
    assert "block" not in NoPropDT(10, 1, 12, T=2).config()  # the paper's block: config unchanged
    with pytest.raises(ValueError, match="block: 'test_user_blocks:TinyBlock' is the name .* pass the factory itself"):
        build_model("dt", **config)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    rebuilt = NoPropDT(**{**config, "block": TinyBlock}).eval()
    rebuilt.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    x = _inputs(B=6)[0]
    torch.testing.assert_close(rebuilt.predict(x, seed=5), model.predict(x, seed=5))


def test_compiled_dt_step_with_a_user_block_matches_eager():
    """torch.compile(fullgraph=True) traces the vmapped functional_call: the same losses, parameters and
    BatchNorm statistics as eager after three SGD steps (a MLPBlock, which has BatchNorm and no dropout)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager_model = NoPropDT(10, 1, 12, T=3, block=functools.partial(zoo.MLPBlock, hidden=16))
    compiled_model = copy.deepcopy(eager_model)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 1, 12, 12, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]
    losses = {}
    for name, model, compile in (("eager", eager_model, False), ("compiled", compiled_model, True)):
        step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), compile=compile)
        torch.manual_seed(7)
        losses[name] = torch.stack([step(x, y).total for x, y in batches])
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=1e-4, atol=1e-4)
    for (name, p), q in zip(eager_model.state_dict().items(), compiled_model.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-5, msg=name)
