"""Training steps: launches independent of T, chunks, clipping, torch.compile and CUDA graphs vs eager."""

from __future__ import annotations

import copy

import pytest
import torch

from bench.cpu_step import CountOps
from bench.loops import SeedStyleLoop
from conftest import fused_backend_or_skip
from noprop import NoPropDT, backends
from noprop.step import TrainStep, restore_optimizer_state_, snapshot_optimizer_state
from noprop.train import TrainConfig, build_optimizer


def _batch(B=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, 28, 28, generator=g), torch.randint(0, 10, (B,), generator=g)


def _dt(T, **kwargs):
    torch.manual_seed(0)
    return NoPropDT(10, 1, 28, T=T, width=0.125, **kwargs)


def _ops_per_step(step, x, y) -> int:
    step(x, y)  # the first step creates the optimizer state
    with CountOps() as counter:
        step(x, y)
    return counter.count


def test_launches_per_step_do_not_grow_with_T():
    x, y = _batch()
    counts = {}
    for T in (5, 10, 20):
        model = _dt(T)
        counts[T] = _ops_per_step(TrainStep(model, build_optimizer(model, TrainConfig())), x, y)
    print("ATen ops per DT training step (BlockStack):", counts)
    assert max(counts.values()) <= 1.05 * min(counts.values())
    seed_style = SeedStyleLoop(_dt(10, schedule="paper"), lr=1e-3, weight_decay=1e-3)
    looped = _ops_per_step(seed_style, x, y)
    print(f"seed-style loop at T=10: {looped} ops ({looped / counts[10]:.1f}x)")
    assert looped >= 5 * counts[10]


def test_grad_clip_limits_every_block_separately():
    x, y = _batch()
    norms = {}
    for clip in (None, 0.1):
        model = _dt(3)
        step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), grad_clip=clip)
        torch.manual_seed(1)
        step(x, y)  # lr 0: the gradients stay in .grad for inspection
        norms[clip] = model.blocks.clip_grad_norm_(float("inf"))
    assert norms[None].min() < 0.1 < norms[None].max()  # one block under the limit, others over
    torch.testing.assert_close(norms[0.1], norms[None].clamp(max=0.1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_block_chunks_compute_the_unchunked_gradients(chunk):
    """Chunks of k blocks, each backpropagated before the next runs, give the one-pass gradients.

    Dropout on: the step draws its noise and dropout seeds once and every chunk's blocks get the
    noise and masks they get in one pass, so the comparison is exact up to float summation order.
    """
    x, y = _batch()
    grads, totals = {}, {}
    for k in (None, chunk):
        model = _dt(3)
        assert model.blocks.config.dropout > 0
        step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), block_chunk=k)
        torch.manual_seed(5)  # the same step seeds for both runs
        totals[k] = step(x, y).total
        grads[k] = [p.grad.clone() for p in model.parameters()]
    torch.testing.assert_close(totals[chunk], totals[None], rtol=1e-5, atol=1e-5)
    # gradients that are zero in exact arithmetic (a bias before BatchNorm) keep rounding noise of
    # about 1e-6 of the largest gradient, which depends on the summation order: scale atol by it
    scale = max(g.abs().max().item() for g in grads[None])
    for g_chunk, g_full in zip(grads[chunk], grads[None]):
        torch.testing.assert_close(g_chunk, g_full, rtol=1e-4, atol=2e-5 * scale)


@pytest.mark.parametrize("backend", backends.names())
def test_compiled_step_matches_eager(backend):
    """torch.compile(fullgraph=True) of the DT loss on CPU gives the eager losses and parameters.

    With a fused backend the ops are torch.library custom ops inside the compiled graph.

    SGD, not AdamW: Adam's first step is ``lr * sign(g)`` and would turn rounding noise in the
    gradients that are zero in exact arithmetic (biases before BatchNorm) into ``lr``-sized gaps.
    """
    if backend != "reference":
        fused_backend_or_skip(backend)
    torch._dynamo.reset()
    eager_model = _dt(3, backend=backend)
    compiled_model = copy.deepcopy(eager_model)
    for m in (eager_model, compiled_model):
        for module in m.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    eager = TrainStep(eager_model, sgd(eager_model))
    compiled = TrainStep(compiled_model, sgd(compiled_model), compile=True)
    batches = [_batch(seed=s) for s in range(3)]
    losses = {}
    for name, step in (("eager", eager), ("compiled", compiled)):
        torch.manual_seed(7)
        losses[name] = torch.stack([step(x, y).total for x, y in batches])
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=1e-4, atol=1e-4)
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-5)


