"""Model math against independent formulas, ruling out the known traps of public implementations.

Traps (the paper's sections 2-3, arXiv 2503.24322): reversed schedule orientation, ``abar`` instead of ``sqrt(abar)`` on the
signal, predicting the noise instead of ``u_y``, skipping Eq. 3's ``a, b, c`` at inference,
evaluating with the true label.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from noprop import Backprop, NoPropCT, NoPropDT, NoPropFM, rng
from noprop.objectives import kl_to_standard_normal
from noprop.train import evaluate

WIDTH = 0.125


def _batch(B=6, channels=1, size=28, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, channels, size, size, generator=g), torch.randint(0, classes, (B,), generator=g)


class FixedLogits(nn.Module):
    """Stands in for the T blocks: block t returns ``logits[t]`` whatever its input (records the inputs)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits  # [T, B, C]
        self.seen_z = []

    def forward(self, x, z, blocks=None):
        blocks = range(self.logits.shape[0]) if blocks is None else blocks
        self.seen_z.append(z.clone())
        return self.logits[blocks.start : blocks.stop]

    def image_features(self, x):
        return torch.zeros(self.logits.shape[0], x.shape[0], 1)

    def head(self, t, features, z):
        self.seen_z.append(z.clone())
        return self.logits[t]


# ---------------------------------------------------------------------------------------------- DT training


def test_dt_training_inputs_use_sqrt_alpha_bar():
    model = NoPropDT(10, 1, 28, T=4, embedding="learned", width=WIDTH)
    _, y = _batch()
    z = model.noised_inputs(y, seed=123)
    eps = rng.normal(123, (5, 6, model.embed_dim))
    alpha_bar = model.noise_schedule.alpha_bar.float()  # t = 0..T; rows 0..T-1 feed the blocks, row T the classifier
    u = model.embedding.weight[y]
    expected = alpha_bar.sqrt()[:, None, None] * u + (1 - alpha_bar).sqrt()[:, None, None] * eps
    torch.testing.assert_close(z, expected)
    wrong = alpha_bar[:, None, None] * u + (1 - alpha_bar).sqrt()[:, None, None] * eps
    assert not torch.allclose(z, wrong, atol=1e-3)


def test_dt_block_t_sees_the_noisier_latent_z_t_minus_1():
    """Orientation: block 1 gets the noisiest input (abar_0 ~ 0), block T the cleanest."""
    model = NoPropDT(10, 1, 28, T=5, width=WIDTH)
    x, y = _batch(B=4096)
    fake = FixedLogits(torch.zeros(5, 4096, 10))
    model.blocks = fake
    model.loss_terms(x, y)
    z = fake.seen_z[0]  # [T, B, D], row t is block t+1's input
    signal = torch.stack([(z[t] * model.embedding.weight[y]).sum(-1).mean() for t in range(5)])
    # the projection on u_y estimates sqrt(abar_{t-1}) (standard error ~0.016 at B = 4096)
    torch.testing.assert_close(signal, model.noise_schedule.alpha_bar[:5].sqrt().float(), rtol=0, atol=0.06)
    assert torch.all(signal[1:] > signal[:-1])


def test_dt_target_is_the_clean_label_embedding():
    """Blocks that output u_y exactly have zero L2 loss; noise-predicting ones would not."""
    model = NoPropDT(10, 1, 28, T=3, width=WIDTH)
    x, y = _batch()
    perfect = 1e4 * nn.functional.one_hot(y, 10).float().expand(3, -1, -1)
    model.blocks = FixedLogits(perfect)
    terms = model.loss_terms(x, y)
    assert terms.parts["l2"].shape == (3,)
    assert terms.parts["l2"].abs().max() < 1e-6
    wrong = 1e4 * nn.functional.one_hot((y + 1) % 10, 10).float().expand(3, -1, -1)
    model.blocks = FixedLogits(wrong)
    terms = model.loss_terms(x, y)
    weights = model.noise_schedule.loss_weights(model.eta).float()
    torch.testing.assert_close(terms.parts["l2"], 2 * weights)  # ||e_j - e_y||^2 = 2 per example


