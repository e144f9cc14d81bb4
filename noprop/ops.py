"""The public fused ops (the functional API); every backend choice goes through :mod:`noprop.backends`.

Five op families cover NoProp's training and inference:

* :func:`noised_latents`: ``z[t, i] = a[t, i] * W[y_i] + b[t, i] * eps[t, i]``;
* :func:`denoising_loss`: ``sum_{t,i} w[t, i] * ||readout(logits[t, i]) @ W - W[y_i] - c[t, i] eps[t, i]||^2 / B``;
* :func:`latent_update`: ``z_new = p * readout(logits) @ W + q * z + r * eps`` (inference steps, and
  the back-propagation baseline's recursion, which trains through it);
* :func:`stacked_linear`: T linear layers in one batched product, ``y[t] = x[t] @ W[t] + b[t]``
  (the fully connected layers of :class:`noprop.stack.BlockStack`);
* :func:`conv_epilogue`: the tail of a conv stage, ``y = dropout(relu(maxpool2(x)))``, with a
  counter-based dropout mask (a pure function of seed, block, row and element);

plus :func:`normal`, the noise they all draw (``eps`` is a pure function of the seed and the
element index, see :mod:`noprop.rng`).

Every op takes ``backend``: ``"auto"`` or the name of a registered backend (:func:`noprop.backends.names`;
built in: ``"reference"``, ``"triton"``, ``"extension"``). ``auto`` picks a fused backend on a CUDA
tensor when one can run it and the reference otherwise (``stacked_linear``: the faster of reference
and Triton, measured once per problem); ``NOPROP_BACKEND`` (all ops) and ``NOPROP_BACKEND_<OP>``
(one op) replace ``auto`` with a fixed choice. An explicit backend that cannot run an input, or
lacks the op, raises :class:`BackendUnavailableError` saying why. The registry
(:mod:`noprop.backends`) declares what each backend implements, its devices and dtypes.
Kernel backends run through ``torch.library`` custom ops (``noprop::*``, :mod:`noprop._custom_ops`),
so ``torch.compile(fullgraph=True)`` keeps them without graph breaks.
"""

from __future__ import annotations

from typing import Sequence

import torch

from noprop import autotune, backends, reference, rng
from noprop.backends import BackendStatus, BackendUnavailableError  # noqa: F401  (public names)
from noprop.validation import check_choice, check_floating, check_labels, check_tensor

READOUTS = reference.READOUTS
STACKED_LINEAR_ENV = "NOPROP_BACKEND_STACKED_LINEAR"  # replaces auto for stacked_linear alone
stacked_linear_choices = autotune.stacked_linear_choices
clear_stacked_linear_choices = autotune.clear_stacked_linear_choices


def available_backends() -> dict[str, BackendStatus]:
    """Every registered backend with the devices it can run on here and, if something is missing, why.

    Returns:
        ``{name: BackendStatus}`` for every name of :func:`noprop.backends.names`.
    """
    return backends.statuses()


def resolve_backend(op: str, backend: str, device: torch.device, dtypes: Sequence[torch.dtype] = ()) -> str:
    """The backend that runs ``op`` on this input: :func:`noprop.backends.resolve`."""
    return backends.resolve(op, backend, device, dtypes)


