"""``noprop compare``: the report's statistics against its own runs, the table and figure, resuming, refusals, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil
import signal
import statistics

import pytest
import torch

from noprop import checkpoint as ckpt
from noprop import compare as compare_module
from noprop.cli import build_parser, main
from noprop.compare import ComparisonInterrupted, CompareConfig, compare, inference_seed
from noprop.data import _sklearn_digits, from_uint8
from noprop.run_folder import TrainingInterrupted, model_from_checkpoint
from noprop.train import evaluate, train
from test_data import make_idx_folder

PNG = b"\x89PNG\r\n\x1a\n"


def digits():
    """scikit-learn's 8x8 digits (the offline fallback's data): 300 training and 100 test images."""
    dataset = from_uint8("sklearn-digits", "sklearn-digits", "test", _sklearn_digits(0), 10)
    return dataclasses.replace(
        dataset, train_x=dataset.train_x[:300], train_y=dataset.train_y[:300], test_x=dataset.test_x[:100], test_y=dataset.test_y[:100]
    )


def tiny(out, **overrides) -> CompareConfig:
    base = dict(methods="dt,backprop", embeddings="onehot", seeds=2, inference_runs=2, epochs=1, width=0.0625, T=3,
                batch_size=64, device="cpu", out=str(out), progress=False)
    return CompareConfig(**{**base, **overrides})


class CountingTrain:
    """``noprop.train.train`` with a count of its calls and the configs it got."""

    def __init__(self):
        self.configs = []

    def __call__(self, config, dataset=None, **kwargs):
        self.configs.append(config)
        return train(config, dataset, **kwargs)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny comparison: DT and backprop, one-hot, 2 seeds x 2 inference runs, 1 epoch."""
    out = tmp_path_factory.mktemp("compare") / "cmp"
    compare(tiny(out), digits())
    return out


def test_report_statistics_match_its_runs(finished):
    report = json.loads((finished / "compare.json").read_text())
    assert sorted(report["runs"]) == ["backprop-onehot-seed0", "backprop-onehot-seed1", "dt-onehot-seed0", "dt-onehot-seed1"]
    assert [(c["method"], c["embedding"]) for c in report["cells"]] == [("dt", "onehot"), ("backprop", "onehot")]
    for cell in report["cells"]:
        runs = [report["runs"][f"{cell['method']}-onehot-seed{k}"] for k in (0, 1)]
        for split in ("train_accuracy", "test_accuracy"):
            pooled = [a for run in runs for a in run[split]]  # 2 seeds x 2 inference runs
            assert len(pooled) == 4 and cell[split]["n"] == 4
            assert cell[split]["mean"] == pytest.approx(statistics.fmean(pooled), abs=1e-12)
            assert cell[split]["se"] == pytest.approx(statistics.stdev(pooled) / math.sqrt(4), abs=1e-12)
            for accuracy in pooled:  # accuracies on 100 images
                assert 0 <= accuracy <= 1 and abs(accuracy * 100 - round(accuracy * 100)) < 1e-4
        seconds = [run["seconds_per_epoch"] for run in runs]
        assert cell["seconds_per_epoch"]["mean"] == pytest.approx(statistics.fmean(seconds), rel=1e-12)
        assert cell["seconds_per_epoch"]["se"] == pytest.approx(statistics.stdev(seconds) / math.sqrt(2), rel=1e-12)
        assert cell["parameters"] == runs[0]["parameters"] > 0
        assert cell["test_accuracy_per_epoch"] == pytest.approx([statistics.fmean(run["history"][0]["test_accuracy"] for run in runs)])
        for run in runs:
            assert run["seconds_per_epoch"] == run["history"][0]["train_seconds"] and run["peak_memory_mb"] > 0
    seeds = [s for run in report["runs"].values() for s in run["inference_seeds"]]
    assert len(set(seeds)) == 2 * 2 and len(seeds) == 8  # each model x inference run its own noise (the same across methods)
    assert report["environment"]["torch"] == torch.__version__ and report["environment"]["python"]
    assert report["dataset"]["name"] == "sklearn-digits" and report["arguments"]["seeds"] == 2


