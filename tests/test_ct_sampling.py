"""NoProp-CT's ancestral sampler (its default inference) and the solver choice of every model.

The sampler is checked against the diffusion it simulates: with an exact denoiser it must keep
``z_k ~ N(sqrt(abar_k) u_y, (1 - abar_k) I)`` at every time of the grid, and ``predict`` must
follow an independent re-implementation of the steps (coefficients from the Gaussian posterior
written out here, noise ``normal(seed + k + 1)``) with the real block.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from noprop import NoPropCT, NoPropDT, NoPropFM, ops, rng
from noprop.cli import main
from noprop.models.ct import ancestral_sample
from noprop.train import TrainConfig

WIDTH = 0.125


def _images(B=4, seed=0):
    return torch.randn(B, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _schedule_with_shape() -> NoPropCT:
    """A CT model whose schedule's monotone network is not the near-linear initial one."""
    model = NoPropCT(10, 1, 28, embedding="learned", width=WIDTH).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        model.noise_schedule.raw_out.copy_(torch.randn(model.noise_schedule.raw_out.shape, generator=g))
        model.noise_schedule.raw_in.copy_(2 * torch.randn(model.noise_schedule.raw_in.shape, generator=g))
    return model


def test_oracle_sampler_keeps_the_diffusion_marginal_at_every_grid_time():
    """u_hat = u_y exactly and z_0 ~ q(z_0 | y): z_k has mean sqrt(abar_k) u_y and variance 1 - abar_k for every k.

    The path is sampled one step at a time (each call on one window of the grid, which retraces
    the whole grid's path: see the next test), checking ``z_k`` at every grid time.

    N = 20,000 rows of D = 20 coordinates (a learned embedding, random classes). Per coordinate and
    grid time: the mean of ``z_k - sqrt(abar_k) u_y`` lies within 5 standard errors
    ``sqrt((1 - abar_k) / N)`` of 0, and its variance within 5 standard errors
    ``(1 - abar_k) sqrt(2 / (N - 1))`` of ``1 - abar_k`` (Gaussian sampling error; 5 standard
    errors make a false alarm over the 2 x 20 x 9 checks below ~1e-4). The traps fail by far:
    ``abar`` for ``sqrt(abar)`` on the signal moves the mean by up to ~0.2 (~30 standard errors),
    a sampler without noise shrinks the variance.
    """
    model = _schedule_with_shape()
    N, steps, seed = 20_000, 8, 1234
    W = model.embedding.weight.detach()
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (N,), generator=g)
    u = W[y]
    oracle_logits = 1e4 * torch.nn.functional.one_hot(y, 10).float()  # softmax is one-hot to float rounding

    def oracle(z, t):
        assert z.shape == (N, W.shape[1]) and t.shape == (N,)
        return oracle_logits

    times = torch.linspace(0, 1, steps + 1)
    with torch.no_grad():
        alpha_bar = model.noise_schedule.alpha_bar(times)
    assert torch.all(alpha_bar[1:] > alpha_bar[:-1])
    z_k = alpha_bar[0].sqrt() * u + (1 - alpha_bar[0]).sqrt() * torch.randn(N, W.shape[1], generator=g)
    for k in range(steps + 1):
        if k:  # step k - 1 alone: the window t_{k-1}, t_k with the seed offset that retraces the full grid's step
            z_k = ancestral_sample(oracle, W, z_k, times[k - 1 : k + 1], alpha_bar[k - 1 : k + 1], seed + k - 1)
        residual = (z_k - alpha_bar[k].sqrt() * u).double()
        variance = (1 - alpha_bar[k]).item()
        mean_tolerance = 5 * math.sqrt(variance / N)
        variance_tolerance = 5 * variance * math.sqrt(2 / (N - 1))
        assert residual.mean(0).abs().max().item() < mean_tolerance, k
        assert (residual.var(0) - variance).abs().max().item() < variance_tolerance, k


