"""Parallel training (noprop.distributed) on 2 CPU processes over gloo on loopback.

Multi-process tests go through :func:`noprop.distributed.spawn`: the parent hosts the rendezvous
store, every rank is a fresh interpreter, and a hard timeout kills whatever is left, so a failing
test leaves no process behind. A fresh interpreter costs seconds on 2 cores, so one launch runs
every scenario that succeeds (:func:`parallel_runs`) and one the failures (:func:`failures`);
the tests compare what they returned with one-process runs made here.

Exactness. A parallel step computes the one-process step on the same batch, up to float32
rounding (other summation orders). After AdamW steps, what rounding can change is bounded:

* every parameter within ``rtol 1e-4, atol 1e-4``: a tenth of one step's move (lr 1e-3), while a
  real discrepancy (another noise draw, a missing gradient, other rows) moves weights by ~lr;
* a *shift-invariant* parameter (a bias feeding a BatchNorm, which removes any constant shift:
  :func:`shift_invariant` finds them by moving them and watching the loss) has a true gradient of
  zero, so both runs' gradients are rounding noise that AdamW divides by its own size: it may move
  by up to lr per step in either run, and so may the running means of the BatchNorm layers behind
  it. Those are compared within ``2 * lr * steps``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from noprop import checkpoint as ckpt
from noprop.config import TrainConfig
from noprop.distributed import RankLostError, batch_rows, partition, pipeline_predict, spawn, topology
from noprop.distributed import checkpoint as sharded
from noprop.distributed.block_state import join, split
from noprop.distributed.session import open_session
from noprop.distributed.steps import BlocksStep
from noprop.distributed.topology import resolve_backend
from noprop.models.base import StepSeeds
from noprop.train import train
from test_data import make_idx_folder
from test_train import tiny_digits

WORLD = 2
SPAWN_TIMEOUT = 240.0  # seconds for one launch, start-up of both interpreters included
STEPS = 5  # 80 training images in batches of 16: one epoch
LR = 1e-3
TOLERANCE = dict(rtol=1e-4, atol=1e-4)
TIMING = ("train_seconds", "eval_seconds", "examples_per_second", "peak_memory_mb")


def data():
    return tiny_digits(n_train=80, n_test=48)


def run_config(out: pathlib.Path, **overrides) -> TrainConfig:
    """A tiny run: 5 steps per epoch, dropout on (the blocks' default 0.2)."""
    base = dict(method="dt", width=0.125, batch_size=16, epochs=1, lr=LR, out=str(out), progress=False, dist_timeout=60.0)
    base.update(overrides)
    if base["method"] == "dt":
        base.setdefault("T", 4)  # 2 blocks per rank
    else:
        base["inference_steps"] = 4
    return TrainConfig(**base)


def state_of(model) -> dict:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def metrics(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING and k != "peak_memory_kind"}


# ---------------------------------------------------------------------------------------------- ranks


def _scenarios(rank: int, world: int, tmp: str) -> dict:
    """Every successful scenario, in one launch: the parity runs, an uninterrupted 2-epoch run and a resume with 2 ranks."""
    tmp = pathlib.Path(tmp)
    results = {}
    for name, overrides in {
        "blocks": dict(parallel="blocks"),
        "data-dt": dict(parallel="data"),
        "data-ct": dict(parallel="data", method="ct"),
        "data-fm": dict(parallel="data", method="fm", embedding="learned"),
        "straight": dict(parallel="blocks", epochs=2),
    }.items():
        result = train(run_config(tmp / name, **overrides), dataset=data())
        results[name] = (state_of(result.model), result.history)
        if name == "blocks":  # the trained blocks, pipelined over the ranks in 3 micro-batches, vs the whole model
            model, images, seed = result.model.eval(), data().test_x, torch.tensor([3])
            role = topology("blocks", model.T, rank, world, rank)
            for deterministic in (False, True):
                logits = pipeline_predict(model, images, role, seed=seed, deterministic=deterministic, micro_batches=3)
                if logits is not None:
                    whole = model.predict(images, seed=seed, deterministic=deterministic)
                    results[f"pipeline deterministic={deterministic}"] = (logits - whole).abs().max().item()
        if name == "data-dt":
            results["norm classes"] = sorted({type(m).__name__ for m in result.model.modules() if isinstance(m, torch.nn.BatchNorm1d)})
    resumed = train(run_config(tmp / "resumed-2", parallel="blocks", epochs=2, resume=str(tmp / "blocks" / sharded.NAME)), dataset=data())
    results["resumed-2"] = resumed.history
    return results


def _failures(rank: int, world: int, tmp: str) -> dict:
    """A config mismatch (reported before any step), then rank 1 killed in its third step."""
    tmp = pathlib.Path(tmp)
    calls = itertools.count(1)
    original = BlocksStep.__call__

    def counted(self, x, y, blocks=None):
        if next(calls) == 3 and rank == 1:  # the mismatched run takes no step: this is the next run's third
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, x, y, blocks)

    BlocksStep.__call__ = counted
    outcome = {}
    try:
        train(run_config(tmp / "mismatch", parallel="blocks", lr=LR * (1 + rank)), dataset=data())
    except ValueError as error:
        outcome["mismatch"] = str(error)
    outcome["steps after mismatch"] = next(calls) - 1
    start = time.monotonic()
    try:
        train(run_config(tmp / "killed", parallel="blocks", epochs=3, dist_timeout=30.0), dataset=data())
    except RankLostError as error:
        outcome["lost"] = (str(error), error.ranks, time.monotonic() - start)
    return outcome


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here too: the ranks use one each, and 2 cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    tmp = tmp_path_factory.mktemp("parallel")
    outcomes = spawn(_scenarios, WORLD, (str(tmp),), timeout=SPAWN_TIMEOUT)
    return tmp, {**outcomes[1].value, **outcomes[0].value}  # rank 0's runs; the last rank's pipeline logits


