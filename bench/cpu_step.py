"""The default DT training step on the CPU against the seed-style loop and the machine's SGEMM rate.

One process, one run: the library's default step (``BlockStack``, ``backend="auto"``: the
extension's conv epilogue, fused AdamW; the host-memory policy ``"reuse"`` that ``noprop train``
sets on a CPU, :mod:`noprop.host_memory`) and the seed-style loop (:class:`bench.loops.SeedStyleLoop`:
per-block modules with ``nn.Dropout``, foreach AdamW, the same block, under glibc's default
allocation, ``"system"``) are timed alternately, step for step, with a float32 SGEMM (``torch.mm`` of
two ``n x n`` matrices) between them, so a load change on the machine hits all of them alike. Two
more cases in the same rotation say how much of the speed-up is the allocation policy: the
default step under glibc's default allocation (``default_system``) and the seed-style loop under
``"reuse"`` (``seed_style_reuse``). Reported: medians, the speed-up, the step's
FLOP rate (FLOPs counted by :func:`dt_step_flops`, not by ``FlopCounterMode``, which counts a
grouped convolution T times over) as a fraction of the SGEMM rate, and ATen ops per step of
both at several T (:class:`CountOps`).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.loops import SeedStyleLoop
from noprop import NoPropDT
from noprop.blocks import BlockConfig, POOLED_STAGES, flat_features
from noprop.host_memory import set_host_memory
from noprop.step import TrainStep
from noprop.train import TrainConfig, build_optimizer

NUM_CLASSES, IMAGE = 10, (1, 28, 28)


def layer_macs(config: BlockConfig, in_channels: int, image_size: int, embed_dim: int, num_classes: int) -> dict[str, int]:
    """Multiply-accumulates of one DT block's forward pass for one image, per layer (one-hot/learned label path).

    Convolutions ``c_in * c_out * 9 * H_out * W_out`` (3x3, padding 1: the output has the input's size),
    fully connected layers ``in * out``; element-wise work (BatchNorm, ReLU, pooling, dropout) is not counted.
    """
    c1, c2, c3 = config.conv_channels
    sizes, size = [], image_size
    for pooled in POOLED_STAGES:
        sizes.append(size)
        size = size // 2 if pooled else size
    h, (f1, f2) = config.hidden, config.fusion
    return {
        "conv1": in_channels * c1 * 9 * sizes[0] ** 2,
        "conv2": c1 * c2 * 9 * sizes[1] ** 2,
        "conv3": c2 * c3 * 9 * sizes[2] ** 2,
        "image.fc": flat_features(config, image_size) * h,
        "label.fc1": embed_dim * h,
        "label.fc2": h * h,
        "label.fc3": h * h,
        "fusion.fc1": 2 * h * f1,
        "fusion.fc2": f1 * f2,
        "fusion.out": f2 * num_classes,
    }


def dt_step_flops(T: int, batch_size: int, config: BlockConfig = BlockConfig(), in_channels: int = 1, image_size: int = 28,
                  embed_dim: int = NUM_CLASSES, num_classes: int = NUM_CLASSES) -> int:
    """FLOPs (2 per multiply-accumulate) of one DT training step of T blocks on ``batch_size`` images.

    Forward ``F`` per layer, backward ``F`` for the weight gradient and ``F`` for the input gradient,
    except for the layers whose input needs no gradient (``conv1`` reads the images, ``label.fc1``
    the noised latent of a fixed one-hot embedding): ``3 F`` or ``2 F``. The classifier and the loss
    (``B * C * D`` each) are negligible and left out.
    """
    macs = layer_macs(config, in_channels, image_size, embed_dim, num_classes)
    no_input_grad = {"conv1", "label.fc1"}
    per_image = sum((2 if name in no_input_grad else 3) * m for name, m in macs.items())
    return 2 * per_image * T * batch_size


class CountOps(TorchDispatchMode):
    """Counts the ATen operations dispatched (each is at least one kernel launch on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(step, x: torch.Tensor, y: torch.Tensor) -> int:
    """ATen ops of one call of ``step(x, y)`` after a first call that creates the optimizer state."""
    step(x, y)
    with CountOps() as counter:
        step(x, y)
    return counter.count


def default_step(T: int, width: float = 1.0) -> TrainStep:
    """The library's default DT training step (what ``noprop train`` runs): BlockStack, ``backend="auto"``."""
    torch.manual_seed(0)
    model = NoPropDT(NUM_CLASSES, *IMAGE[:1], IMAGE[1], T=T, width=width)
    return TrainStep(model, build_optimizer(model, TrainConfig()))


def seed_style_loop(T: int, width: float = 1.0) -> SeedStyleLoop:
    """The seed-style loop over the same blocks (reference ops, ``nn.Dropout``, foreach AdamW per block)."""
    torch.manual_seed(0)
    model = NoPropDT(NUM_CLASSES, *IMAGE[:1], IMAGE[1], T=T, width=width, schedule="paper", backend="reference")
    return SeedStyleLoop(model)


def sgemm_seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    begin = time.perf_counter()
    torch.mm(a, b)
    return time.perf_counter() - begin


def measure(T: int = 10, batch_size: int = 128, rounds: int = 10, warmup: int = 2, gemm_size: int = 2048,
            ops_T: tuple[int, ...] = (5, 10, 20), width: float = 1.0) -> dict:
    """Alternate ``rounds`` default steps, seed-style steps and SGEMMs after ``warmup`` of each; count ops
    (at width 0.125 and 16 images: the count depends on neither)."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch_size, *IMAGE, generator=g), torch.randint(0, NUM_CLASSES, (batch_size,), generator=g))
               for _ in range(4)]
    a, b = torch.randn(gemm_size, gemm_size, generator=g), torch.randn(gemm_size, gemm_size, generator=g)
    fused, seed = default_step(T, width), seed_style_loop(T, width)
    cases = (("default", fused, "reuse"), ("seed_style", seed, "system"), ("default_system", fused, "system"),
             ("seed_style_reuse", seed, "reuse"))
    times = {name: [] for name, _, _ in cases} | {"sgemm": []}
    for i in range(warmup + rounds):
        for name, run, policy in cases:
            set_host_memory(policy, release=False)
            begin = time.perf_counter()
            run(*batches[i % 4])
            if i >= warmup:
                times[name].append(time.perf_counter() - begin)
        seconds = sgemm_seconds(a, b)
        if i >= warmup:
            times["sgemm"].append(seconds)
    set_host_memory("system")
    median = {name: statistics.median(values) for name, values in times.items()}
    step_flops = dt_step_flops(T, batch_size, fused.model.blocks.config)
    sgemm_rate = 2 * gemm_size**3 / median["sgemm"]
    step_rate = step_flops / median["default"]
    x, y = batches[0]
    small = (x[:16], y[:16])
    ops_T = tuple(sorted(set(ops_T) | {T}))
    default_ops = {t: ops_per_step(default_step(t, width=0.125), *small) for t in ops_T}
    seed_ops = ops_per_step(seed_style_loop(T, width=0.125), *small)
    return {
        "T": T,
        "batch_size": batch_size,
        "width": width,
        "rounds": rounds,
        "torch_threads": torch.get_num_threads(),
        "host_memory": {name: policy for name, _, policy in cases},
        "step_seconds_median": {name: median[name] for name, _, _ in cases},
        "step_seconds_all": {name: times[name] for name, _, _ in cases},
        "speedup_vs_seed_style": median["seed_style"] / median["default"],
        "speedup_vs_seed_style_reuse": median["seed_style_reuse"] / median["default"],
        "speedup_default_system_vs_seed_style": median["seed_style"] / median["default_system"],
        "step_gflop": step_flops / 1e9,
        "step_gflop_per_second": step_rate / 1e9,
        "sgemm": {"n": gemm_size, "seconds_median": median["sgemm"], "gflop_per_second": sgemm_rate / 1e9},
        "fraction_of_sgemm_rate": step_rate / sgemm_rate,
        "aten_ops_per_step": {"default": {str(t): n for t, n in default_ops.items()}, f"seed_style_T{T}": seed_ops},
        "aten_ops_ratio": seed_ops / default_ops[T],
    }


def criteria(result: dict) -> list[tuple[str, float, str, float]]:
    """(label, value, comparison, threshold) of the CPU targets."""
    ops = result["aten_ops_per_step"]["default"].values()
    return [
        ("default step vs seed-style loop, alternated (speed-up)", result["speedup_vs_seed_style"], ">=", 1.5),
        ("default step FLOP rate / SGEMM rate", result["fraction_of_sgemm_rate"], ">=", 0.6),
        ("ATen ops per step, seed-style / default", result["aten_ops_ratio"], ">=", 5.0),
        ("ATen ops per step, largest / smallest over T", max(ops) / min(ops), "<=", 1.05),
    ]