def test_ancestral_sample_on_windows_of_the_grid_retraces_the_whole_grid():
    """Step k's noise depends on seed + k + 1 only: prefixes, and windows with seed + start, are the same path."""
    model = _schedule_with_shape()
    x, W, steps, seed = _images(B=7), model.embedding.weight.detach(), 6, 40
    with torch.no_grad():
        features = model.block.image(x)
        times = torch.linspace(0, 1, steps + 1)
        alpha_bar = model.noise_schedule.alpha_bar(times)

        def run(z, start, stop, seed):
            return ancestral_sample(lambda z, t: model.block.head(features, z, t), W, z, times[start : stop + 1], alpha_bar[start : stop + 1], seed)

        z0 = rng.normal(seed, (7, W.shape[1]))
        whole = run(z0, 0, steps, seed)
        prefix = run(z0, 0, 4, seed)
        torch.testing.assert_close(run(prefix, 4, steps, seed + 4), whole, rtol=0, atol=0)
        assert not torch.allclose(run(prefix, 4, steps, seed), whole)  # the seed offset matters


def test_ancestral_sample_without_steps_or_noise():
    """An empty grid returns z; deterministic steps are the posterior means a u + b z (independent formula)."""
    model = _schedule_with_shape()
    W = model.embedding.weight.detach()
    z = torch.randn(3, W.shape[1])
    logits = torch.randn(3, 10)
    times = torch.tensor([0.25, 0.5])
    with torch.no_grad():
        ab = model.noise_schedule.alpha_bar(times).double().tolist()
    assert torch.equal(ancestral_sample(lambda z, t: logits, W, z, times[:1], torch.tensor(ab[:1]), 5), z)
    alpha = ab[0] / ab[1]
    a = math.sqrt(ab[1]) * (1 - alpha) / (1 - ab[0])
    b = math.sqrt(alpha) * (1 - ab[1]) / (1 - ab[0])
    out = ancestral_sample(lambda z, t: logits, W, z, times, torch.tensor(ab), 5, deterministic=True, backend="reference")
    torch.testing.assert_close(out, a * torch.softmax(logits, -1) @ W + b * z)


def test_ct_predict_follows_the_steps_of_eq3_on_the_learned_schedule():
    """predict(solver="ancestral") against a loop written here: real block, z_0 = normal(seed), step k's noise normal(seed + k + 1)."""
    model = _schedule_with_shape()
    x, steps, seed = _images(B=5), 6, 77
    W = model.embedding.weight.detach()
    logits = model.predict(x, steps=steps, solver="ancestral", seed=seed)
    with torch.no_grad():
        features = model.block.image(x)
        times = torch.linspace(0, 1, steps + 1)
        ab = model.noise_schedule.alpha_bar(times).double().tolist()
        z = rng.normal(seed, (5, W.shape[1]))
        for k in range(steps):
            alpha = ab[k] / ab[k + 1]
            var_next, cov = 1 - ab[k + 1], math.sqrt(alpha) * (1 - ab[k + 1])  # joint Gaussian of (z_{k+1}, z_k) given u
            var_prev = alpha * var_next + 1 - alpha
            b = cov / var_prev
            a = math.sqrt(ab[k + 1]) - b * math.sqrt(ab[k])
            c = var_next - cov * cov / var_prev
            u_hat = torch.softmax(model.block.head(features, z, times[k].expand(5)), -1) @ W
            z = a * u_hat + b * z + math.sqrt(c) * rng.normal(seed + k + 1, z.shape)
        expected = model.classifier(z)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_ct_defaults_to_ancestral_and_fm_to_euler():
    assert (NoPropCT.default_solver, NoPropCT.solvers) == ("ancestral", ("ancestral", "euler", "heun"))
    assert (NoPropFM.default_solver, NoPropFM.solvers) == ("euler", ("euler", "heun"))
    model = _schedule_with_shape()
    x = _images()
    default = model.predict(x, steps=5, seed=3)
    torch.testing.assert_close(default, model.predict(x, steps=5, solver="ancestral", seed=3), rtol=0, atol=0)
    assert not torch.allclose(default, model.predict(x, steps=5, solver="euler", seed=3))
    fm = NoPropFM(10, 1, 28, width=WIDTH).eval()
    torch.testing.assert_close(fm.predict(x, steps=3, seed=3), fm.predict(x, steps=3, solver="euler", seed=3), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"solver \(method 'fm'\): expected one of \('euler', 'heun'\), got 'ancestral'"):
        fm.predict(x, steps=3, solver="ancestral")
    with pytest.raises(ValueError, match="solver"):
        model.predict(x, steps=3, solver="rk4")


def test_deterministic_ancestral_inference_ignores_the_seed():
    model = _schedule_with_shape()
    x = _images()
    first = model.predict(x, steps=5, deterministic=True, seed=1)
    torch.testing.assert_close(first, model.predict(x, steps=5, deterministic=True, seed=2), rtol=0, atol=0)
    assert not torch.allclose(model.predict(x, steps=5, seed=1), model.predict(x, steps=5, seed=2))  # noise matters otherwise