# ---------------------------------------------------------------------------------------------- helpers


def shift_invariant(config: TrainConfig) -> set[str]:
    """The parameters that can move without changing the training loss (a bias feeding a BatchNorm):
    each moved by a standard normal draw, the loss on a batch (fixed seeds) must not change beyond rounding."""
    from noprop.config import model_kwargs
    from noprop.models import build_model

    dataset = data()
    torch.manual_seed(1)
    model = build_model(config.method, **model_kwargs(config, dataset))
    x, y = dataset.train_x[:16], dataset.train_y[:16]
    seeds = StepSeeds(torch.tensor([5]), torch.tensor([6]))
    base = model.loss_terms(x, y, seeds=seeds).total.item()
    invariant = set()
    for name, p in model.named_parameters():
        with torch.no_grad():
            saved = p.clone()
            p.add_(torch.randn_like(p))
            moved = model.loss_terms(x, y, seeds=seeds).total.item()
            p.copy_(saved)
        if abs(moved - base) <= 1e-5 * abs(base):
            invariant.add(name)
    return invariant


def assert_same_model(got: dict, want: dict, invariant: set[str], steps: int) -> None:
    loose = 2 * LR * steps
    assert got.keys() == want.keys()
    for name, value in want.items():
        if not value.is_floating_point():
            assert torch.equal(got[name], value), name
        elif name in invariant or name.endswith("running_mean"):
            assert (got[name] - value).abs().max().item() <= loose, name
        else:
            torch.testing.assert_close(got[name], value, **TOLERANCE, msg=name)


def assert_same_metrics(got: dict, want: dict, examples: int = 48) -> None:
    """Losses within float32 rounding; an accuracy within one of ``examples`` (a prediction within
    rounding of a tie may go either way on another CPU)."""
    got, want = metrics(got), metrics(want)
    assert got.keys() == want.keys()
    for key, value in want.items():
        atol = 1.01 / examples if key.endswith("accuracy") else 1e-6
        torch.testing.assert_close(torch.tensor(got[key], dtype=torch.float64), torch.tensor(value, dtype=torch.float64), rtol=1e-5, atol=atol, msg=key)


# ---------------------------------------------------------------------------------------------- parity


def test_blocks_mode_matches_one_process(parallel_runs, tmp_path):
    """2 ranks x 2 blocks, dropout on, 5 steps == one process training all 4 blocks on the same batches."""
    tmp, results = parallel_runs
    reference = train(run_config(tmp_path / "one"), dataset=data())
    state, history = results["blocks"]
    assert_same_model(state, state_of(reference.model), shift_invariant(run_config(tmp_path)), STEPS)
    assert_same_metrics(history[0], reference.history[0])
    assert len(history[0]["l2"]) == 4  # every block's term, gathered from both ranks