def test_dt_loss_terms_add_up_and_kl_has_the_closed_form():
    model = NoPropDT(10, 1, 28, T=3, embedding="learned", width=WIDTH)
    x, y = _batch()
    torch.manual_seed(0)
    terms = model.loss_terms(x, y)
    torch.testing.assert_close(terms.total.detach(), terms.parts["l2"].sum() + terms.parts["ce"] + terms.parts["kl"])
    abar_0 = model.noise_schedule.alpha_bar[0].float()
    mean = abar_0.sqrt() * model.embedding.weight[y].detach()
    closed_form = 0.5 * (mean.square().sum(-1) + mean.shape[1] * (1 - abar_0 - 1 - torch.log(1 - abar_0))).mean()
    torch.testing.assert_close(terms.parts["kl"], closed_form)


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(7, 5, generator=g)
    variance = torch.rand(7, generator=g) + 0.1
    q = torch.distributions.Normal(mean, variance.sqrt()[:, None])
    p = torch.distributions.Normal(torch.zeros(7, 5), torch.ones(7, 5))
    expected = torch.distributions.kl_divergence(q, p).sum(-1).mean()
    torch.testing.assert_close(kl_to_standard_normal(mean, variance), expected)


def test_dt_gradients_stay_inside_each_block():
    """Block t's loss term reaches block t's parameters and no other block's."""
    from noprop.stack import BlockList

    model = NoPropDT(10, 1, 28, T=3, width=WIDTH, schedule="paper")
    assert isinstance(model.blocks, BlockList)
    x, y = _batch()
    model.loss_terms(x, y, blocks=range(1, 2)).total.backward()
    for t, block in enumerate(model.blocks.blocks):
        grads = [p.grad for p in block.parameters()]
        if t == 1:
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None for g in grads)


# ---------------------------------------------------------------------------------------------- DT inference


@pytest.mark.parametrize("deterministic", [False, True])
def test_dt_inference_applies_eq3(deterministic):
    T, B, C = 4, 5, 10
    model = NoPropDT(C, 1, 28, T=T, embedding="learned", width=WIDTH).eval()
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(T, B, C, generator=g)
    model.blocks = FixedLogits(logits)
    model.classifier = nn.Identity()  # expose z_T itself
    x, _ = _batch(B=B)
    out = model.predict(x, seed=77, deterministic=deterministic)
    W = model.embedding.weight.detach()
    s = model.noise_schedule
    z = torch.zeros(B, W.shape[1]) if deterministic else rng.normal(77, (B, W.shape[1]))
    for t in range(1, T + 1):
        u_hat = torch.softmax(logits[t - 1], -1) @ W
        noise = 0 if deterministic else s.c[t - 1].sqrt().item() * rng.normal(77 + t, (B, W.shape[1]))
        z = s.a[t - 1].item() * u_hat + s.b[t - 1].item() * z + noise
    torch.testing.assert_close(out, z, rtol=1e-4, atol=1e-5)
    # skipping the update (taking the last block's u_hat as z_T) gives something else
    assert not torch.allclose(out, torch.softmax(logits[-1], -1) @ W, atol=1e-3)


def test_evaluation_never_reads_the_label():
    model = NoPropDT(10, 1, 28, T=2, width=WIDTH)
    x, y = _batch(B=32)
    shuffled = y[torch.randperm(32, generator=torch.Generator().manual_seed(1))]
    torch.manual_seed(5)
    _, predictions = evaluate(model, x, y)
    torch.manual_seed(5)
    _, predictions_shuffled_labels = evaluate(model, x, shuffled)
    assert torch.equal(predictions, predictions_shuffled_labels)
    import inspect

    for cls in (NoPropDT, NoPropCT, NoPropFM, Backprop):
        assert "y" not in inspect.signature(cls.predict).parameters


# ---------------------------------------------------------------------------------------------- CT and FM


class ConstantTarget(nn.Module):
    """A CT/FM block that ignores its input and points at class ``c`` (logits = ``scale * e_c``)."""

    def __init__(self, num_classes, c, scale):
        super().__init__()
        self.logits = torch.zeros(num_classes)
        self.logits[c] = scale
        self.image = lambda x: torch.zeros(x.shape[0], 1)

    def head(self, features, z, t):
        return self.logits.expand(z.shape[0], -1)

    def forward(self, x, z, t):
        return self.head(None, z, t)