def test_recorded_accuracies_are_the_models_with_their_inference_seeds(finished):
    """Re-evaluating a saved model with a recorded inference seed gives the recorded accuracy; another seed draws other noise."""
    run = json.loads((finished / "runs" / "dt-onehot-seed1" / "evaluation.json").read_text())
    path = finished / "runs" / "dt-onehot-seed1" / "checkpoint.pt"
    model = model_from_checkpoint(ckpt.load(path), path)
    data = digits()
    predictions = []
    for r, seed in enumerate(run["inference_seeds"]):
        assert seed == inference_seed(1, r, 2)
        torch.manual_seed(seed)
        accuracy, predicted = evaluate(model, data.test_x, data.test_y)
        assert accuracy == run["test_accuracy"][r]
        predictions.append(predicted)
    assert not torch.equal(*predictions)


def test_table_and_figure_are_written(finished):
    table = (finished / "compare.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split(" | ")[:2] for row in rows] == [["| NoProp-DT", "onehot"], ["| Backprop", "onehot"]]
    report = json.loads((finished / "compare.json").read_text())
    test = report["cells"][0]["test_accuracy"]
    assert f"{100 * test['mean']:.2f} ± {100 * test['se']:.2f}" in rows[0]
    assert "s.e. = s / √N" in table and "2 x 2" in table
    assert (finished / "compare.png").read_bytes()[:8] == PNG


def test_restart_redoes_no_finished_run(finished, tmp_path, monkeypatch):
    """Run folders in every state: finished, trained but not evaluated, never started; only the last is trained."""
    out = tmp_path / "cmp"
    shutil.copytree(finished, out)
    (out / "compare.json").unlink()
    (out / "runs" / "dt-onehot-seed1" / "evaluation.json").unlink()
    shutil.rmtree(out / "runs" / "backprop-onehot-seed0")
    kept = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    counting = CountingTrain()
    monkeypatch.setattr(compare_module, "train", counting)
    compare(dataclasses.replace(tiny(out), progress=True), digits())  # progress may change on a restart
    assert [pathlib.Path(c.out).name for c in counting.configs] == ["backprop-onehot-seed0"]
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in kept.items())  # nothing retrained or re-evaluated
    evaluated = json.loads((out / "runs" / "dt-onehot-seed1" / "evaluation.json").read_text())
    assert evaluated == json.loads((finished / "runs" / "dt-onehot-seed1" / "evaluation.json").read_text()) | {
        k: evaluated[k] for k in ("commit", "device")
    }  # evaluated again from its checkpoint: the same accuracies
    assert json.loads((out / "compare.json").read_text())["cells"][0] == json.loads((finished / "compare.json").read_text())["cells"][0]


def test_interrupted_run_continues_from_its_checkpoint(tmp_path, monkeypatch):
    """A comparison killed after the first of two epochs continues that run from its checkpoint (epoch 1 is not redone)."""
    config = tiny(tmp_path / "cmp", methods="dt", seeds=1, epochs=2)

    def killed_after_one_epoch(run_config, dataset=None, **kwargs):
        train(dataclasses.replace(run_config, epochs=1), dataset)
        raise TrainingInterrupted(signal.SIGTERM)

    monkeypatch.setattr(compare_module, "train", killed_after_one_epoch)
    with pytest.raises(ComparisonInterrupted, match="rerun the same noprop compare command"):
        compare(config, digits())
    first = ckpt.load(tmp_path / "cmp" / "runs" / "dt-onehot-seed0" / "checkpoint.pt")["history"]
    counting = CountingTrain()
    monkeypatch.setattr(compare_module, "train", counting)
    report = compare(config, digits()).report
    assert len(counting.configs) == 1 and counting.configs[0].resume.endswith("dt-onehot-seed0/checkpoint.pt")
    history = report["runs"]["dt-onehot-seed0"]["history"]
    assert [r["epoch"] for r in history] == [1, 2] and history[0] == first[0]


