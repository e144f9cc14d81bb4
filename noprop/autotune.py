"""``auto`` for ``stacked_linear`` on CUDA: time the candidate backends once per problem, keep the faster.

The first use of a problem (shapes, dtype, device, which inputs need gradients) times every
candidate of :data:`CANDIDATES` that can run it, forward plus backward when gradients are
needed, as the median of :data:`TIMING_RUNS` CUDA-event timings (:func:`noprop.timing.median_cuda_ms`)
after :data:`TIMING_WARMUP_RUNS` warm-up runs; later uses read the cache. Nothing is measured
while ``torch.compile`` traces or a CUDA graph is captured: those use the cached choice, or the
reference for a problem not seen yet. Measuring uses an all-ones upstream gradient, so it draws
no random numbers and leaves every generator as it was.
"""

from __future__ import annotations

from typing import Callable

import torch

from noprop import backends
from noprop.timing import median_cuda_ms

CANDIDATES = ("reference", "triton")  # the backends auto chooses between, where the registry lets them run
TIMING_WARMUP_RUNS = 2  # untimed runs first: Triton compiles, cuBLAS picks its kernels, caches fill
TIMING_RUNS = 5  # timed runs; auto compares their medians

# auto's choice for every problem measured so far: problem key -> backend, and the medians
# (milliseconds per run) it was chosen from.
_choices: dict[tuple, str] = {}
_timings: dict[tuple, dict[str, float]] = {}

Run = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _problem(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple:
    """Key of a problem: ``(x shape, weight shape, dtype, device, input grads needed)``."""
    grads = tuple(t.requires_grad for t in (x, weight, bias)) if torch.is_grad_enabled() else (False,) * 3
    return (tuple(x.shape), tuple(weight.shape), str(x.dtype), str(x.device), grads)


def stacked_linear_choices() -> list[dict]:
    """What ``auto`` chose for every problem it measured (for benchmark reports), in measurement order.

    Returns:
        One dict per problem: ``x_shape [k, B, in]``, ``weight_shape [k, in, out]``, ``dtype``,
        ``device``, ``grads`` (whether x, weight, bias needed gradients, so the backward was timed
        too), ``backend`` (the faster) and ``median_ms`` (per backend).
    """
    fields = ("x_shape", "weight_shape", "dtype", "device", "grads")
    return [dict(zip(fields, key), backend=backend, median_ms=dict(_timings[key])) for key, backend in _choices.items()]


def clear_stacked_linear_choices() -> None:
    """Forget every measured choice: the next use of each problem on a CUDA device measures again."""
    _choices.clear()
    _timings.clear()


def _time_stacked_linear(run: Run, backend: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grads: tuple) -> float:
    """Median milliseconds of one forward (and backward, for the inputs in ``grads``) of ``run`` on ``backend``.

    Runs on detached views of the inputs (same storage, no copy) and an all-ones upstream gradient.
    """
    leaves = [t.detach().requires_grad_(needed) for t, needed in zip((x, weight, bias), grads)]
    differentiable = [t for t in leaves if t.requires_grad]
    upstream = x.new_ones((x.shape[0], x.shape[1], weight.shape[2]))

    def forward_and_backward() -> None:
        with torch.enable_grad():
            y = run(backend, *leaves)
            if differentiable:
                torch.autograd.grad(y, differentiable, upstream)

    return median_cuda_ms(forward_and_backward, TIMING_WARMUP_RUNS, TIMING_RUNS)


def choose_stacked_linear(run: Run, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> str:
    """The backend ``auto`` runs this CUDA ``stacked_linear`` problem on (see the module docstring)."""
    candidates = [b for b in CANDIDATES if not backends.cannot_run(b, "stacked_linear", x.device, (x.dtype,))]
    if len(candidates) < 2:
        return candidates[0] if candidates else "reference"
    problem = _problem(x, weight, bias)
    choice = _choices.get(problem)
    if choice is not None:
        return choice
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return "reference"
    timings = {b: _time_stacked_linear(run, b, x, weight, bias, problem[-1]) for b in candidates}
    choice = min(timings, key=timings.__getitem__)
    _timings[problem] = timings
    _choices[problem] = choice
    return choice