def test_step_rejects_bad_combinations():
    model = _dt(2)
    optimizer = build_optimizer(model, TrainConfig())
    with pytest.raises(ValueError, match="block_chunk"):
        TrainStep(model, optimizer, block_chunk=0)
    with pytest.raises(ValueError, match="grad_clip"):
        TrainStep(model, optimizer, grad_clip=-1.0)
    with pytest.raises(ValueError, match="choose one"):
        TrainStep(model, optimizer, compile=True, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs"):
        TrainStep(_dt(2, schedule="paper"), optimizer, cuda_graphs=True)
    with pytest.raises(ValueError, match="CUDA tensors"):
        TrainStep(model, optimizer, cuda_graphs=True)(*_batch())


@pytest.mark.parametrize("optimizer_class", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("steps_before", [0, 2])
def test_optimizer_restore_keeps_tensors_and_undoes_warm_up(optimizer_class, steps_before):
    """What graph capture relies on: after warm-up steps and a restore, the state tensors are the
    same objects (the graph updates them in place) and the next step is the step an optimizer that
    never warmed up would take, from a fresh state (steps_before=0) or a trained one."""
    torch.manual_seed(3)
    layer = torch.nn.Linear(5, 3)
    twin = copy.deepcopy(layer)
    optimizer = optimizer_class(layer.parameters(), lr=0.1, weight_decay=0.01, foreach=True)
    reference = optimizer_class(twin.parameters(), lr=0.1, weight_decay=0.01, foreach=True)
    inputs = [torch.randn(4, 5) for _ in range(steps_before + 4)]

    def step(module, opt, x):
        opt.zero_grad()
        module(x).square().sum().backward()
        opt.step()

    for x in inputs[:steps_before]:
        step(layer, optimizer, x)
        step(twin, reference, x)
    parameters = copy.deepcopy(layer.state_dict())
    snapshot = snapshot_optimizer_state(optimizer)
    for x in inputs[steps_before : steps_before + 3]:  # the warm-up
        step(layer, optimizer, x)
    state_objects = {id(v) for state in optimizer.state.values() for v in state.values()}
    layer.load_state_dict(parameters)
    restore_optimizer_state_(optimizer, snapshot)
    assert {id(v) for state in optimizer.state.values() for v in state.values()} == state_objects
    step(layer, optimizer, inputs[-1])
    step(twin, reference, inputs[-1])
    for p, q in zip(layer.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for p, q in zip(layer.parameters(), twin.parameters()):
        for name, value in reference.state[q].items():
            torch.testing.assert_close(optimizer.state[p][name], value, rtol=1e-6, atol=1e-7)


def test_optimizer_restore_and_cuda_graphs_reject_other_optimizers():
    model = _dt(2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(TypeError, match="optimizer: restoring a fresh state needs Adam or AdamW"):
        restore_optimizer_state_(sgd, {})
    with pytest.raises(TypeError, match="optimizer: cuda_graphs supports Adam and AdamW"):
        TrainStep(model, sgd, cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_cuda_graph_step_matches_eager(backend):
    """Capturing forward, backward and optimizer step in a CUDA graph gives the eager losses (same seed)."""
    eager_model = _dt(4, backend=backend).cuda()
    graph_model = copy.deepcopy(eager_model)
    config = TrainConfig(cuda_graphs=True)
    eager = TrainStep(eager_model, build_optimizer(eager_model, config))
    graphed = TrainStep(graph_model, build_optimizer(graph_model, config), cuda_graphs=True)
    batches = [tuple(t.cuda() for t in _batch(B=32, seed=s)) for s in range(4)]
    losses = {}
    for name, step in (("eager", eager), ("graph", graphed)):
        torch.manual_seed(11)
        losses[name] = torch.stack([step(x, y).total.clone() for x, y in batches])
    torch.testing.assert_close(losses["graph"], losses["eager"], rtol=1e-4, atol=1e-4)
