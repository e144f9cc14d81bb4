"""The declared backends of the fused ops: what each implements, where it runs, and why not.

One registry, read by everything that chooses or reports a backend: :func:`resolve` (the only
place that picks one), :mod:`noprop.ops` (dispatch), ``noprop info``, the error messages, the
tests (parametrised over :func:`names`) and the benchmarks. A backend is a :class:`Backend`:

* ``name``, a one-line ``summary``;
* ``kind``: ``"autograd"`` (its functions follow :class:`AutogradImplementation` and are
  differentiated by autograd, like :mod:`noprop.reference`) or ``"kernels"`` (forward and backward
  functions following :class:`KernelImplementation`, wired into autograd and ``torch.compile`` by
  the ``noprop::*`` custom ops of :mod:`noprop._custom_ops`);
* ``dtypes``: device type -> the dtypes it supports there (its declaration, true on any machine);
* ``lacks``: op -> why it does not implement that op (every other op of :data:`OPS` it does);
* ``load()``: imports the implementation module (may raise: the backend is then unavailable);
* ``probe()``: device type -> ``""`` where it can run on this machine, else why not.

Built in: ``reference`` (plain PyTorch, :mod:`noprop.reference`), ``triton`` (:mod:`noprop.kernels`;
CPU tensors through Triton's interpreter) and ``extension`` (the C++/CUDA extension ``noprop._C``
through :mod:`noprop._ext`: CUDA kernels on CUDA tensors, the same per-element code as host loops
on CPU tensors). ``"cuda"``, the extension's former name, still works for one release with a
:class:`DeprecationWarning` (as an argument, in ``NOPROP_BACKEND`` and on the command line).

A new backend is one module implementing the protocol plus one :func:`register` call.

``backend="auto"`` (:func:`resolve`): ``NOPROP_BACKEND_<OP>`` (e.g. ``NOPROP_BACKEND_STACKED_LINEAR``)
and then ``NOPROP_BACKEND`` replace it with a fixed choice (``NOPROP_BACKEND`` only for the ops
that backend implements). Otherwise a CUDA tensor gets the first backend of :data:`AUTO_ORDER`
that implements the op and can run the input, anything else the reference; the exceptions:
``stacked_linear`` on CUDA, whose ``auto`` is measured (:mod:`noprop.autotune`), and the ops of
:data:`CPU_AUTO_ORDER` (``conv_epilogue``), whose ``auto`` on a CPU tensor takes the extension's host
loop when it can run the input.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Mapping, Optional, Protocol, Sequence

import torch
from torch import Tensor

from noprop.validation import check_choice

OPS = ("normal", "noised_latents", "denoising_loss", "latent_update", "stacked_linear", "conv_epilogue")
ENV = "NOPROP_BACKEND"  # replaces ``auto`` for every op the named backend implements
DEPRECATED_NAMES = {"cuda": "extension"}  # old name -> new name, accepted until 0.2 with a warning
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FUSED_DTYPES = {"cpu": (torch.float32,), "cuda": (torch.float32, torch.float16, torch.bfloat16)}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the given input (the message says why)."""


# ---------------------------------------------------------------------------------------------- the protocol