def test_changed_arguments_or_data_are_refused(finished, monkeypatch):
    counting = CountingTrain()
    monkeypatch.setattr(compare_module, "train", counting)
    with pytest.raises(ValueError, match=r"other arguments \(--seeds 3 given, 2 recorded\)"):
        compare(tiny(finished, seeds=3), digits())
    with pytest.raises(ValueError, match=r"--methods \['dt'\] given, \['dt', 'backprop'\] recorded"):
        compare(tiny(finished, methods="dt"), digits())
    other = digits()
    other = dataclasses.replace(other, fingerprint={"train": "0" * 64, "test": other.fingerprint["test"]})
    with pytest.raises(ValueError, match="dataset: other data"):
        compare(tiny(finished), other)
    assert counting.configs == []


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(methods="dt,sgd"), "methods: expected one of"),
        (dict(methods="dt,dt"), "methods: dt given more than once"),
        (dict(methods=""), "methods: expected a comma-separated list"),
        (dict(embeddings="onehot,random"), "embeddings: expected one of"),
        (dict(seeds=0), "seeds: expected an int >= 1"),
        (dict(inference_runs=0), "inference_runs: expected an int >= 1"),
        (dict(methods="ct,fm", T=4), r"T \(--T\): none of the methods ct, fm uses it"),
    ],
)
def test_bad_arguments_name_the_argument(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(tmp_path, **overrides)


def test_cli_parses_compare_options():
    args = build_parser().parse_args(
        ["compare", "--methods", "dt,ct", "--embeddings", "learned", "--seeds", "2", "--inference-runs", "4", "--epochs", "3",
         "--width", "0.5", "--T", "4", "--inference-steps", "7", "--train-limit", "100", "--device", "cpu", "--out", "o", "--precision", "bf16", "--no-progress"]
    )
    assert args.precision == "bf16" and build_parser().parse_args(["compare"]).precision == "fp32"
    assert (args.methods, args.embeddings, args.seeds, args.inference_runs, args.epochs, args.width) == ("dt,ct", "learned", 2, 4, 3, 0.5)
    assert (args.T, args.inference_steps, args.train_limit, args.out, args.no_progress) == (4, 7, 100, "o", True)
    defaults = build_parser().parse_args(["compare"])
    assert (defaults.methods, defaults.embeddings, defaults.seeds, defaults.inference_runs) == ("dt,ct,fm,backprop", "onehot,learned,prototype", 3, 5)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--methods", "dt,sgd"], "methods: expected one of"),
        (["--seeds", "0"], "seeds: expected an int >= 1"),
        (["--inference-runs", "-1"], "inference_runs: expected an int >= 1"),
        (["--embeddings", "onehot,,learned"], "embeddings: expected a comma-separated list"),
        (["--epochs", "0"], "epochs: expected an int >= 1"),
        (["--methods", "dt", "--ode-steps", "5"], "ode_steps (--ode-steps): none of the methods dt uses it"),
    ],
)
def test_cli_errors_name_the_argument(tmp_path, argv, message, capsys):
    assert main(["compare", "--out", str(tmp_path / "cmp"), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("noprop compare: error: ") and message in err
    assert not (tmp_path / "cmp").exists()


def test_cli_end_to_end_and_restart(tmp_path, capsys):
    make_idx_folder(tmp_path / "data", n_train=64, n_test=32)
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "dt", "--embeddings", "onehot", "--seeds", "1", "--inference-runs", "2", "--epochs", "1",
            "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "data"), "--width", "0.0625", "--T", "2",
            "--batch-size", "32", "--device", "cpu", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["cells"][0]["method"] == "dt" and summary["report"] == str(out / "compare.md")
    checkpoint = out / "runs" / "dt-onehot-seed0" / "checkpoint.pt"
    mtime = checkpoint.stat().st_mtime_ns
    assert main(argv) == 0 and checkpoint.stat().st_mtime_ns == mtime  # the same command again: nothing retrained
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert main([*argv, "--lr", "0.01"]) == 2
    assert "--lr 0.01 given, 0.001 recorded" in capsys.readouterr().err