@pytest.mark.parametrize("solver,steps,tolerance", [("euler", 4000, 2e-3), ("heun", 200, 2e-4)])
def test_ct_inference_follows_the_exact_path_when_u_hat_is_right(solver, steps, tolerance):
    """With u_hat = u and z(0) = sqrt(abar(0)) u + sqrt(1 - abar(0)) eps, the ODE lands on z(1) of the same eps."""
    model = NoPropCT(10, 1, 28, width=WIDTH).eval()
    model.block = ConstantTarget(10, c=3, scale=1e4)
    from noprop.models.ode import integrate

    u = torch.eye(10)[3].expand(4, -1)
    eps = torch.randn(4, 10)
    ends = model.noise_schedule.alpha_bar(torch.tensor([0.0, 1.0])).detach()
    z0 = ends[0].sqrt() * u + (1 - ends[0]).sqrt() * eps
    with torch.no_grad():
        P, Q = model.noise_schedule.ode_coefficients(torch.linspace(0, 1, steps + 1))
        z1 = integrate(lambda z, t: model.block.head(None, z, t), model.embedding.weight, z0, P, Q, solver, "softmax", "reference")
    expected = ends[1].sqrt() * u + (1 - ends[1]).sqrt() * eps
    torch.testing.assert_close(z1, expected, rtol=0, atol=tolerance)


def test_ct_loss_trains_the_schedule_and_weights_by_snr_derivative():
    """``l2 = (eta / 2) mean_i SNR'(t_i) ||softmax(logits_i) @ W - u_y||^2``, SNR' by autograd of SNR(t)."""
    torch.manual_seed(4)
    model = NoPropCT(10, 1, 28, eta=0.7, embedding="learned", width=WIDTH)
    x, y = _batch(B=9)
    fixed_logits = torch.randn(9, 10)
    captured = {}

    class Recording(nn.Module):
        def forward(self, x, z_t, t):
            captured["t"] = t
            return fixed_logits

    block = model.block
    model.block = Recording()
    terms = model.loss_terms(x, y)
    t = captured["t"].detach().clone().requires_grad_()
    (snr_slope,) = torch.autograd.grad(model.noise_schedule.snr(t).sum(), t)  # independent of snr_derivative
    W = model.embedding.weight.detach()
    squared_error = (torch.softmax(fixed_logits, -1) @ W - W[y]).square().sum(-1)
    expected = 0.7 / 2 * (snr_slope * squared_error).mean()
    torch.testing.assert_close(terms.parts["l2"].reshape(()), expected, rtol=1e-4, atol=1e-6)
    assert snr_slope.min() > 0 and snr_slope.max() > 2 * snr_slope.min()  # the weighting is not constant
    model.block = block
    model.loss(x, y).backward()
    for name, parameter in model.noise_schedule.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_fm_inference_integrates_the_velocity(solver):
    """A block whose velocity is constant (v = e_3 - e_0 via the linear readout) moves z by exactly v."""
    model = NoPropFM(10, 1, 28, width=WIDTH).eval()
    velocity = torch.zeros(10)
    velocity[3], velocity[0] = 1.0, -1.0

    class ConstantVelocity(ConstantTarget):
        def head(self, features, z, t):
            return velocity.expand(z.shape[0], -1)

    model.block = ConstantVelocity(10, 0, 0.0)
    x, _ = _batch(B=3)
    logits = model.predict(x, steps=7, solver=solver, seed=11)
    z0 = rng.normal(11, (3, 10))
    z1 = z0 + velocity
    torch.testing.assert_close(logits, -torch.cdist(z1, torch.eye(10)).square(), rtol=1e-4, atol=1e-4)


def test_fm_target_is_the_velocity_u_minus_z0():
    """Loss zero exactly when the block outputs u_y - z_0 (with the one-hot embedding and linear readout)."""
    model = NoPropFM(10, 1, 28, width=WIDTH)
    x, y = _batch(B=5)
    captured = {}

    class OracleVelocity(nn.Module):
        def forward(self, x, z_t, t):
            z0 = (z_t - t[:, None] * nn.functional.one_hot(y, 10).float()) / (1 - t[:, None])
            captured["t"] = t
            return nn.functional.one_hot(y, 10).float() - z0

    model.block = OracleVelocity()
    terms = model.loss_terms(x, y)
    assert terms.parts["l2"].item() < 1e-6
    assert captured["t"].min() >= 0 and captured["t"].max() <= 1


