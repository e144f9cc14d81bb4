"""Public fused ops and the one place that chooses a backend.

Three op families cover NoProp's training and inference (DESIGN section 3):

* :func:`noised_latents`: ``z[t, i] = a[t, i] * W[y_i] + b[t, i] * eps[t, i]``;
* :func:`denoising_loss`: ``sum_{t,i} w[t, i] * ||readout(logits[t, i]) @ W - W[y_i] - c[t, i] eps[t, i]||^2 / B``;
* :func:`latent_update`: ``z_new = p * readout(logits) @ W + q * z + r * eps`` (inference steps, and
  the back-propagation baseline's recursion, which trains through it);

plus :func:`normal`, the noise they all draw (``eps`` is a pure function of the seed and the
element index, see :mod:`noprop.rng`), and :func:`stacked_linear`, the batched fully connected
layer of :class:`noprop.stack.BlockStack` (``y[t] = act(x[t] @ W[t] + b[t])``), which has its own
backend set and ``auto`` rule (see its docstring).

Each op runs on one of three backends with one signature:

* ``"reference"``: plain PyTorch (:mod:`noprop.reference`), any device and float dtype, gradients
  by autograd. The fallback and the test oracle.
* ``"triton"``: Triton kernels (:mod:`noprop.kernels`) on CUDA tensors, or on CPU tensors when
  ``TRITON_INTERPRET=1`` was set before ``noprop`` was imported.
* ``"cuda"``: the C++/CUDA extension (``noprop._C``, built from ``csrc/``): CUDA kernels on CUDA
  tensors and the same per-element code as host loops on CPU tensors.

``backend="auto"`` picks a fused backend on a CUDA tensor when one can run it and the reference
otherwise; the environment variable ``NOPROP_BACKEND`` replaces ``auto`` with a fixed choice. An
explicit backend that cannot run an input raises :class:`BackendUnavailableError` saying why.
The fused backends are registered as ``torch.library`` custom ops (``noprop::*``), so
``torch.compile(fullgraph=True)`` keeps them without graph breaks.
"""

from __future__ import annotations

import functools
import os
import statistics
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from noprop import reference, rng
from noprop.validation import check_choice, check_floating, check_labels, check_tensor