def _kernels(op: str, chosen: str):
    """The custom op of ``op`` (:mod:`noprop._custom_ops`) when ``chosen`` is a kernel backend, else None."""
    if backends.kind(chosen) == "autograd":
        return None
    from noprop import _custom_ops

    return getattr(_custom_ops, op)


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
    """A latent-update coefficient as a contiguous float32 ``[N]`` on ``device``: from a float, a 0-dim or ``[N]`` tensor.

    A tensor must live on ``device``, except a 0-dim CPU tensor, which is moved there.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((N,), float(value), dtype=torch.float32, device=device)
    value = check_tensor(name, value)
    check_floating(name, value)
    if value.device != device:
        if value.dim() != 0 or value.device.type != "cpu":
            raise ValueError(f"{name}: expected a tensor on {device} (z's device) or a 0-dim CPU tensor, got one on {value.device}")
        value = value.to(device)
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
        backend: ``"auto"`` or a registered backend (``"reference"``, ``"triton"``, ``"extension"``).

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
    chosen = backends.resolve("normal", backend, device)
    kernel = _kernels("normal", chosen)
    if kernel is None:
        return backends.implementation(chosen).normal(seed_tensor, shape, offset)
    return kernel(seed_tensor, list(shape), offset, chosen)


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
        backend: ``"auto"`` or a registered backend (``"reference"``, ``"triton"``, ``"extension"``).

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
    chosen = backends.resolve("noised_latents", backend, device, (W.dtype,))
    kernel = _kernels("noised_latents", chosen)
    if kernel is None:
        return backends.implementation(chosen).noised_latents(W, y, a, b, seed_tensor)
    return kernel(W.contiguous(), y, a, b, seed_tensor, chosen)


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
        backend: ``"auto"`` or a registered backend (``"reference"``, ``"triton"``, ``"extension"``).
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
    chosen = backends.resolve("denoising_loss", backend, device, (logits.dtype, W.dtype))
    kernel = _kernels("denoising_loss", chosen)
    if kernel is None:
        implementation = backends.implementation(chosen)
        loss, row_sq_error = implementation.denoising_loss(logits, W, y, weight, noise_coef, seed_tensor, readout)
    else:
        loss, row_sq_error = kernel(logits.contiguous(), W.contiguous(), y, weight, noise_coef, seed_tensor, readout, chosen)
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
        backend: ``"auto"`` or a registered backend (``"reference"``, ``"triton"``, ``"extension"``).

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
    chosen = backends.resolve("latent_update", backend, device, (logits.dtype, W.dtype, z.dtype))
    flat_logits, flat_z = logits.reshape(N, C), z.reshape(N, D)
    kernel = _kernels("latent_update", chosen)
    if kernel is None:
        implementation = backends.implementation(chosen)
        return implementation.latent_update(flat_logits, W, flat_z, p, q, r, seed_tensor, readout).reshape(z.shape)
    z_new = kernel(flat_logits.contiguous(), W.contiguous(), flat_z.contiguous(), p, q, r, seed_tensor, readout, chosen)
    return z_new.reshape(z.shape)


# ----------------------------------------------------------------------------------------------
# stacked_linear


def _run_stacked_linear(backend: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:func:`stacked_linear` on the resolved ``backend`` (no checks)."""
    kernel = _kernels("stacked_linear", backend)
    if kernel is None:
        return backends.implementation(backend).stacked_linear(x, weight, bias)
    return kernel(x, weight, bias, backend)


def stacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """T independent linear layers in one batched product: ``y[t] = x[t] @ weight[t] + bias[t]``.

    Differentiable in ``x``, ``weight`` and ``bias``: with ``g = dL/dy``,
    ``dx[t] = g[t] @ weight[t]^T``, ``dW[t] = x[t]^T @ g[t]``, ``db[t] = sum_i g[t, i]``.

    Backends (the registry's; ``extension`` declares that it has no GEMM):

    * ``"reference"``: ``torch.baddbmm`` (cuBLAS on CUDA tensors), any device and float dtype.
    * ``"triton"``: :mod:`noprop.kernels.stacked_linear`, the bias add fused into the GEMM; CUDA
      tensors in float32, bfloat16 or float16, CPU tensors in float32 through the interpreter.
    * ``"auto"``: the reference off CUDA. On CUDA, the faster of reference and Triton for this
      problem, measured on its first use (:mod:`noprop.autotune`; :func:`stacked_linear_choices`
      lists the choices). Nothing is measured while ``torch.compile`` traces or a CUDA graph is
      captured; a problem not measured yet runs the reference there, so run one eager step first.
      ``NOPROP_BACKEND_STACKED_LINEAR`` (or ``NOPROP_BACKEND`` naming a backend that has the op)
      replaces ``auto``.

    Inside ``torch.autocast`` the inputs are cast to the autocast dtype first, as ``torch.baddbmm``
    would be. A problem with a zero dimension runs the reference (there is nothing to launch).

    Args:
        x: ``[k, B, in]``, any strides (e.g. a transposed view).
        weight: ``[k, in, out]`` (e.g. the slice of a ``[T, in, out]`` parameter for the blocks in use).
        bias: ``[k, out]``.
        backend: ``"auto"`` or a registered backend that has the op (``"reference"``, ``"triton"``).

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
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (x's dtype), got {tensor.dtype}")
    chosen = backends.resolve("stacked_linear", backend, x.device, (x.dtype,))
    if x.numel() == 0 or weight.numel() == 0:
        chosen = "reference"
    elif chosen == "auto":
        chosen = autotune.choose_stacked_linear(_run_stacked_linear, x, weight, bias)
    return _run_stacked_linear(chosen, x, weight, bias)


# ----------------------------------------------------------------------------------------------
# conv_epilogue


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def conv_epilogue(
    x: torch.Tensor,
    *,
    pooled: bool,
    p: float = 0.0,
    seed: int | torch.Tensor | None = None,
    blocks: int = 1,
    block_offset: int = 0,
    row_offset: int = 0,
    stream: int = 0,
    contiguous_output: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """The tail of a conv stage in one op: ``y = dropout(relu(maxpool2(x)))``, or ``dropout(relu(x))``.

    ``x [B, blocks * C, H, W]`` holds the conv outputs of ``blocks`` blocks side by side (block ``j``'s
    channels are ``j * C .. (j + 1) * C``; one block: ``blocks = 1``). ``maxpool2`` is the 2x2,
    stride-2 max-pool (odd ``H``, ``W`` drop their last row, column). The dropout mask is the
    counter-based one of :func:`noprop.rng.dropout_keep`: element ``(c, h, w)`` of block
    ``block_offset + j`` for batch row ``row_offset + i`` is kept iff
    ``uniform(philox(seed, (e >> 2, row, block, stream))[e & 3]) >= p`` with ``e = (h W' + w) C + c``,
    and a kept value is scaled by ``1 / (1 - p)``. The mask depends on nothing else: a block draws the
    same one alone, inside a stack, in a chunk of blocks or on another rank, on every backend.

    Backward: ``grad_x`` is ``grad_y / (1 - p)`` routed to each window's argmax where ``y > 0`` (kept
    and positive), zero elsewhere. The kernel backends save only ``y`` (which the next layer keeps
    anyway) and, pooled, a one-byte argmax per output element, and never regenerate the mask:
    ``y > 0`` already says which elements were kept. PyTorch's composition saves the pre-pool input,
    int64 pool indices, the ReLU output and a mask (``tests/test_conv_epilogue.py`` counts the bytes).

    Args:
        x: ``[B, K, H, W]`` floating, contiguous or channels-last (anything else is made contiguous).
        pooled: apply the 2x2 max-pool first (needs ``H, W >= 2``).
        p: drop probability in ``[0, 1]``; 0 (eval mode) skips the mask.
        seed: int or int64 tensor with one element; required when ``p > 0``.
        blocks: the number of blocks whose channels ``x`` holds (``K`` divisible by it).
        block_offset, row_offset: the global index of the first block and of the first batch row.
        stream: the dropout site within a block (each conv stage of each path has its own).
        contiguous_output: return ``y`` in contiguous (NCHW) format even if ``x`` is channels-last.
        backend: ``"auto"`` (a CUDA tensor: the first fused backend that can run it; a CPU tensor:
            the extension's host loop where built, else the reference) or a registered backend.

    Returns:
        ``y [B, K, H // 2, W // 2]`` (pooled) or ``[B, K, H, W]``, in ``x``'s dtype.
    """
    x = check_tensor("x", x)
    check_floating("x", x)
    if x.dim() != 4:
        raise ValueError(f"x: expected conv outputs [B, K, H, W], got shape {list(x.shape)}")
    blocks = _check_count("blocks", blocks, 1)
    if x.shape[1] % blocks:
        raise ValueError(f"blocks: x has {x.shape[1]} channels, not divisible into {blocks} blocks")
    if pooled and (x.shape[2] < 2 or x.shape[3] < 2):
        raise ValueError(f"x: a 2x2 max-pool needs H, W >= 2, got {x.shape[2]}x{x.shape[3]}")
    for name, value in (("block_offset", block_offset), ("row_offset", row_offset), ("stream", stream)):
        _check_count(name, value, 0)
    if max(block_offset + blocks, row_offset + x.shape[0], stream + 1) > 2**32:
        raise ValueError("block_offset, row_offset, stream: block, row and stream indices must stay below 2**32")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"p: expected a drop probability in [0, 1], got {p!r}")
    p = float(p)
    if p > 0 and seed is None:
        raise ValueError("seed: required when p > 0 (it selects the dropout mask)")
    # without dropout the seed is never read: a device zero (no host copy, so CUDA graphs can capture it)
    seed_tensor = torch.zeros(1, dtype=torch.int64, device=x.device) if seed is None else rng.as_seed_tensor(seed, x.device)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    chosen = backends.resolve("conv_epilogue", backend, x.device, (x.dtype,))
    args = (p, bool(pooled), blocks, block_offset, row_offset, stream, bool(contiguous_output))
    kernel = _kernels("conv_epilogue", chosen)
    if kernel is None:
        return backends.implementation(chosen).conv_epilogue(x, seed_tensor, *args)
    y, _ = kernel(x, seed_tensor, *args, chosen)
    return y
