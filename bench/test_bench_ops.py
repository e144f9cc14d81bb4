"""pytest-benchmark microbenchmarks of the fused ops: forward and backward as separate benchmarks.

Run with ``python -m pytest bench/test_bench_ops.py --benchmark-only`` (not part of the default
test suite: pyproject's ``testpaths`` is ``tests``). Parametrized over every backend, every op
case and pass, and a few shapes; the op cases, their inputs and their byte counts come from
:mod:`bench.op_cases`, shared with the script :mod:`bench.ops`.

The device is CUDA when one is present, else the CPU (where Triton's interpreter is not timed).
Each benchmark calls its op once before timing (Triton compilation, allocator growth). On CUDA
each round synchronizes before it starts (``setup``) and after the op, so only finished GPU work
is timed, with the host's launch and synchronization overhead included.
"""

from __future__ import annotations

import pytest
import torch

from bench import op_cases
from noprop import backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = op_cases.shapes_named(op_cases.QUICK_SHAPES + (("large",) if DEVICE.type == "cuda" else ()))
CUDA_ROUNDS = 100
CUDA_WARMUP_ROUNDS = 10


def _case_id(case: op_cases.OpCase, pass_: str) -> str:
    return f"{case.name.replace('[', '-').rstrip(']')}-{pass_}"


@pytest.mark.parametrize("shape", SHAPES, ids=[shape.name for shape in SHAPES])
@pytest.mark.parametrize("case,pass_", op_cases.CASE_PASSES, ids=[_case_id(c, p) for c, p in op_cases.CASE_PASSES])
@pytest.mark.parametrize("backend", backends.names())
def test_op(benchmark, backend: str, case: op_cases.OpCase, pass_: str, shape: op_cases.Shape) -> None:
    why = op_cases.timed_backends(DEVICE)[backend] or op_cases.lacks(backend, case)
    if why:
        pytest.skip(why)
    fn = op_cases.prepare(case, pass_, shape, backend, DEVICE)
    benchmark.group = f"{case.name} {pass_} {shape.name}"
    benchmark.extra_info.update(device=DEVICE.type, dims=shape.dims, bytes=case.bytes_moved(shape, pass_))
    fn()  # first call: compilation and allocation, never timed
    if DEVICE.type == "cuda":

        def synchronized() -> None:
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(
            synchronized, setup=torch.cuda.synchronize, rounds=CUDA_ROUNDS, warmup_rounds=CUDA_WARMUP_ROUNDS,
            iterations=1,
        )
    else:
        benchmark(fn)