BACKENDS = ("reference", "triton", "cuda")
FUSED_BACKENDS = ("cuda", "triton")  # the order ``auto`` tries them in on a CUDA tensor
READOUTS = reference.READOUTS
ACTIVATIONS = reference.ACTIVATIONS
STACKED_LINEAR_BACKENDS = ("reference", "triton")  # stacked_linear has no C++/CUDA version
_FUSED_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the given input (the message says why)."""


@dataclass(frozen=True)
class BackendStatus:
    """What a backend can run on this machine.

    Attributes:
        name: ``"reference"``, ``"triton"`` or ``"cuda"``.
        devices: device types (``"cpu"``, ``"cuda"``) it can run on here; empty if none.
        reason: why it cannot run (or cannot run on a CUDA device) here; empty if nothing is missing.
    """

    name: str
    devices: tuple[str, ...]
    reason: str

    @property
    def available(self) -> bool:
        """True if the backend can run on at least one device here."""
        return bool(self.devices)


def _triton_status() -> BackendStatus:
    try:
        from noprop import kernels
    except Exception as error:  # ImportError, or triton failing to initialise
        return BackendStatus("triton", (), f"cannot import noprop.kernels: {error}")
    devices = []
    reasons = []
    if torch.cuda.is_available():
        devices.append("cuda")
    else:
        reasons.append("no CUDA device")
    if kernels.INTERPRETER:
        devices.append("cpu")
    else:
        reasons.append("CPU tensors need TRITON_INTERPRET=1 set before importing noprop")
    return BackendStatus("triton", tuple(devices), "; ".join(reasons))


def _cuda_extension_status() -> BackendStatus:
    from noprop import _ext

    module, error = _ext.load()
    if module is None:
        return BackendStatus("cuda", (), f"the C++/CUDA extension noprop._C is not built ({error})")
    devices = ["cpu"]
    reason = ""
    if not _ext.has_cuda_kernels():
        reason = "the extension was built without CUDA kernels (no nvcc or NOPROP_SKIP_CUDA=1)"
    elif not torch.cuda.is_available():
        reason = "no CUDA device"
    else:
        devices.append("cuda")
    return BackendStatus("cuda", tuple(devices), reason)


@functools.lru_cache(maxsize=None)
def available_backends() -> dict[str, BackendStatus]:
    """Every backend with the devices it can run on here and, if something is missing, why.

    Returns:
        ``{"reference": BackendStatus, "triton": BackendStatus, "cuda": BackendStatus}``.
    """
    return {
        "reference": BackendStatus("reference", ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",), ""),
        "triton": _triton_status(),
        "cuda": _cuda_extension_status(),
    }


# A constant for torch.compile: evaluated while tracing, never traced into (available_backends'
# probes, such as the extension's compiled_with_cuda, are opaque to dynamo and would break the graph).
@torch.compiler.assume_constant_result
def _cannot_run(backend: str, device: torch.device, dtypes: Sequence[torch.dtype]) -> str:
    """Why ``backend`` cannot run tensors on ``device`` with ``dtypes``; empty if it can."""
    status = available_backends()[backend]
    if device.type not in status.devices:
        why = status.reason or f"it does not run on {device.type} tensors"
        return f"it cannot run on {device.type} tensors here: {why}"
    if backend == "reference":
        return ""
    allowed = _FUSED_CUDA_DTYPES if device.type == "cuda" else (torch.float32,)
    for dtype in dtypes:
        if dtype not in allowed:
            names = ", ".join(str(d).replace("torch.", "") for d in allowed)
            return f"it supports {names} on {device.type}, got {str(dtype).replace('torch.', '')}"
    return ""


def resolve_backend(backend: str, device: torch.device, dtypes: Sequence[torch.dtype] = ()) -> str:
    """Turn ``backend`` (``"auto"`` or a name) into the backend that will run.

    ``auto`` reads ``NOPROP_BACKEND`` first; without it, a CUDA tensor gets the first fused
    backend (``cuda``, then ``triton``) that can run it, anything else the reference.

    Raises:
        ValueError: unknown backend name (argument or ``NOPROP_BACKEND``).
        BackendUnavailableError: the chosen backend cannot run this device or dtype here.
    """
    check_choice("backend", backend, ("auto",) + BACKENDS)
    if backend == "auto":
        override = os.environ.get("NOPROP_BACKEND", "").strip()
        if override and override != "auto":
            check_choice("NOPROP_BACKEND", override, BACKENDS)
            backend = override
        else:
            if device.type == "cuda":
                for candidate in FUSED_BACKENDS:
                    if not _cannot_run(candidate, device, dtypes):
                        return candidate
            return "reference"
    why = _cannot_run(backend, device, dtypes)
    if why:
        raise BackendUnavailableError(f"backend {backend!r} cannot run this input: {why}")
    return backend


# ----------------------------------------------------------------------------------------------
# Input normalisation: every backend receives contiguous tensors of the documented shapes.


def _check_embedding(W: object) -> torch.Tensor:
    W = check_tensor("W", W)
    check_floating("W", W)
    if W.dim() != 2:
        raise ValueError(f"W: expected the embedding matrix [C, D], got shape {list(W.shape)}")
    return W


def _coefficient(name: str, value: object, T: int, B: int, device: torch.device) -> torch.Tensor:
    """Expand a per-block ``[T]`` or per-example ``[T, B]`` coefficient to a contiguous ``[T, B]``.

    The expansion is a differentiable view, so autograd sums the gradient of a ``[T]`` input.
    """
    value = check_tensor(name, value)
    check_floating(name, value)
    if value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {value.device}")
    if tuple(value.shape) == (T,):
        value = value.unsqueeze(1).expand(T, B)
    elif tuple(value.shape) != (T, B):
        raise ValueError(f"{name}: expected shape [{T}] or [{T}, {B}], got {list(value.shape)}")
    return value.float().contiguous()


def _row_coefficient(name: str, value: object, N: int, device: torch.device) -> torch.Tensor:
    """A latent-update coefficient as a contiguous float32 ``[N]``: from a float, a 0-dim or ``[N]`` tensor."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((N,), float(value), dtype=torch.float32, device=device)
    value = check_tensor(name, value)
    check_floating(name, value)
    if value.dim() == 0:
        return value.float().reshape(1).expand(N).contiguous()
    if value.numel() != N:
        raise ValueError(f"{name}: expected a float, a 0-dim tensor or {N} values (one per row), got shape {list(value.shape)}")
    return value.float().reshape(N).contiguous()