def test_fm_anchor_is_the_cross_entropy_of_a_linear_classifier_on_the_endpoint():
    """Eq. 12-13: ``CE(theta_out(z_t + (1 - t) v), y)`` with a trained embedding; none with one-hot."""
    torch.manual_seed(3)
    model = NoPropFM(10, 1, 28, embedding="learned", width=WIDTH)
    with torch.no_grad():
        model.classifier.weight.add_(torch.randn_like(model.classifier.weight))
        model.classifier.bias.copy_(torch.randn(10))
    x, y = _batch(B=7)
    fixed_logits = torch.randn(7, 10)
    captured = {}

    class Recording(nn.Module):
        def forward(self, x, z_t, t):
            captured.update(z_t=z_t.detach(), t=t)
            return fixed_logits

    model.block = Recording()
    terms = model.loss_terms(x, y)
    z_t, t = captured["z_t"], captured["t"]
    endpoint = z_t + (1 - t)[:, None] * (fixed_logits @ model.embedding.weight.detach())
    expected = nn.functional.cross_entropy(endpoint @ model.classifier.weight.detach().T + model.classifier.bias.detach(), y)
    torch.testing.assert_close(terms.parts["anchor_ce"], expected)
    onehot = NoPropFM(10, 1, 28, width=WIDTH)
    assert not hasattr(onehot, "classifier")
    assert "anchor_ce" not in onehot.loss_terms(x, y).parts


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("cls", [NoPropDT, NoPropCT, NoPropFM, Backprop])
@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda x, y: (x, y + 10), ValueError, r"y: labels must lie in \[0, 10\)"),
        (lambda x, y: (x, y - 10), ValueError, r"y: labels must lie in \[0, 10\)"),
        (lambda x, y: (x, y[:-1]), ValueError, "y: expected 6 labels"),
        (lambda x, y: (x[:, :, :20], y), ValueError, r"x: expected shape \[\*, 1, 28, 28\]"),
        (lambda x, y: (x.to(torch.uint8), y), TypeError, "x: expected a floating-point tensor"),
        (lambda x, y: (x.index_fill(0, torch.tensor([2]), float("nan")), y), ValueError, "x: contains NaN or Inf"),
        (lambda x, y: (x.index_fill(0, torch.tensor([1]), float("inf")), y), ValueError, "x: contains NaN or Inf"),
        (lambda x, y: (x, y.float()), TypeError, "y: expected an integer tensor"),
    ],
)
def test_model_loss_rejects_bad_input(cls, make, error, match):
    model = cls(10, 1, 28, width=WIDTH)
    x, y = make(*_batch())
    with pytest.raises(error, match=match):
        model.loss(x, y)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: NoPropDT(10, 1, 28, T=0), "T"),
        (lambda: NoPropDT(10, 1, 3), "image_size"),
        (lambda: NoPropDT(10, 1, 28, embedding="random"), "embedding"),
        (lambda: NoPropDT(10, 1, 28, embedding="onehot", embedding_dim=5), "embedding_dim"),
        (lambda: NoPropDT(10, 1, 28, backend="fast"), "backend"),
        (lambda: NoPropDT(10, 1, 28, schedule="weekly"), "schedule"),
        (lambda: NoPropDT(1, 1, 28), "num_classes"),
    ],
)
def test_model_constructor_rejects_bad_arguments(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_predict_rejects_bad_steps_and_solver():
    x, _ = _batch(B=2)
    with pytest.raises(ValueError, match="steps"):
        NoPropDT(10, 1, 28, T=3, width=WIDTH).eval().predict(x, steps=5)
    with pytest.raises(ValueError, match="solver"):
        NoPropFM(10, 1, 28, width=WIDTH).eval().predict(x, steps=2, solver="rk4")


def test_prototype_embedding_starts_from_class_images():
    model = NoPropDT(3, 1, 8, T=2, embedding="prototype", width=WIDTH)
    x, _ = _batch(B=9, size=8, classes=3)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    with pytest.raises(RuntimeError, match="initialize_prototypes"):
        model.loss(x, y)
    model.initialize_from_data(x, y)
    torch.testing.assert_close(model.classifier.weight, model.embedding.weight)  # re-synced to the medoids
    for c in range(3):  # each row is one of its class's images (which one: tests/test_embeddings.py)
        members = x[y == c].flatten(1)
        assert (members == model.embedding.weight[c].detach()).all(dim=1).any()
    assert model.embed_dim == 64
    model.loss(x, y).backward()
    assert model.embedding.weight.grad is not None


def test_learned_embedding_is_orthogonal_at_init():
    W = NoPropDT(10, 1, 28, T=2, embedding="learned", width=WIDTH).embedding.weight.detach()
    assert W.shape == (10, 20)
    torch.testing.assert_close(W @ W.T, torch.eye(10), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [NoPropDT, NoPropCT])
def test_classifier_starts_as_the_embedding(cls):
    """logits_c = <z, u_c> at initialisation, so a clean class embedding is classified correctly."""
    model = cls(10, 1, 28, embedding="learned", width=WIDTH)
    W = model.embedding.weight.detach()
    torch.testing.assert_close(model.classifier.weight.detach(), W)
    assert torch.equal(model.classifier(W).argmax(-1), torch.arange(10))