@pytest.mark.parametrize("method", ["dt", "ct", "fm"])
def test_data_mode_matches_one_process_on_the_whole_batch(parallel_runs, tmp_path, method):
    """Each rank trains on 8 of every 16 rows (BatchNorm over both ranks' rows; the rows' own noise,
    times and dropout masks); the result is one process's training on the 16-row batches."""
    tmp, results = parallel_runs
    overrides = {"method": method, **({"embedding": "learned"} if method == "fm" else {})}
    reference = train(run_config(tmp_path / "one", **overrides), dataset=data())
    state, history = results[f"data-{method}"]
    invariant = shift_invariant(run_config(tmp_path, **overrides)) if method == "dt" else set()
    assert_same_model(state, state_of(reference.model), invariant, STEPS)
    assert_same_metrics(history[0], reference.history[0])
    if method == "dt":  # the returned model normalises locally again (it outlives the process group)
        assert results["norm classes"] == ["StackedBatchNorm"]


def test_pipelined_inference_is_the_models_prediction(parallel_runs):
    """Blocks 0-1 on rank 0, 2-3 on rank 1, z sent across in 3 micro-batches: the logits of ``model.predict``
    for the same seed (with the sampling noise: each micro-batch's rows of the whole batch's draws)."""
    _, results = parallel_runs
    assert results["pipeline deterministic=False"] <= 1e-5
    assert results["pipeline deterministic=True"] <= 1e-5


def test_resume_with_two_ranks_and_with_one(parallel_runs, tmp_path):
    """The 2-rank run's sharded checkpoint after epoch 1, resumed for epoch 2 with 2 ranks and with
    one process, gives the uninterrupted 2-rank run's epoch-2 metrics. (The optimizer state must
    come back in its parameters' memory layout: fused AdamW pairs the wrong elements otherwise.)
    """
    tmp, results = parallel_runs
    straight = results["straight"][1]
    one = train(run_config(tmp_path / "one", epochs=2, resume=str(tmp / "blocks" / sharded.NAME)), dataset=data()).history
    assert_same_metrics(results["resumed-2"][1], straight[1])
    assert_same_metrics(one[1], straight[1])
    assert len(one) == 2 and (tmp_path / "one" / "checkpoint.pt").is_file()


def test_sharded_checkpoint_has_each_ranks_part_and_loads_whole(parallel_runs):
    tmp, results = parallel_runs
    folder = tmp / "blocks" / sharded.NAME
    names = sorted(p.name for p in folder.iterdir())
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "run.pt"]
    state = ckpt.load(folder)  # what noprop eval and a one-process --resume read
    assert state["epoch"] == 1 and state["config"]["parallel"] == "blocks"
    for name, value in results["blocks"][0].items():
        torch.testing.assert_close(state["model"][name], value, rtol=0, atol=0, msg=name)
    assert set(state["optimizer"]["state"]) == set(range(len(state["optimizer"]["param_groups"][0]["params"])))


def test_a_damaged_or_foreign_sharded_checkpoint_is_refused(parallel_runs, tmp_path):
    tmp, _ = parallel_runs
    copy = tmp_path / "ckpt"
    shutil.copytree(tmp / "blocks" / sharded.NAME, copy)
    shard = copy / "__1_0.distcp"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="__1_0.distcp is damaged"):
        ckpt.load(copy)
    shutil.rmtree(copy)
    shutil.copytree(tmp / "blocks" / sharded.NAME, copy)
    evil = copy / ".metadata"
    evil.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    manifest = ckpt.read(copy / sharded.MANIFEST, sharded.MANIFEST_REQUIRED)
    manifest["sharded"]["files"][".metadata"] = sharded._sha256(evil)  # a consistent manifest: the unpickler must refuse
    ckpt.save_atomic(manifest, copy / sharded.MANIFEST)
    with pytest.raises(ValueError, match=r"not DCP metadata \(os.system is not part of a checkpoint's metadata"):
        ckpt.load(copy)


# ---------------------------------------------------------------------------------------------- failures


def test_config_mismatch_and_a_killed_rank(tmp_path):
    """A mismatched lr is reported on both ranks before any step (and before any file); a rank killed
    in its third step makes the other stop with an error naming it, well within the timeout."""
    outcomes = spawn(_failures, WORLD, (str(tmp_path),), timeout=SPAWN_TIMEOUT, raise_on_error=False)
    for outcome in outcomes:
        assert outcome.ok or outcome.rank == 1, outcome.details
    for value in [outcomes[0].value] + ([outcomes[1].value] if outcomes[1].ok else []):
        assert "config: rank(s) 1 differ from rank 0" in value["mismatch"] and "lr is 0.002 on rank 1" in value["mismatch"]
        assert value["steps after mismatch"] == 0
    assert not (tmp_path / "mismatch").exists()
    message, ranks, seconds = outcomes[0].value["lost"]
    assert ranks == (1,) and "rank 1 was lost" in message, message
    assert seconds < 30.0
    assert outcomes[1].error == "killed by signal 9"


