"""Models learn real digits: the MNIST test set split 8,000 / 2,000, on the CPU, in minutes.

Blocks are a quarter of the paper's width (``width=0.25``: convolutions 8/16/32, hidden 64,
fusion 64/32); everything else is the paper's (batch 128, lr 1e-3, weight decay 1e-3, T = 10).
CT samples with 20 ancestral steps, FM and the adjoint baseline integrate with 20 Euler steps at
evaluation. The epochs are what this split needs (63
minibatches per epoch), with a margin of five points or more measured when they were chosen.
"""

from __future__ import annotations

import pytest

from noprop.data import mnist_test_split
from noprop.config import APPLIES_TO
from noprop.train import TrainConfig, train

pytestmark = pytest.mark.slow

DT_EPOCHS = 6


@pytest.fixture(scope="module")
def mnist_split(shared_mnist):
    return mnist_test_split(shared_mnist)


def _train(tmp_path, dataset, **overrides):
    method = overrides.get("method", "dt")
    steps = {"inference_steps": 20} if method in APPLIES_TO["inference_steps"] else {}
    config = TrainConfig(width=0.25, out=str(tmp_path / method), progress=False, **steps, **overrides)
    history = train(config, dataset=dataset).history
    print(f"{overrides}: test accuracy per epoch {[round(r['test_accuracy'], 4) for r in history]}")
    return history[-1]["test_accuracy"]


@pytest.fixture(scope="module")
def dt_batched_accuracy(mnist_split, tmp_path_factory):
    return _train(tmp_path_factory.mktemp("dt"), mnist_split, method="dt", epochs=DT_EPOCHS)


def test_dt_beats_90_percent(dt_batched_accuracy):
    assert dt_batched_accuracy > 0.90


def test_paper_schedule_matches_batched_within_one_point(dt_batched_accuracy, mnist_split, tmp_path):
    """Same number of block updates (every block sees every example DT_EPOCHS times) both ways."""
    paper = _train(tmp_path, mnist_split, method="dt", epochs=DT_EPOCHS, schedule="paper")
    assert abs(paper - dt_batched_accuracy) <= 0.01


@pytest.mark.parametrize("method,epochs", [("ct", 20), ("fm", 10), ("backprop", 2)])
def test_ct_fm_backprop_beat_80_percent(method, epochs, mnist_split, tmp_path):
    assert _train(tmp_path, mnist_split, method=method, epochs=epochs) > 0.80


def test_adjoint_beats_80_percent(mnist_split, tmp_path):
    """The neural-ODE baseline with 10 Euler steps in training (the paper's 1000 cost 100x more here)."""
    pytest.importorskip("torchdiffeq", reason="the adjoint baseline needs torchdiffeq")
    assert _train(tmp_path, mnist_split, method="adjoint", epochs=3, ode_steps=10) > 0.80
