"""The trainer: outputs, exact resume, NaN stops, atomic checkpoints, the paper schedule."""

from __future__ import annotations

import json

import pytest
import torch

from noprop import checkpoint as ckpt
from noprop.data import from_uint8
from noprop.models.dt import NoPropDT
from noprop.objectives import LossTerms
from noprop.train import EpochStats, NonFiniteLossError, TrainConfig, train


def tiny_digits(n_train=96, n_test=48, seed=0):
    """A small real-valued 10-class image set (random uint8 pixels, labels tied to a bright pixel)."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 60, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    images[torch.arange(n), 0, labels // 4 * 3, labels % 4 * 2] = 255
    arrays = {"train_x": images[:n_train], "train_y": labels[:n_train], "test_x": images[n_train:], "test_y": labels[n_train:]}
    return from_uint8("tiny", "tiny", "test", arrays, 10)


def config(tmp_path, **overrides):
    base = dict(method="dt", width=0.125, batch_size=32, epochs=2, out=str(tmp_path / "run"), progress=False)
    if overrides.get("method", "dt") in ("dt", "backprop"):
        base["T"] = 3  # T and inference steps only where the method has them
    else:
        base["inference_steps"] = 4
    return TrainConfig(**{**base, **overrides})


def test_outputs_metrics_curves_checkpoint(tmp_path):
    result = train(config(tmp_path, epochs=1), dataset=tiny_digits())
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    record = metrics["epochs"][0]
    for key in ("loss", "ce", "kl", "l2", "train_accuracy", "test_accuracy", "train_seconds", "examples_per_second", "peak_memory_mb"):
        assert key in record, key
    assert len(record["l2"]) == 3 and metrics["dataset"]["name"] == "tiny"
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = ckpt.load(out / "checkpoint.pt")
    assert state["epoch"] == 1 and state["method"] == "dt" and state["schedule"]["kind"] == "cosine"
    assert set(state["rng"]) == {"torch", "cuda", "python", "numpy", "loader"}
    assert result.history == state["history"]


def test_epoch_means_survive_steps_that_reuse_their_output_tensors():
    """A CUDA-graph step returns the same static tensors on every replay, overwritten in place:
    the epoch's means must still be the means of the values each step had."""
    total, l2 = torch.tensor(1.0), torch.tensor([1.0, 2.0])
    stats = EpochStats()
    stats.add(LossTerms(total, {"l2": l2}))
    total.fill_(3.0)  # the next replay writes into the same tensors
    l2.copy_(torch.tensor([5.0, 6.0]))
    stats.add(LossTerms(total, {"l2": l2}))
    assert stats.means() == {"loss": 2.0, "l2": [3.0, 4.0]}


@pytest.mark.parametrize("method", ["dt", "ct"])
def test_resume_continues_exactly(tmp_path, method):
    data = tiny_digits()
    straight = train(config(tmp_path / "a", method=method, epochs=2), dataset=data).history
    train(config(tmp_path / "b", method=method, epochs=1), dataset=data)
    resumed = train(config(tmp_path / "b", method=method, epochs=2, resume=str(tmp_path / "b" / "run" / "checkpoint.pt")), dataset=data).history
    assert len(resumed) == 2
    timing = {"train_seconds", "eval_seconds", "examples_per_second", "peak_memory_mb"}
    for key, value in straight[1].items():
        if key not in timing:
            assert resumed[1][key] == value, key


def test_paper_schedule_trains_one_block_per_pass(tmp_path):
    history = train(config(tmp_path, schedule="paper", epochs=1), dataset=tiny_digits()).history
    assert len(history[0]["l2"]) == 3 and all(v > 0 for v in history[0]["l2"])


def test_nan_loss_stops_training_and_names_the_block(tmp_path, monkeypatch):
    original = NoPropDT.loss_terms

    def poisoned(self, x, y, *args, **kwargs):
        terms = original(self, x, y, *args, **kwargs)
        l2 = terms.parts["l2"].clone()
        l2[1] = float("nan")
        return LossTerms(terms.total + l2.sum(), {**terms.parts, "l2": l2})

    monkeypatch.setattr(NoPropDT, "loss_terms", poisoned)
    with pytest.raises(NonFiniteLossError, match="term 'l2' of block 2 is nan"):
        train(config(tmp_path, epochs=1), dataset=tiny_digits())
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    train(config(tmp_path, epochs=1), dataset=tiny_digits())
    state = ckpt.load(tmp_path / "run" / "checkpoint.pt")
    target = tmp_path / "checkpoint.pt"
    ckpt.save_atomic(state, target)

    def crash(payload, stream):
        stream.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_atomic({**state, "epoch": 2}, target)
    monkeypatch.undo()
    assert ckpt.load(target)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "run"]


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(method="sgd"), "method"),
        (dict(epochs=0), "epochs"),
        (dict(lr=0.0), "lr"),
        (dict(schedule="paper", method="ct"), "schedule"),
    ],
)
def test_bad_config_is_named(tmp_path, overrides, match):
    with pytest.raises((ValueError, TypeError), match=match):
        config(tmp_path, **overrides)


def test_bad_dataset_and_data_dir_are_named(tmp_path):
    with pytest.raises(ValueError, match="dataset"):
        train(config(tmp_path, dataset="imagenet"))
    with pytest.raises(ValueError, match="data_dir"):
        train(config(tmp_path, data_dir=str(tmp_path / "missing")))


@pytest.mark.parametrize("policy", ["reuse", "system"])
def test_a_cpu_run_sets_its_host_memory_policy(tmp_path, monkeypatch, policy):
    import noprop.train as train_module

    applied = []
    monkeypatch.setattr(train_module, "set_host_memory", applied.append)
    train(config(tmp_path, epochs=1, device="cpu", host_memory=policy), dataset=tiny_digits())
    assert applied == [policy]