# ---------------------------------------------------------------------------------------------- torchrun and the CLI


def test_torchrun_blocks_then_eval_and_one_process_resume(tmp_path, capsys):
    """``torchrun --nproc-per-node 2 -m noprop train --parallel blocks``; ``noprop eval`` and a one-process
    ``--resume`` read its sharded checkpoint (deterministic inference: eval reproduces the trainer's accuracy)."""
    from noprop.cli import main

    make_idx_folder(tmp_path / "data", n_train=64, n_test=32, size=16)
    out = tmp_path / "run"
    torchrun = pathlib.Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc-per-node", str(WORLD), "-m", "noprop", "train", "--parallel", "blocks",
               "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--T", "3", "--width", "0.0625", "--batch-size", "16",
               "--epochs", "1", "--out", str(out), "--no-progress", "--deterministic-inference"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=SPAWN_TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    summaries = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # rank 0 alone prints the summary
    trained = json.loads(summaries[0])
    assert main(["eval", "--checkpoint", str(out / sharded.NAME)]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(evaluated["test_accuracy"] - trained["test_accuracy"]) <= 1.01 / 32 and evaluated["epoch"] == 1  # one prediction may sit on a tie
    assert main(["train", "--resume", str(out / sharded.NAME), "--epochs", "2", "--no-progress"]) == 0
    assert (out / "checkpoint.pt").is_file() and not (out / sharded.NAME).exists()


# ---------------------------------------------------------------------------------------------- one process


def test_partition_is_contiguous_and_even():
    assert partition(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    for T in range(1, 12):
        for world in range(1, T + 1):
            ranges = partition(T, world)
            assert [t for r in ranges for t in r] == list(range(T))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    with pytest.raises(ValueError, match="world size: 5 ranks but the model has T = 4 blocks"):
        partition(4, 5)


def test_batch_rows_split_the_batch():
    for batch in range(1, 20):
        for world in range(1, 5):
            rows = [batch_rows(batch, r, world) for r in range(world)]
            assert rows[0][0] == 0 and sum(c for _, c in rows) == batch
            assert all(o + c == rows[i + 1][0] for i, (o, c) in enumerate(rows[:-1]))


def test_block_state_round_trips_every_container():
    from noprop.models.dt import NoPropDT
    from noprop.zoo import MLPBlock

    for model in (NoPropDT(10, 1, 8, T=3, width=0.125), NoPropDT(10, 1, 8, T=3, width=0.125, schedule="paper"),
                  NoPropDT(10, 1, 8, T=3, block=MLPBlock)):
        named = model.state_dict()
        mine = split(named, 3, range(1, 2))
        assert all(key.endswith("/block1") for key in mine if "/block" in key)
        whole = join(split(named, 3), 3)
        assert all(torch.equal(whole[k], v) for k, v in named.items())


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(method="ct", parallel="blocks"), "method 'ct' has one shared network, use --parallel data"),
        (dict(method="fm", parallel="blocks"), "use --parallel data"),
        (dict(method="backprop", parallel="data"), "'backprop' baseline trains end to end"),
        (dict(parallel="blocks", schedule="paper"), "schedule 'paper'"),
        (dict(parallel="data", block_chunk=2), "block_chunk: not with --parallel data"),
        (dict(parallel="blocks", compile=True), "compile (--compile): not supported with --parallel blocks"),
        (dict(parallel="pipeline"), "parallel: expected one of"),
        (dict(dist_backend="mpi"), "dist_backend: expected one of"),
    ],
)
def test_unsupported_parallel_configs_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(method=overrides.pop("method", "dt"), **overrides)


def test_backend_and_device_mixes_are_refused():
    with pytest.raises(ValueError, match="'nccl' does not run tensors on cpu devices.*use 'gloo'"):
        resolve_backend("nccl", torch.device("cpu"))
    with pytest.raises(ValueError, match="'gloo' does not run tensors on cuda devices.*use 'nccl'"):
        resolve_backend("gloo", torch.device("cuda", 0))
    assert resolve_backend("auto", torch.device("cpu")) == "gloo"
    with pytest.raises(ValueError, match="no T blocks"):
        topology("blocks", None, 0, 2, 0)


def test_launched_ranks_need_a_parallel_mode(monkeypatch, tmp_path):
    import contextlib

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="one of 2 ranks but --parallel is 'none'"):
        open_session(run_config(tmp_path), contextlib.ExitStack())
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="needs a launcher"):
        with contextlib.ExitStack() as stack:
            open_session(dataclasses.replace(run_config(tmp_path), parallel="blocks"), stack)
