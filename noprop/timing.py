"""CUDA-event timing of a callable: the one implementation the library and the benchmarks share.

:func:`cuda_event_times` is what ``stacked_linear``'s measured ``auto`` (:mod:`noprop.autotune`)
and the benchmarks in ``bench/`` (not installed) time GPU work with: CUDA events recorded on the
current stream around each call, after untimed warm-up calls, so host timers never wrap
unsynchronised work.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch


def cuda_event_times(run: Callable[[], object], warmup: int, runs: int) -> list[float]:
    """Milliseconds of each of ``runs`` calls of ``run()`` on the current CUDA stream, after ``warmup`` untimed calls.

    Every call is bracketed by its own pair of CUDA events; the function waits for the last one.
    """
    for _ in range(warmup):
        run()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
    for start, end in events:
        start.record()
        run()
        end.record()
    events[-1][1].synchronize()
    return [start.elapsed_time(end) for start, end in events]


def median_cuda_ms(run: Callable[[], object], warmup: int, runs: int) -> float:
    """The median of :func:`cuda_event_times`."""
    return statistics.median(cuda_event_times(run, warmup, runs))