@pytest.mark.parametrize("solver", ["ancestral", "euler", "heun"])
def test_trained_ct_model_predicts_finite_logits_with_every_solver(solver):
    torch.manual_seed(0)
    model = NoPropCT(10, 1, 28, embedding="learned", width=WIDTH)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = _images(B=16), torch.arange(16) % 10
    for _ in range(3):
        optimizer.zero_grad()
        model.loss(x, y).backward()
        optimizer.step()
    logits = model.eval().predict(x, steps=7, solver=solver, seed=0)
    assert logits.shape == (16, 10) and torch.isfinite(logits).all()


def test_ct_sampler_never_reads_the_label(monkeypatch):
    """Inference touches neither the label embedding lookup nor the training-noise op; the block sees only (features, z, t)."""
    model = _schedule_with_shape()
    x = _images(B=3)
    expected = model.predict(x, steps=4, seed=9)

    def forbidden(*args, **kwargs):
        raise AssertionError("inference read a label")

    monkeypatch.setattr(model.embedding, "forward", forbidden)
    monkeypatch.setattr(ops, "noised_latents", forbidden)
    monkeypatch.setattr(ops, "denoising_loss", forbidden)
    seen_times = []
    head = model.block.head

    def recording_head(features, z, t):
        seen_times.append(t[0].item())
        assert torch.all(t == t[0]) and z.shape == (3, model.embed_dim)
        return head(features, z, t)

    monkeypatch.setattr(model.block, "head", recording_head)
    torch.testing.assert_close(model.predict(x, steps=4, seed=9), expected, rtol=0, atol=0)
    assert seen_times == pytest.approx([0.0, 0.25, 0.5, 0.75])  # one block call per step, at t_k = k / steps


# ---------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "method,solver,message",
    [
        ("fm", "ancestral", r"solver \(method 'fm'\): expected one of \('euler', 'heun'\)"),
        ("dt", "euler", "solver: method 'dt' has no choice of solver"),
        ("ct", "rk4", r"solver \(method 'ct'\): expected one of \('ancestral', 'euler', 'heun'\)"),
    ],
)
def test_train_config_checks_the_solver_per_method(method, solver, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(method=method, solver=solver)


def test_train_config_solver_defaults_to_the_models():
    for method in ("dt", "ct", "fm"):
        assert TrainConfig(method=method).solver is None
    TrainConfig(method="ct", solver="heun")
    TrainConfig(method="fm", solver="heun")
    assert NoPropDT.resolve_solver(None) is None and NoPropCT.resolve_solver(None) == "ancestral"


def test_cli_names_the_solver_flag(capsys):
    assert main(["train", "--method", "fm", "--solver", "ancestral", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--solver (method 'fm'): expected one of ('euler', 'heun'), got 'ancestral'" in err
    with pytest.raises(SystemExit):
        main(["train", "--solver", "rk4"])
    assert "--solver: invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "ct: ancestral, euler, heun (default ancestral); fm: euler, heun (default euler)" in help_text


def test_cli_train_and_eval_ct_with_each_solver(tmp_path, capsys):
    """A CT run evaluates with its default (ancestral) and any solver named on eval; a DT checkpoint refuses --solver."""
    from test_data import make_idx_folder

    make_idx_folder(tmp_path / "data", n_train=32, n_test=16)
    common = ["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "data"), "--epochs", "1", "--width", "0.125",
              "--batch-size", "16", "--no-progress"]
    assert main(["train", "--method", "ct", "--inference-steps", "3", "--out", str(tmp_path / "ct"), *common]) == 0
    checkpoint = str(tmp_path / "ct" / "checkpoint.pt")
    for solver in ("ancestral", "euler", "heun"):
        capsys.readouterr()
        assert main(["eval", "--checkpoint", checkpoint, "--solver", solver]) == 0, solver
        assert 0.0 <= json.loads(capsys.readouterr().out.strip().splitlines()[-1])["test_accuracy"] <= 1.0
    assert main(["train", "--method", "dt", "--T", "2", "--out", str(tmp_path / "dt"), *common]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "dt" / "checkpoint.pt"), "--solver", "heun"]) == 2
    assert "--solver: method 'dt' has no choice of solver" in capsys.readouterr().err
