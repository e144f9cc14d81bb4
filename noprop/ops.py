"""Public fused ops and the one place that chooses a backend.

Three op families cover NoProp's training and inference (DESIGN section 3):

* :func:`noised_latents`: ``z[t, i] = a[t, i] * W[y_i] + b[t, i] * eps[t, i]``;
* :func:`denoising_loss`: ``sum_{t,i} w[t, i] * ||readout(logits[t, i]) @ W - W[y_i] - c[t, i] eps[t, i]||^2 / B``;
* :func:`latent_update`: ``z_new = p * readout(logits) @ W + q * z + r * eps``;

plus :func:`normal`, the noise they all draw (``eps`` is a pure function of the seed and the
element index, see :mod:`noprop.rng`).

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
from dataclasses import dataclass
from typing import Sequence

import torch

from noprop import reference, rng
from noprop.validation import check_choice, check_floating, check_labels, check_tensor

BACKENDS = ("reference", "triton", "cuda")
FUSED_BACKENDS = ("cuda", "triton")  # the order ``auto`` tries them in on a CUDA tensor
READOUTS = reference.READOUTS
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
    """One inference step on the latent: ``z_new = p * readout(logits) @ W + q * z + r * eps``.

    DT's Eq. 3 is ``p, q, r = a_t, b_t, sqrt(c_t)``; an Euler step of an ODE
    ``dz/dt = P u_hat + Q z`` is ``p, q, r = h P, 1 + h Q, 0``. ``eps = normal(seed, z.shape)``.
    An inference op: the fused backends compute no gradients (use ``backend="reference"`` for them).

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
    if torch.is_grad_enabled() and any(t.requires_grad for t in (logits, W, z, p, q, r)):
        raise ValueError(
            f"latent_update: backend {chosen!r} is inference-only and computes no gradients; "
            "run it under torch.no_grad() or use backend='reference'"
        )
    from noprop import _custom_ops

    z_new = _custom_ops.latent_update(
        flat_logits.contiguous(), W.contiguous(), flat_z.contiguous(), p, q, r, seed_tensor, readout, chosen
    )
    return z_new.reshape(z.shape)
