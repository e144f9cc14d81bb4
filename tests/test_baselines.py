"""The paper's two back-propagation baselines against hand-written recursions.

``Backprop`` (Section 4): ``z_t = (1 - alpha_t) z_{t-1} + alpha_t u_hat_t``, ``alpha_t = tanh(w_t)``.
``Adjoint`` (Table 1): a neural ODE ``dz/dt = block(x, z, t) @ W`` trained with torchdiffeq's
adjoint method.
"""

from __future__ import annotations

import pytest
import torch

from noprop import Adjoint, Backprop, rng
from noprop.models.ode import integrate

WIDTH = 0.125


def _batch(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, 12, 12, generator=g), torch.randint(0, 10, (B,), generator=g)


# ---------------------------------------------------------------------------------------------- Backprop


def test_backprop_mixing_is_tanh_of_its_parameter():
    model = Backprop(10, 1, 12, T=4, width=WIDTH)
    with torch.no_grad():
        model.mixing_logit.copy_(torch.tensor([-2.0, 0.1, 0.7, 3.0]))
    torch.testing.assert_close(model.mixing, torch.tanh(torch.tensor([-2.0, 0.1, 0.7, 3.0])))


@pytest.mark.parametrize("embedding", ["onehot", "learned"])
def test_backprop_recursion_matches_a_hand_written_loop(embedding):
    """The chain, block by block with independent DTBlock copies, in eval mode (no dropout, fixed BN)."""
    torch.manual_seed(0)
    model = Backprop(10, 1, 12, T=3, embedding=embedding, width=WIDTH).eval()
    with torch.no_grad():
        model.mixing_logit.copy_(torch.tensor([0.3, -0.4, 1.2]))
    x, _ = _batch()
    z0 = torch.randn(6, model.embed_dim)
    W = model.embedding.weight.detach()
    z = z0
    for t, block in enumerate(model.blocks.to_blocks()):
        block.eval()
        alpha = torch.tanh(model.mixing_logit[t].detach())
        u_hat = torch.softmax(block(x, z), dim=-1) @ W
        z = (1 - alpha) * z + alpha * u_hat
    expected = z @ model.classifier.weight.detach().T + model.classifier.bias.detach()
    torch.testing.assert_close(model(x, z0), expected, rtol=1e-4, atol=1e-5)


def test_backprop_trains_every_block_and_the_mixing_end_to_end():
    torch.manual_seed(1)
    model = Backprop(10, 1, 12, T=3, embedding="learned", width=WIDTH)
    x, y = _batch(B=8)
    model.loss(x, y).backward()
    stacked = model.blocks
    for name in ("image.conv1.weight", "label.fc1.weight", "fusion.out.weight"):
        gradient = stacked.get_parameter(name).grad.unflatten(0, (3, -1))
        assert (gradient.flatten(1).abs().sum(1) > 0).all(), f"every block's {name} gets a gradient"
    assert (model.mixing_logit.grad.abs() > 0).all()
    assert model.embedding.weight.grad.abs().sum() > 0


def test_backprop_starts_from_standard_normal_noise():
    model = Backprop(10, 1, 12, T=2, width=WIDTH).eval()
    x, _ = _batch(B=4)
    torch.testing.assert_close(model.predict(x, seed=5), model(x, rng.normal(5, (4, 10))))
    torch.testing.assert_close(model.predict(x, deterministic=True), model(x, torch.zeros(4, 10)))
    assert not torch.allclose(model.predict(x, seed=5), model.predict(x, seed=6))


# ---------------------------------------------------------------------------------------------- Adjoint

torchdiffeq = pytest.importorskip("torchdiffeq", reason="the Adjoint baseline needs torchdiffeq")


def _adjoint_model(steps: int, embedding: str = "learned") -> Adjoint:
    torch.manual_seed(2)
    return Adjoint(10, 1, 12, embedding=embedding, ode_steps=steps, width=WIDTH).eval()


def test_adjoint_forward_is_the_euler_solution_of_its_ode():
    """``z_1`` equals a hand-run Euler integration of ``dz/dt = head(features, z, t) @ W`` on the same grid."""
    model = _adjoint_model(steps=16)
    x, _ = _batch()
    z0 = torch.randn(6, model.embed_dim)
    with torch.no_grad():
        z1 = model.integrate_adjoint(x, z0)
        features = model.block.image(x)
        z, h = z0, 1.0 / 16
        for k in range(16):
            t = torch.full((6,), k * h)
            z = z + h * (model.block.head(features, z, t) @ model.embedding.weight)
    torch.testing.assert_close(z1, z, rtol=1e-5, atol=1e-5)
    # the inference path (fused latent_update, P = 1, Q = 0, linear readout) integrates the same ODE
    P, Q = model.ode_coefficients(torch.linspace(0, 1, 17))
    with torch.no_grad():
        z_inference = integrate(
            lambda z, t: model.block.head(features, z, t), model.embedding.weight, z0, P, Q, "euler", "linear", "reference"
        )
    torch.testing.assert_close(z_inference, z, rtol=1e-5, atol=1e-5)


def test_adjoint_gradients_match_backprop_through_the_solver():
    """The adjoint pass (Euler backwards in time) approximates the exact gradient of the Euler solve.

    The two differ by O(step): at 200 steps the largest relative difference of a parameter's
    gradient was 1.7%, at 400 steps 0.85% (first order, as expected); the test allows 3% at 200.
    """
    steps = 200
    model = _adjoint_model(steps)
    x, y = _batch(B=4)
    z0 = torch.randn(4, model.embed_dim)
    parameters = [p for p in model.parameters() if p.requires_grad]

    adjoint_loss = torch.nn.functional.cross_entropy(model.classifier(model.integrate_adjoint(x, z0)), y)
    adjoint_grads = torch.autograd.grad(adjoint_loss, parameters, allow_unused=True)

    features = model.block.image(x)
    z, h = z0, 1.0 / steps
    for k in range(steps):
        z = z + h * model.velocity(features, z, torch.full((4,), k * h))
    direct_loss = torch.nn.functional.cross_entropy(model.classifier(z), y)
    direct_grads = torch.autograd.grad(direct_loss, parameters, allow_unused=True)

    torch.testing.assert_close(adjoint_loss, direct_loss, rtol=1e-5, atol=1e-6)
    checked = 0
    for (name, _), a, d in zip(((n, p) for n, p in model.named_parameters() if p.requires_grad), adjoint_grads, direct_grads):
        if d is None or d.abs().max() == 0:
            assert a is None or a.abs().max() == 0, name
            continue
        assert a is not None, f"{name}: no adjoint gradient"
        assert (a - d).norm() <= 0.03 * d.norm(), name
        checked += 1
    assert checked >= 10  # convolutions (through the features), label, time, fusion, embedding, classifier


def test_adjoint_loss_trains_the_conv_path_and_the_embedding():
    model = _adjoint_model(steps=8).train()
    x, y = _batch(B=5)
    model.loss(x, y).backward()
    assert model.block.image.conv1.weight.grad.abs().sum() > 0
    assert model.embedding.weight.grad.abs().sum() > 0
    assert model.classifier.weight.grad.abs().sum() > 0
