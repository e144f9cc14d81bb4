"""Timers of the op microbenchmarks: median and p20/p80 of one callable, and the device copy bandwidth.

* CPU (:func:`time_cpu`): ``time.perf_counter`` around batches of calls. The first call is not
  timed; warm-up runs for ``warmup_s`` (at least one call); a batch holds enough calls to last
  ``sample_s``; each sample is batch time / calls. Samples are taken until ``max_samples``, or
  until ``budget_s`` has passed once ``min_samples`` are in.
* CUDA (:func:`time_cuda`): ``triton.testing.do_bench`` with its 20/50/80% quantiles: CUDA events
  around each call, the L2 cache flushed before each, after an untimed first call and a warm-up.
  The repetition time is stretched so that at least ``min_samples`` calls are timed. Host
  launch overhead counts where the host cannot stay ahead of the device, as it would in use.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from noprop.timing import cuda_event_times


@dataclass(frozen=True)
class TimingConfig:
    """How long to warm up and sample (CPU fields in seconds, do_bench fields in milliseconds)."""

    warmup_s: float = 0.2
    sample_s: float = 0.005
    min_samples: int = 7
    max_samples: int = 30
    budget_s: float = 1.5
    warmup_ms: float = 25.0
    rep_ms: float = 100.0


QUICK = TimingConfig(warmup_s=0.05, sample_s=0.002, min_samples=5, max_samples=15, budget_s=0.3, rep_ms=50.0)


@dataclass(frozen=True)
class Timing:
    """Per-call time of one callable: median and spread over the samples, in milliseconds."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int
    calls_per_sample: int


def summarize(times_ms: list[float], calls_per_sample: int) -> Timing:
    """Median and 20th/80th percentiles (linear interpolation) of per-call times."""
    p20, median, p80 = np.percentile(np.asarray(times_ms, dtype=np.float64), [20, 50, 80])
    return Timing(float(median), float(p20), float(p80), len(times_ms), calls_per_sample)


def time_cpu(fn: Callable[[], object], config: TimingConfig) -> Timing:
    """Time ``fn`` on the host (CPU tensors: nothing runs asynchronously)."""
    fn()  # first call: allocator growth, dispatch caches; never timed
    calls, start = 0, time.perf_counter()
    while True:  # warm-up, which also measures the per-call time
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= config.warmup_s:
            break
    per_sample = max(1, math.ceil(config.sample_s / (elapsed / calls)))
    times: list[float] = []
    begin = time.perf_counter()
    while len(times) < config.max_samples and (
        len(times) < config.min_samples or time.perf_counter() - begin < config.budget_s
    ):
        t0 = time.perf_counter()
        for _ in range(per_sample):
            fn()
        times.append((time.perf_counter() - t0) * 1e3 / per_sample)
    return summarize(times, per_sample)


def time_cuda(fn: Callable[[], object], config: TimingConfig) -> Timing:
    """Time ``fn``'s GPU work with ``triton.testing.do_bench`` (CUDA events, L2 flushed per call)."""
    from triton.testing import do_bench

    fn()  # first call: Triton JIT compilation, allocator growth; never timed
    torch.cuda.synchronize()
    (estimate_ms,) = cuda_event_times(fn, warmup=0, runs=1)
    rep_ms = max(config.rep_ms, 1.5 * config.min_samples * estimate_ms)
    warmup_ms = max(config.warmup_ms, 2 * estimate_ms)
    # quantiles rather than return_mode="all", which Triton 3.1 (torch 2.5) does not have
    p20, median, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
    samples = max(1, int(rep_ms / max(estimate_ms, 1e-3)))  # do_bench's repetitions, as it estimates them
    return Timing(float(median), float(p20), float(p80), samples, 1)


def time_callable(fn: Callable[[], object], device: torch.device, config: TimingConfig) -> Timing:
    """:func:`time_cuda` on a CUDA device, :func:`time_cpu` otherwise."""
    return time_cuda(fn, config) if device.type == "cuda" else time_cpu(fn, config)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Device memory one call of ``fn`` allocates at its peak beyond what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def copy_bandwidth(device: torch.device, config: TimingConfig, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s: ``2 * nbytes`` (read + written) / median copy time."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = time_callable(lambda: dst.copy_(src), device, config)
    return 2 * src.numel() * src.element_size() / (timing.median_ms * 1e-3)