class AutogradImplementation(Protocol):
    """A ``kind="autograd"`` backend's module: one differentiable function per op.

    Inputs arrive normalised by :mod:`noprop.ops`: coefficients expanded to float32 ``[T, B]`` or
    ``[N]``, seeds as int64 ``[1]`` tensors on the data's device, labels int64 ``[B]``. Gradients
    come from autograd. :mod:`noprop.reference` is the model.
    """

    def normal(self, seed: Tensor, shape: tuple[int, ...], offset: int) -> Tensor: ...
    def noised_latents(self, W: Tensor, y: Tensor, a: Tensor, b: Tensor, seed: Tensor) -> Tensor: ...
    def denoising_loss(
        self, logits: Tensor, W: Tensor, y: Tensor, weight: Tensor, noise_coef: Optional[Tensor],
        seed: Optional[Tensor], readout: str,
    ) -> tuple[Tensor, Tensor]: ...
    def latent_update(
        self, logits: Tensor, W: Tensor, z: Tensor, p: Tensor, q: Tensor, r: Tensor, seed: Tensor, readout: str
    ) -> Tensor: ...
    def stacked_linear(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor: ...
    def conv_epilogue(
        self, x: Tensor, seed: Tensor, p: float, pooled: bool, blocks: int, block_offset: int, row_offset: int,
        stream: int, contiguous_output: bool,
    ) -> Tensor: ...


class KernelImplementation(Protocol):
    """A ``kind="kernels"`` backend's module: a forward and a backward function per op it implements.

    Inputs are normalised as for :class:`AutogradImplementation` and contiguous (the
    ``stacked_linear`` ones excepted, which may have any strides). ``readout`` is ``"softmax"`` or
    ``"linear"``; ``needs_*`` flags say which gradients to compute, and one that is not needed may
    come back as an empty tensor. :mod:`noprop.kernels` (Triton) and :mod:`noprop._ext` (the C++/CUDA
    extension) implement it; a backend that lacks an op leaves its functions out and declares why
    in :attr:`Backend.lacks`.

    Returns: ``normal`` float32 ``shape``; ``noised_latents_forward`` ``z [T, B, D]``;
    ``noised_latents_backward`` ``(gW [C, D], ga [T, B], gb [T, B])``; ``denoising_loss_forward``
    ``(loss [], row_sq_error [T, B])``; ``denoising_loss_backward`` ``(glogits [T, B, C], gW [C, D])``;
    ``latent_update_forward`` ``z_new [N, D]``; ``latent_update_backward`` ``(glogits [N, C], gW [C, D],
    gz [N, D], gp [N], gq [N], gr [N])``; ``stacked_linear_forward`` ``y [T, B, O]``;
    ``stacked_linear_backward`` ``(dx [T, B, I], dW [T, I, O], db [T, O])``;
    ``conv_epilogue_forward`` ``(y [B, K, H', W'], argmax uint8 [B, K, H', W'] (pooled) or empty)`` for
    ``x [B, K, H, W]`` contiguous or channels-last (``y`` in ``x``'s memory format unless
    ``contiguous_output``); ``conv_epilogue_backward`` ``grad_x [B, K, H, W]`` in ``x``'s memory format
    (``channels_last``), from ``grad_y`` of any strides and the saved ``y`` and ``argmax``.
    """

    def normal(self, seed: Tensor, shape: tuple[int, ...], offset: int) -> Tensor: ...
    def noised_latents_forward(self, W: Tensor, y: Tensor, a: Tensor, b: Tensor, seed: Tensor) -> Tensor: ...
    def noised_latents_backward(
        self, grad_z: Tensor, W: Tensor, y: Tensor, a: Tensor, b: Tensor, seed: Tensor,
        needs_W: bool, needs_a: bool, needs_b: bool,
    ) -> tuple[Tensor, Tensor, Tensor]: ...
    def denoising_loss_forward(
        self, logits: Tensor, W: Tensor, y: Tensor, weight: Tensor, noise_coef: Optional[Tensor],
        seed: Optional[Tensor], readout: str,
    ) -> tuple[Tensor, Tensor]: ...
    def denoising_loss_backward(
        self, grad_loss: Tensor, logits: Tensor, W: Tensor, y: Tensor, weight: Tensor,
        noise_coef: Optional[Tensor], seed: Optional[Tensor], readout: str, needs_W: bool,
    ) -> tuple[Tensor, Tensor]: ...
    def latent_update_forward(
        self, logits: Tensor, W: Tensor, z: Tensor, p: Tensor, q: Tensor, r: Tensor, seed: Tensor, readout: str
    ) -> Tensor: ...
    def latent_update_backward(
        self, grad: Tensor, logits: Tensor, W: Tensor, z: Tensor, p: Tensor, q: Tensor, r: Tensor, seed: Tensor,
        readout: str, needs_logits: bool, needs_W: bool, needs_z: bool, needs_p: bool, needs_q: bool, needs_r: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]: ...
    def stacked_linear_forward(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor: ...
    def stacked_linear_backward(
        self, grad_y: Tensor, x: Tensor, weight: Tensor, needs_input: bool, needs_params: bool
    ) -> tuple[Tensor, Tensor, Tensor]: ...
    def conv_epilogue_forward(
        self, x: Tensor, seed: Tensor, p: float, pooled: bool, blocks: int, block_offset: int, row_offset: int,
        stream: int, contiguous_output: bool,
    ) -> tuple[Tensor, Tensor]: ...
    def conv_epilogue_backward(
        self, grad_y: Tensor, y: Tensor, argmax: Tensor, p: float, pooled: bool, height: int, width: int,
        channels_last: bool,
    ) -> Tensor: ...


@dataclass(frozen=True)
class Backend:
    """One backend's declaration (see the module docstring for every field)."""

    name: str
    kind: str
    summary: str
    load: Callable[[], ModuleType]
    probe: Callable[[], Mapping[str, str]]
    dtypes: Mapping[str, tuple[torch.dtype, ...]]
    lacks: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, ("autograd", "kernels"))
        unknown = set(self.lacks) - set(OPS)
        if unknown:
            raise ValueError(f"lacks: unknown op(s) {sorted(unknown)}; expected some of {OPS}")

    @property
    def ops(self) -> tuple[str, ...]:
        """The ops it implements."""
        return tuple(op for op in OPS if op not in self.lacks)


@dataclass(frozen=True)
class BackendStatus:
    """What a backend can run on this machine.

    Attributes:
        name: the backend's name.
        devices: device types (``"cpu"``, ``"cuda"``) it can run on here; empty if none.
        reason: why it cannot run on a device type it declares (or at all); empty if nothing is missing.
        ops: the ops it implements; lacks: op -> why it does not implement it.
        dtypes: device type -> supported dtypes (declared, whether or not the device is here).
        why_not: device type -> why it cannot run there here (only the declared devices it cannot run on).
    """

    name: str
    devices: tuple[str, ...]
    reason: str
    ops: tuple[str, ...] = OPS
    lacks: Mapping[str, str] = field(default_factory=dict)
    dtypes: Mapping[str, tuple[torch.dtype, ...]] = field(default_factory=dict)
    why_not: Mapping[str, str] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        """True if the backend can run on at least one device here."""
        return bool(self.devices)


# ---------------------------------------------------------------------------------------------- built-in backends


def _load_reference() -> ModuleType:
    from noprop import reference

    return reference


def _reference_probe() -> dict[str, str]:
    return {"cpu": "", "cuda": "" if torch.cuda.is_available() else "no CUDA device"}


def _load_triton() -> ModuleType:
    from noprop import kernels

    return kernels


def _triton_probe() -> dict[str, str]:
    kernels = _load_triton()
    return {
        "cuda": "" if torch.cuda.is_available() else "no CUDA device",
        "cpu": "" if kernels.INTERPRETER else "CPU tensors need TRITON_INTERPRET=1 set before importing noprop",
    }


def _load_extension() -> ModuleType:
    from noprop import _ext

    _ext.ops()  # raises if noprop._C is not built
    return _ext


def _extension_probe() -> dict[str, str]:
    from noprop import _ext

    _load_extension()
    if not _ext.has_cuda_kernels():
        cuda = "the extension was built without CUDA kernels (no nvcc or NOPROP_SKIP_CUDA=1)"
    else:
        cuda = "" if torch.cuda.is_available() else "no CUDA device"
    return {"cpu": "", "cuda": cuda}


BUILTIN = (
    Backend("reference", "autograd", "plain PyTorch (noprop.reference): the fallback and the test oracle",
            _load_reference, _reference_probe, {"cpu": FLOATS, "cuda": FLOATS}),
    Backend("triton", "kernels", "Triton kernels (noprop.kernels); CPU tensors through TRITON_INTERPRET=1",
            _load_triton, _triton_probe, FUSED_DTYPES),
    Backend("extension", "kernels", "C++/CUDA extension noprop._C (csrc/): CUDA kernels and the same code as host loops",
            _load_extension, _extension_probe, FUSED_DTYPES,
            lacks={"stacked_linear": "the C++/CUDA extension has no GEMM; use 'reference' (torch.baddbmm, cuBLAS "
                                     "on CUDA tensors), 'triton', or 'auto' (the faster of the two)"}),
)
AUTO_ORDER = ("extension", "triton")  # the fused backends ``auto`` tries on a CUDA tensor, in this order
# ops whose ``auto`` tries these backends on a CPU tensor before the reference: the conv epilogue's
# reference draws its dropout mask with int64 tensor arithmetic (tens of times slower than a host loop)
CPU_AUTO_ORDER = {"conv_epilogue": ("extension",)}

_REGISTRY: dict[str, Backend] = {backend.name: backend for backend in BUILTIN}


# ---------------------------------------------------------------------------------------------- the registry


def register(backend: Backend) -> Backend:
    """Add ``backend`` to the registry (after the built-in ones); returns it. A name is registered once."""
    if backend.name in _REGISTRY or backend.name in DEPRECATED_NAMES or backend.name == "auto":
        raise ValueError(f"backend: the name {backend.name!r} is taken")
    _REGISTRY[backend.name] = backend
    statuses.cache_clear()
    return backend


def unregister(name: str) -> None:
    """Remove a backend added by :func:`register` (the built-in ones stay)."""
    if name in {b.name for b in BUILTIN}:
        raise ValueError(f"backend: {name!r} is built in and cannot be removed")
    _REGISTRY.pop(name, None)
    _LOADED.pop(name, None)
    statuses.cache_clear()


def names() -> tuple[str, ...]:
    """Every registered backend's name, the reference first."""
    return tuple(_REGISTRY)


def implementing(op: str) -> tuple[str, ...]:
    """The registered backends that implement ``op``."""
    check_choice("op", op, OPS)
    return tuple(name for name, backend in _REGISTRY.items() if op not in backend.lacks)


def get(name: str) -> Backend:
    """The declaration of backend ``name`` (a deprecated name is translated, with a warning)."""
    return _REGISTRY[canonical(name)]


def canonical(name: str, argument: str = "backend", allow_auto: bool = False) -> str:
    """``name`` checked against the registry; a deprecated name becomes its new one with a DeprecationWarning.

    Raises:
        ValueError: an unknown name, the message naming ``argument`` and the choices.
    """
    if name in DEPRECATED_NAMES:
        new = DEPRECATED_NAMES[name]
        warnings.warn(
            f"{argument}: the backend name {name!r} is deprecated and will be removed in noprop 0.2; use {new!r} "
            "(the C++/CUDA extension, which also runs on CPU tensors)",
            DeprecationWarning,
            stacklevel=3,
        )
        return new
    return check_choice(argument, name, (("auto",) if allow_auto else ()) + names())


_LOADED: dict[str, ModuleType] = {}  # implementation modules loaded by the probes (read while torch.compile traces)


def implementation(name: str) -> ModuleType:
    """The implementation module of backend ``name`` (it must be available)."""
    module = _LOADED.get(name)
    return module if module is not None else get(name).load()


def kind(name: str) -> str:
    """``"autograd"`` or ``"kernels"``: how :mod:`noprop.ops` calls backend ``name`` (a registered name)."""
    return _REGISTRY[name].kind


@functools.lru_cache(maxsize=None)
def statuses() -> dict[str, BackendStatus]:
    """Every backend with the devices it can run on here and, if something is missing, why (cached)."""
    result = {}
    for name, backend in _REGISTRY.items():
        try:
            probe = dict(backend.probe())
            _LOADED[name] = backend.load()
        except Exception as error:  # an ImportError, triton failing to initialise, the extension not built
            probe = {device: f"cannot load it: {error}" for device in backend.dtypes}
        devices = tuple(d for d in backend.dtypes if not probe.get(d, "not probed"))
        why_not = {d: probe.get(d) or "not probed" for d in backend.dtypes if d not in devices}
        reason = "; ".join(f"{d}: {why}" for d, why in why_not.items())
        result[name] = BackendStatus(name, devices, reason, backend.ops, dict(backend.lacks), dict(backend.dtypes), why_not)
    return result


def dtype_name(dtype: torch.dtype) -> str:
    """``"float32"`` for ``torch.float32``."""
    return str(dtype).replace("torch.", "")


# A constant for torch.compile: evaluated while tracing, never traced into (the probes, such as the
# extension's compiled_with_cuda, are opaque to dynamo and would break the graph).
@torch.compiler.assume_constant_result
def cannot_run(name: str, op: str, device: torch.device, dtypes: Sequence[torch.dtype]) -> str:
    """Why backend ``name`` cannot run ``op`` on tensors of ``dtypes`` on ``device``; empty if it can."""
    backend, status = _REGISTRY[name], statuses()[name]
    if op in backend.lacks:
        return f"backend {name!r} has no {op}: {backend.lacks[op]}"
    if device.type not in status.devices:
        why = status.why_not.get(device.type, "the backend does not declare this device type")
        return f"it cannot run on {device.type} tensors here: {why}"
    allowed = backend.dtypes[device.type]
    for dtype in dtypes:
        if dtype not in allowed:
            supported = ", ".join(dtype_name(d) for d in allowed)
            return f"it supports {supported} on {device.type}, got {dtype_name(dtype)}"
    return ""


def _override(op: str) -> str:
    """The backend the environment puts in place of ``auto`` for ``op``, or ``""``."""
    per_op = f"{ENV}_{op.upper()}"
    value = os.environ.get(per_op, "").strip()
    if value and value != "auto":
        value = canonical(value, per_op)
        if op in _REGISTRY[value].lacks:
            raise ValueError(f"{per_op}: backend {value!r} has no {op}: {_REGISTRY[value].lacks[op]}")
        return value
    value = os.environ.get(ENV, "").strip()
    if value and value != "auto":
        value = canonical(value, ENV)
        if op not in _REGISTRY[value].lacks:
            return value
    return ""


def resolve(op: str, backend: str, device: torch.device, dtypes: Sequence[torch.dtype] = ()) -> str:
    """Turn ``backend`` (``"auto"`` or a name) into the backend that runs ``op`` on this input.

    ``auto`` follows the rules of the module docstring; for ``stacked_linear`` on CUDA it returns
    ``"auto"`` itself when nothing overrides it, and :mod:`noprop.ops` measures.

    Raises:
        ValueError: an unknown backend name (argument or environment variable).
        BackendUnavailableError: the chosen backend lacks ``op`` or cannot run this device or dtype here.
    """
    backend = canonical(backend, allow_auto=True)
    if backend == "auto":
        backend = _override(op)
        if not backend:
            if device.type != "cuda":
                for candidate in CPU_AUTO_ORDER.get(op, ()):
                    if candidate in _REGISTRY and not cannot_run(candidate, op, device, dtypes):
                        return candidate
                return "reference"
            if op == "stacked_linear":
                return "auto"
            for candidate in AUTO_ORDER:
                if candidate in _REGISTRY and not cannot_run(candidate, op, device, dtypes):
                    return candidate
            return "reference"
    why = cannot_run(backend, op, device, dtypes)
    if why:
        raise BackendUnavailableError(f"backend {backend!r} cannot run this input: {why}")
    return backend


def for_op(backend: str, op: str) -> str:
    """The backend a model set to ``backend`` runs ``op`` on: ``backend`` itself, or the reference where it lacks ``op``."""
    backend = canonical(backend, allow_auto=True)
    if backend != "auto" and op in _REGISTRY[backend].lacks:
        return "reference"
    return backend
