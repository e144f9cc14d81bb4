"""Communication of block-parallel and data-parallel NoProp-DT training: bytes and time per step at
1, 2 and 4 ranks (CPU, gloo, loopback), against the model of what each mode sends.

Run from a checkout: ``python -m bench.comm [--worlds 1,2,4] [--steps 8] [--out bench/results]``;
it writes ``comm-<device>.json``. Every world size is one :func:`noprop.distributed.spawn` launch
whose ranks train a NoProp-DT model (MNIST-shaped random batches, the same on every rank) with the
library's steps, one intra-op thread per rank, and count the payload of every collective with a
:class:`noprop.distributed.CommMeter`.

The model of one training step's payload (the bytes handed to the collectives; a ring all-reduce
then moves ``2 (W - 1) / W`` times the payload in and out of every rank):

* ``blocks``: ``4 S`` bytes, one all-reduce of the shared parameters' gradients (``S`` float32
  numbers: the classifier, and a learned embedding), whatever the size or number of blocks;
* ``data``: ``4 P`` bytes, DDP's all-reduce of every parameter's gradient (``P`` numbers), plus
  ``4 * 2 * (2 C + 1)`` bytes per BatchNorm layer of ``C`` channels (two all-reduces forward, of
  ``C + 1`` and ``C`` numbers, and their two backward).

Inference of the blocks-mode model across ranks, both ways of :mod:`noprop.distributed.inference`:
the pipeline (``z`` of the batch crosses each of the ``W - 1`` rank boundaries: ``4 B D`` bytes per
boundary) and gathering every block on every rank (each rank broadcasts its blocks' tensors) before
one rank predicts.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

import torch
import torch.distributed as dist

from bench.environment import REPO, device_name, utc_now, versions
from noprop.distributed import BlocksStep, CommMeter, DataStep, gather_blocks, partition, pipeline_predict, spawn, topology
from noprop.models.dt import NoPropDT
from noprop.train import TrainConfig, build_optimizer

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 28, 28)
MODES = ("blocks", "data")


def _batch(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, *IMAGE_SHAPE, generator=generator), torch.randint(0, NUM_CLASSES, (size,), generator=generator)


def _model(settings: dict) -> NoPropDT:
    torch.manual_seed(0)  # the same model on every rank
    return NoPropDT(NUM_CLASSES, IMAGE_SHAPE[0], IMAGE_SHAPE[1], T=settings["T"], width=settings["width"])


def model_bytes(model: NoPropDT, mode: str) -> dict:
    """The payload of one step of ``mode`` by the model in the module docstring, by kind."""
    if mode == "blocks":
        shared = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("blocks."))
        return {"gradients": 4 * shared}
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    return {"gradients": 4 * sum(p.numel() for p in model.parameters()), "batch_norm": sum(4 * 2 * (2 * m.num_features + 1) for m in norms)}


def _timed(function) -> float:
    dist.barrier()
    start = time.perf_counter()
    function()
    dist.barrier()
    return time.perf_counter() - start


def _rank(rank: int, world: int, settings: dict) -> dict:
    x, y = _batch(settings["batch"], 1)
    out = {"train": {}, "inference": {}}
    for mode in MODES:
        model = _model(settings)
        optimizer = build_optimizer(model, TrainConfig(method="dt"))
        role = topology(mode, model.T, rank, world, rank)
        meter = CommMeter()
        step = (BlocksStep if mode == "blocks" else DataStep)(model, optimizer, role, meter=meter)
        for _ in range(settings["warmup"]):
            step(x, y)
        meter.reset()
        seconds = [_timed(lambda: step(x, y)) for _ in range(settings["steps"])]
        out["train"][mode] = {
            "bytes": {k: v / settings["steps"] for k, v in meter.bytes.items()},
            "calls": {k: v / settings["steps"] for k, v in meter.calls.items()},
            "step_seconds_median": statistics.median(seconds),
            "model_bytes": model_bytes(model, mode),
        }
        if mode == "blocks":
            model.eval()
            images, _ = _batch(settings["eval_batch"], 2)
            seed = torch.tensor([7])
            pipeline = {
                pieces: statistics.median(_timed(lambda: pipeline_predict(model, images, role, seed=seed, micro_batches=pieces)) for _ in range(3))
                for pieces in (1, 4)
            }
            moved = {}

            def gather_then_predict():
                moved["bytes"] = gather_blocks(model, role)
                if rank == 0:
                    model.predict(images, seed=seed)

            gathered = [_timed(gather_then_predict) for _ in range(3)]
            out["inference"] = {
                "pipeline_1_micro_batch_seconds_median": pipeline[1],
                "pipeline_4_micro_batches_seconds_median": pipeline[4],
                "pipeline_bytes_per_boundary": 4 * settings["eval_batch"] * model.embed_dim,
                "gather_then_predict_seconds_median": statistics.median(gathered),
                "gather_bytes": moved["bytes"],
            }
    return out


def run(worlds: list[int], settings: dict) -> dict:
    """Every world size's measurements (one launch each), with the model's prediction next to them."""
    rows, inference = [], []
    for world in worlds:
        ranks = [o.value for o in spawn(_rank, world, (settings,), timeout=600)]
        for mode in MODES:
            per_rank = [r["train"][mode] for r in ranks]
            measured = per_rank[0]["bytes"]
            predicted = per_rank[0]["model_bytes"]
            payload = sum(measured.values())
            rows.append({
                "world": world,
                "mode": mode,
                "payload_bytes_per_step": payload,
                "payload_by_kind": measured,
                "model_bytes_per_step": sum(predicted.values()),
                "model_by_kind": predicted,
                "matches_model": measured == {k: float(v) for k, v in predicted.items()},
                "ring_bytes_per_rank": payload * 2 * (world - 1) / world,
                "collectives_per_step": sum(per_rank[0]["calls"].values()),
                "step_seconds_median": max(r["step_seconds_median"] for r in per_rank),  # the slowest rank's
            })
            print(json.dumps(rows[-1]))
        inference.append({"world": world, **{k: max(r["inference"][k] for r in ranks) for k in ranks[0]["inference"]}})
        print(json.dumps(inference[-1]))
    return {"training": rows, "inference": inference}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.comm", description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", default="1,2,4", help="comma-separated world sizes (at most T)")
    parser.add_argument("--T", type=int, default=4)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--eval-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",")]
    settings = {"T": args.T, "width": args.width, "batch": args.batch, "eval_batch": args.eval_batch, "steps": args.steps, "warmup": args.warmup}
    probe = _model(settings)
    result = {
        "device": {"type": "cpu", "name": device_name(torch.device("cpu")), "cores": os.cpu_count(), "threads_per_rank": 1,
                   "backend": "gloo", "transport": "TCP loopback (127.0.0.1)"},
        "date_utc": utc_now(),
        "versions": versions(),
        "settings": settings,
        "model": {"parameters": sum(p.numel() for p in probe.parameters()),
                  "shared_parameters": sum(p.numel() for n, p in probe.named_parameters() if not n.startswith("blocks.")),
                  "block_split": {str(w): [[r.start, r.stop] for r in partition(args.T, w)] for w in worlds}},
        **run(worlds, settings),
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comm-cpu.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'comm-cpu.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