def _labels(y: object, num_classes: int, batch_size: int | None, device: torch.device) -> torch.Tensor:
    y = check_labels("y", y, num_classes, batch_size)
    if y.device != device:
        raise ValueError(f"y: expected a tensor on {device}, got one on {y.device}")
    return y.contiguous()


# ----------------------------------------------------------------------------------------------
# Public ops.


def normal(
    seed: int | torch.Tensor,
    shape: Sequence[int],
    offset: int = 0,
    device: torch.device | str | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Standard normals of the noise contract: element ``k`` (row-major) from counter ``offset + k``.

    ``eps[k]`` equals Triton's ``tl.randn(seed, offset + k)`` (Philox 4x32-10, then Box-Muller; see
    :mod:`noprop.rng`) on every backend, up to the float rounding of ``log`` and ``cos``.

    Args:
        seed: int in ``[0, 2**63)`` or int64 tensor with one element.
        shape: output shape.
        offset: first counter, ``>= 0``.
        device: output device (default: the seed tensor's device, else the CPU).
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.

    Returns:
        float32 tensor of ``shape``.
    """
    if device is None:
        device = seed.device if isinstance(seed, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    seed_tensor = rng.as_seed_tensor(seed, device)
    shape = tuple(int(s) for s in shape)
    if offset < 0:
        raise ValueError(f"offset: expected an int >= 0, got {offset}")
    chosen = resolve_backend(backend, device)
    if chosen == "reference":
        return reference.normal(seed_tensor, shape, offset)
    from noprop import _custom_ops

    return _custom_ops.normal(seed_tensor, list(shape), offset, chosen)


def noised_latents(
    W: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    seed: int | torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Noised label embeddings for all T blocks: ``z[t, i] = a[t, i] * W[y_i] + b[t, i] * eps[t, i]``.

    ``eps = normal(seed, (T, B, D))`` is drawn inside the op and never stored; the backward pass
    regenerates it. Differentiable in ``W``, ``a`` and ``b``.

    Args:
        W: label embedding matrix ``[C, D]``.
        y: class labels ``[B]``, values in ``[0, C)``.
        a: signal coefficients ``[T]`` (one per block) or ``[T, B]`` (one per example).
        b: noise coefficients, same rules as ``a``.
        seed: int or int64 tensor with one element.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``z [T, B, D]`` in ``W``'s dtype.
    """
    W = _check_embedding(W)
    device = W.device
    y = _labels(y, W.shape[0], None, device)
    a = check_tensor("a", a)
    if a.dim() not in (1, 2):
        raise ValueError(f"a: expected shape [T] or [T, B], got {list(a.shape)}")
    T, B = a.shape[0], y.shape[0]
    a = _coefficient("a", a, T, B, device)
    b = _coefficient("b", b, T, B, device)
    seed_tensor = rng.as_seed_tensor(seed, device)
    chosen = resolve_backend(backend, device, (W.dtype,))
    if chosen == "reference":
        return reference.noised_latents(W, y, a, b, seed_tensor)
    from noprop import _custom_ops

    return _custom_ops.noised_latents(W.contiguous(), y, a, b, seed_tensor, chosen)


def denoising_loss(
    logits: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    *,
    readout: str = "softmax",
    noise_coef: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    backend: str = "auto",
    return_row_errors: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SNR-weighted L2 loss of all T blocks, from their logits, in one op.

    ``u_hat[t, i] = readout(logits[t, i]) @ W`` with ``readout`` softmax (DT, CT) or linear (FM);
    ``target[t, i] = W[y_i] + noise_coef[t, i] * eps[t, i]`` with ``eps`` the same noise that
    :func:`noised_latents` draws for ``seed`` (no noise term when ``noise_coef`` is None);
    ``loss = sum_{t, i} weight[t, i] * ||u_hat[t, i] - target[t, i]||^2 / B``.
    Differentiable in ``logits``, ``W`` and ``weight``.

    Args:
        logits: ``[T, B, C]``.
        W: label embedding matrix ``[C, D]``.
        y: class labels ``[B]``.
        weight: loss weights ``[T]`` or ``[T, B]``.
        readout: ``"softmax"`` or ``"linear"``.
        noise_coef: ``[T]`` or ``[T, B]`` noise coefficient of the target (FM: ``-1``), or None.
        seed: the seed of the noise; required when ``noise_coef`` is given.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.
        return_row_errors: also return the per-row squared errors (for per-block logging).

    Returns:
        The float32 scalar loss, or ``(loss, row_sq_error)`` with the detached
        ``row_sq_error[t, i] = ||u_hat[t, i] - target[t, i]||^2`` ``[T, B]`` when
        ``return_row_errors`` is set.
    """
    logits = check_tensor("logits", logits)
    check_floating("logits", logits)
    W = _check_embedding(W)
    if logits.dim() != 3 or logits.shape[2] != W.shape[0]:
        raise ValueError(f"logits: expected shape [T, B, {W.shape[0]}] (C = W.shape[0]), got {list(logits.shape)}")
    device = logits.device
    if W.device != device:
        raise ValueError(f"W: expected a tensor on {device}, got one on {W.device}")
    T, B, _ = logits.shape
    y = _labels(y, W.shape[0], B, device)
    check_choice("readout", readout, READOUTS)
    weight = _coefficient("weight", weight, T, B, device)
    seed_tensor = None
    if noise_coef is not None:
        noise_coef = _coefficient("noise_coef", noise_coef, T, B, device).detach()
        if seed is None:
            raise ValueError("seed: required when noise_coef is given (it selects the noise of the target)")
        seed_tensor = rng.as_seed_tensor(seed, device)
    chosen = resolve_backend(backend, device, (logits.dtype, W.dtype))
    if chosen == "reference":
        loss, row_sq_error = reference.denoising_loss(logits, W, y, weight, noise_coef, seed_tensor, readout)
    else:
        from noprop import _custom_ops

        loss, row_sq_error = _custom_ops.denoising_loss(
            logits.contiguous(), W.contiguous(), y, weight, noise_coef, seed_tensor, readout, chosen
        )
    return (loss, row_sq_error) if return_row_errors else loss


def latent_update(
    logits: torch.Tensor,
    W: torch.Tensor,
    z: torch.Tensor,
    p: float | torch.Tensor,
    q: float | torch.Tensor,
    r: float | torch.Tensor,
    seed: int | torch.Tensor,
    *,
    readout: str = "softmax",
    backend: str = "auto",
) -> torch.Tensor:
    """One step on the latent: ``z_new = p * readout(logits) @ W + q * z + r * eps``.

    DT's Eq. 3 is ``p, q, r = a_t, b_t, sqrt(c_t)``; an Euler step of an ODE
    ``dz/dt = P u_hat + Q z`` is ``p, q, r = h P, 1 + h Q, 0``; the back-propagation baseline's
    ``z_t = (1 - alpha_t) z_{t-1} + alpha_t u_hat_t`` is ``p, q, r = alpha_t, 1 - alpha_t, 0``.
    ``eps = normal(seed, z.shape)``.

    Differentiable in ``logits``, ``W``, ``z``, ``p``, ``q`` and ``r`` on every backend. With
    ``g = dL/dz_new``, ``s = readout(logits)`` and ``u_hat = s @ W``, per row ``n``:
    ``dz = q * g``; ``dp = <g, u_hat>``, ``dq = <g, z>``, ``dr = <g, eps>``;
    ``ds = p * g @ W^T`` and ``dlogits = s * (ds - <s, ds>)`` (softmax) or ``ds`` (linear);
    ``dW = sum_n p * s^T g``. A float coefficient gets no gradient, a 0-dim tensor the sum over
    rows. The fused backends save only the inputs and regenerate ``eps`` from the seed.

    Args:
        logits: ``[..., C]`` with the same leading shape as ``z``.
        W: label embedding matrix ``[C, D]``.
        z: current latent ``[..., D]``.
        p, q, r: floats, 0-dim tensors or tensors with one value per row of ``z`` (shape ``z.shape[:-1]``).
        seed: int or int64 tensor with one element.
        readout: ``"softmax"`` or ``"linear"``.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``z_new``, shaped and typed like ``z``.
    """
    logits = check_tensor("logits", logits)
    check_floating("logits", logits)
    W = _check_embedding(W)
    z = check_tensor("z", z)
    check_floating("z", z)
    C, D = W.shape
    if z.dim() < 1 or z.shape[-1] != D:
        raise ValueError(f"z: expected shape [..., {D}] (D = W.shape[1]), got {list(z.shape)}")
    if tuple(logits.shape) != (*z.shape[:-1], C):
        raise ValueError(f"logits: expected shape {[*z.shape[:-1], C]} (z's rows, C = W.shape[0]), got {list(logits.shape)}")
    device = z.device
    for name, tensor in (("logits", logits), ("W", W)):
        if tensor.device != device:
            raise ValueError(f"{name}: expected a tensor on {device}, got one on {tensor.device}")
    check_choice("readout", readout, READOUTS)
    N = z.numel() // D
    p, q, r = (_row_coefficient(n, v, N, device) for n, v in (("p", p), ("q", q), ("r", r)))
    seed_tensor = rng.as_seed_tensor(seed, device)
    chosen = resolve_backend(backend, device, (logits.dtype, W.dtype, z.dtype))
    flat_logits, flat_z = logits.reshape(N, C), z.reshape(N, D)
    if chosen == "reference":
        return reference.latent_update(flat_logits, W, flat_z, p, q, r, seed_tensor, readout).reshape(z.shape)
    from noprop import _custom_ops

    z_new = _custom_ops.latent_update(
        flat_logits.contiguous(), W.contiguous(), flat_z.contiguous(), p, q, r, seed_tensor, readout, chosen
    )
    return z_new.reshape(z.shape)


# ----------------------------------------------------------------------------------------------
# stacked_linear: the batched fully connected layer, and the measured choice of its ``auto``.

STACKED_LINEAR_ENV = "NOPROP_STACKED_LINEAR"  # "reference" or "triton": replaces stacked_linear's auto
TIMING_WARMUP_RUNS = 2  # untimed runs first: Triton compiles, cuBLAS picks its kernels, caches fill
TIMING_RUNS = 5  # timed runs; auto compares their medians

# auto's choice for every problem measured so far: problem key (see _stacked_linear_problem) ->
# backend, and the medians (milliseconds per run) it was chosen from.
_stacked_linear_choices: dict[tuple, str] = {}
_stacked_linear_timings: dict[tuple, dict[str, float]] = {}


def _stacked_linear_problem(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str) -> tuple:
    """Key of a problem for auto: ``(x shape, weight shape, dtype, activation, device, input grads needed)``."""
    grads = tuple(t.requires_grad for t in (x, weight, bias)) if torch.is_grad_enabled() else (False,) * 3
    return (tuple(x.shape), tuple(weight.shape), str(x.dtype), activation, str(x.device), grads)


def stacked_linear_choices() -> list[dict]:
    """What ``auto`` chose for every problem it measured (for benchmark reports), in measurement order.

    Returns:
        One dict per problem: ``x_shape [k, B, in]``, ``weight_shape [k, in, out]``, ``dtype``,
        ``activation``, ``device``, ``grads`` (whether x, weight, bias needed gradients, so the
        backward was timed too), ``backend`` (the faster) and ``median_ms`` (per backend).
    """
    fields = ("x_shape", "weight_shape", "dtype", "activation", "device", "grads")
    return [
        dict(zip(fields, key), backend=backend, median_ms=dict(_stacked_linear_timings[key]))
        for key, backend in _stacked_linear_choices.items()
    ]


def clear_stacked_linear_choices() -> None:
    """Forget every measured choice: the next use of each problem on a CUDA device measures again."""
    _stacked_linear_choices.clear()
    _stacked_linear_timings.clear()


def _median_cuda_ms(run: Callable[[], object]) -> float:
    """Median over ``TIMING_RUNS`` of ``run()``'s time on the current CUDA stream (CUDA events), after warm-up."""
    for _ in range(TIMING_WARMUP_RUNS):
        run()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(TIMING_RUNS)]
    for start, end in events:
        start.record()
        run()
        end.record()
    events[-1][1].synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def _time_stacked_linear(
    backend: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str, grads: tuple
) -> float:
    """Median milliseconds of one forward (and backward, for the inputs in ``grads``) on ``backend``.

    Runs on detached copies of the inputs' metadata (same storage, no copy); the upstream gradient
    is all ones, so measuring draws no random numbers and leaves every generator as it was.
    """
    leaves = [t.detach().requires_grad_(needed) for t, needed in zip((x, weight, bias), grads)]
    differentiable = [t for t in leaves if t.requires_grad]
    upstream = x.new_ones((x.shape[0], x.shape[1], weight.shape[2]))

    def forward_and_backward() -> None:
        with torch.enable_grad():
            y = _run_stacked_linear(backend, *leaves, activation)
            if differentiable:
                torch.autograd.grad(y, differentiable, upstream)

    return _median_cuda_ms(forward_and_backward)


def _auto_stacked_linear_backend(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str) -> str:
    """``auto`` for :func:`stacked_linear`: on CUDA the faster backend for this problem, else the reference.

    The first use of a problem times both backends (:func:`_time_stacked_linear`) and caches the
    faster; later uses read the cache. Nothing is measured while ``torch.compile`` traces or a CUDA
    graph is captured: those use the cached choice, or the reference for a problem not seen yet.
    An empty problem (a zero dimension) runs the reference.
    """
    if x.device.type != "cuda" or x.numel() == 0 or weight.numel() == 0 or _cannot_run("triton", x.device, (x.dtype,)):
        return "reference"
    problem = _stacked_linear_problem(x, weight, bias, activation)
    choice = _stacked_linear_choices.get(problem)
    if choice is not None:
        return choice
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return "reference"
    grads = problem[-1]
    timings = {b: _time_stacked_linear(b, x, weight, bias, activation, grads) for b in STACKED_LINEAR_BACKENDS}
    choice = min(timings, key=timings.__getitem__)
    _stacked_linear_timings[problem] = timings
    _stacked_linear_choices[problem] = choice
    return choice


def _stacked_linear_backend(
    backend: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str
) -> str:
    """The backend that runs :func:`stacked_linear` (see its docstring for the rules)."""
    check_choice("backend", backend, ("auto",) + BACKENDS)
    if backend == "auto":
        override = os.environ.get(STACKED_LINEAR_ENV, "").strip()
        if not override or override == "auto":
            return _auto_stacked_linear_backend(x, weight, bias, activation)
        backend = check_choice(STACKED_LINEAR_ENV, override, STACKED_LINEAR_BACKENDS)
    if backend == "cuda":
        raise BackendUnavailableError(
            "backend 'cuda' has no stacked_linear: the C++/CUDA extension has no GEMM. Use 'reference' "
            "(torch.baddbmm, cuBLAS on CUDA tensors), 'triton', or 'auto' (the faster of the two)"
        )
    why = _cannot_run(backend, x.device, (x.dtype,))
    if why:
        raise BackendUnavailableError(f"backend {backend!r} cannot run this input: {why}")
    return backend


def _run_stacked_linear(
    backend: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str
) -> torch.Tensor:
    if backend == "reference":
        return reference.stacked_linear(x, weight, bias, activation)
    from noprop import _custom_ops

    return _custom_ops.stacked_linear(x, weight, bias, activation)


def stacked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    activation: str = "none",
    backend: str = "auto",
) -> torch.Tensor:
    """T independent linear layers in one batched product: ``y[t] = act(x[t] @ weight[t] + bias[t])``.

    ``act`` is the identity (``"none"``) or ReLU (``"relu"``). Differentiable in ``x``, ``weight``
    and ``bias``: with ``g' = g * relu'(y)`` (``g`` without activation), ``dx[t] = g'[t] @ weight[t]^T``,
    ``dW[t] = x[t]^T @ g'[t]``, ``db[t] = sum_i g'[t, i]``.

    Backends (this op's own set; ``NOPROP_BACKEND`` does not apply to it):

    * ``"reference"``: ``torch.baddbmm`` (cuBLAS on CUDA tensors), any device and float dtype.
    * ``"triton"``: :mod:`noprop.kernels.bmm`, bias and activation fused into the GEMM; CUDA tensors
      in float32, bfloat16 or float16, CPU tensors in float32 through the interpreter.
    * ``"cuda"``: none; raises :class:`BackendUnavailableError` (the extension has no GEMM).
    * ``"auto"``: the reference off CUDA. On CUDA, the first use of each problem (shapes, dtype,
      activation, device, which inputs need gradients) times both backends, forward plus backward
      when gradients are needed, as the median of ``TIMING_RUNS`` CUDA-event timings after
      ``TIMING_WARMUP_RUNS`` warm-up runs, and keeps the faster for that problem
      (:func:`stacked_linear_choices` lists them). Nothing is measured while ``torch.compile``
      traces or a CUDA graph is captured; a problem not measured yet runs the reference there, so
      run one eager step first. ``NOPROP_STACKED_LINEAR=reference|triton`` replaces ``auto``.

    Inside ``torch.autocast`` the inputs are cast to the autocast dtype first, as ``torch.baddbmm``
    would be. A problem with a zero dimension runs the reference (there is nothing to launch).

    Args:
        x: ``[k, B, in]``, any strides (e.g. a transposed view).
        weight: ``[k, in, out]`` (e.g. the slice of a ``[T, in, out]`` parameter for the blocks in use).
        bias: ``[k, out]``.
        activation: ``"none"`` or ``"relu"``.
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.

    Returns:
        ``y [k, B, out]`` in the inputs' dtype.
    """
    x = check_tensor("x", x)
    check_floating("x", x)
    if x.dim() != 3:
        raise ValueError(f"x: expected shape [k, B, in] (one batch of inputs per block), got {list(x.shape)}")
    k, _, in_features = x.shape
    weight = check_tensor("weight", weight)
    if weight.dim() != 3 or tuple(weight.shape[:2]) != (k, in_features):
        raise ValueError(f"weight: expected shape [{k}, {in_features}, out] (k, in from x), got {list(weight.shape)}")
    bias = check_tensor("bias", bias)
    if tuple(bias.shape) != (k, weight.shape[2]):
        out_features = weight.shape[2]
        raise ValueError(f"bias: expected shape [{k}, {out_features}] (k from x, out from weight), got {list(bias.shape)}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        check_floating(name, tensor)
        if tensor.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (x's device), got one on {tensor.device}")
    check_choice("activation", activation, ACTIVATIONS)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (x's dtype), got {tensor.dtype}")
    chosen = _stacked_linear_backend(backend, x, weight, bias, activation)
    if x.numel() == 0 or weight.numel() == 0:
        chosen = "reference"
    return _run_stacked_linear(chosen, x, weight, bias, activation)
