"""What the fused-op microbenchmarks measure: shapes, op cases, their inputs, and the bytes they must move.

The one definition shared by the script :mod:`bench.ops` and the pytest-benchmark file
``bench/test_bench_ops.py``.

Op cases (float32, every input created once, outside any timed region):

=======================  ======  ===============================================================
case                     passes  call
=======================  ======  ===============================================================
``normal``               fwd     ``normal(seed, (T, B, D))``
``noised_latents``       fwd,    ``noised_latents(W, y, a, b, seed)`` with per-example ``a, b [T, B]``;
                         bwd     bwd = ``autograd.grad`` for ``W, a, b``
``denoising_loss[DT]``   fwd,    ``denoising_loss(logits, W, y, weight)``: softmax readout, no target
                         bwd     noise, per-block ``weight [T]``; bwd = grads for ``logits, W, weight``
``denoising_loss[FM]``   fwd,    ``denoising_loss(..., readout="linear", noise_coef=-1 [T], seed)``;
                         bwd     bwd = grads for ``logits, W, weight``
``latent_update``        fwd     one DT inference step on ``z [B, D]``: ``latent_update(logits [B, C],
                                 W, z, p, q, r, seed)``, 0-dim ``p, q, r``, under ``torch.no_grad()``
``latent_update[BP]``    fwd,    one step of the back-propagation baseline on ``z [B, D]``:
                         bwd     ``latent_update(logits [B, C], W, z, alpha, 1 - alpha, 0, seed)``, 0-dim
                                 ``alpha``; bwd = grads for ``logits, W, z, alpha``
``stacked_linear``       fwd,    ``stacked_linear(x [T, B, D], weight [T, D, H], bias [T, H])`` with
                         bwd     ``H = 256`` (T fully connected layers of BlockStack); bwd = grads for
                                 ``x, weight, bias``. Measured, not judged by the criteria: its
                                 reference is cuBLAS, and ``auto`` picks the faster of the two
``conv_epilogue``        fwd,    the first conv stage's tail of T blocks: ``conv_epilogue(x [B', 32 T,
                         bwd     28, 28] channels-last, pooled, p = 0.2, seed, blocks=T)`` with
                                 ``B' = min(B, 256)`` (the large shape would need 65 GB); bwd = grad for ``x``
=======================  ======  ===============================================================

A backend that lacks an op (the registry's ``lacks``, e.g. the extension's ``stacked_linear``) is
not timed on that op's cases.

Inputs that training differentiates have ``requires_grad`` set, so the forward pass records the
autograd graph as training does. A backward callable runs ``torch.autograd.grad`` with
``retain_graph=True`` on a graph built once beforehand, so it times the backward pass alone.

Bytes moved (:meth:`OpCase.bytes_moved`): what the op must read and write at least, with float32
= 4 bytes and int64 (labels ``y``, seed) = 8 bytes. Inputs count at the shape the caller passes
(a per-block ``[T]`` coefficient is ``T`` floats), ``W`` counts once whole (``C * D``), and the
noise ``eps`` counts nothing: it is regenerated from the seed, never stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from noprop import backends, ops

F32 = 4  # bytes of a float32
I64 = 8  # bytes of an int64 (labels, seed)
PASSES = ("fwd", "bwd")
SEED = 20250331
STACKED_LINEAR_OUT = 256  # H: output features of the stacked_linear case (the paper block's hidden width)
EPILOGUE_CHANNELS, EPILOGUE_SIZE, EPILOGUE_MAX_BATCH = 32, 28, 256  # the first conv stage of an MNIST block


@dataclass(frozen=True)
class Shape:
    """One problem size: T blocks, batch B, C classes, embedding dimension D."""

    name: str
    T: int
    B: int
    C: int
    D: int
    note: str = ""

    @property
    def dims(self) -> str:
        """``"T=10 B=128 C=10 D=784"``."""
        return f"T={self.T} B={self.B} C={self.C} D={self.D}"


PAPER_BATCH = 128  # the paper's batch size: launch-bound sizes, where the GPU speedup criterion applies
LARGE_BATCH = 65536  # bandwidth-bound size, where the GPU bandwidth-floor criterion applies

SHAPES = (
    Shape("onehot", 10, PAPER_BATCH, 10, 10, "paper, one-hot embedding (MNIST, CIFAR-10)"),
    Shape("learned", 10, PAPER_BATCH, 10, 20, "paper, learned embedding"),
    Shape("mnist-proto", 10, PAPER_BATCH, 10, 784, "paper, MNIST prototype embedding"),
    Shape("cifar100-proto", 10, PAPER_BATCH, 100, 3072, "paper, CIFAR-100 prototype embedding"),
    Shape("cifar100-learned", 10, PAPER_BATCH, 100, 20, "paper, CIFAR-100 learned embedding"),
    Shape("large", 10, LARGE_BATCH, 10, 20, "large batch, bandwidth-bound"),
)
QUICK_SHAPES = ("learned", "mnist-proto")  # mnist-proto carries the CPU acceptance criterion
CPU_CRITERION_SHAPE = "mnist-proto"


def shapes_named(names: Sequence[str]) -> tuple[Shape, ...]:
    """The shapes of :data:`SHAPES` with these names, in the order given."""
    by_name = {shape.name: shape for shape in SHAPES}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ValueError(f"shapes: unknown name(s) {unknown}; expected some of {list(by_name)}")
    return tuple(by_name[name] for name in names)


# ---------------------------------------------------------------------------------------------- inputs


def _random(shape: Shape, device: torch.device) -> dict[str, torch.Tensor]:
    """Deterministic float32 inputs of every case on ``device`` (drawn on the CPU, then moved)."""
    g = torch.Generator().manual_seed(0)
    T, B, C, D = shape.T, shape.B, shape.C, shape.D
    tensors = dict(
        W=torch.randn(C, D, generator=g),
        y=torch.randint(0, C, (B,), generator=g),
        a=torch.rand(T, B, generator=g),
        b=torch.rand(T, B, generator=g),
        logits=3 * torch.randn(T, B, C, generator=g),
        weight=torch.rand(T, generator=g),
        step_logits=3 * torch.randn(B, C, generator=g),
        z=torch.randn(B, D, generator=g),
        pqr=torch.rand(3, generator=g),
        x=torch.randn(T, B, D, generator=g),
        linear_weight=torch.randn(T, D, STACKED_LINEAR_OUT, generator=g) / D**0.5,
        linear_bias=torch.randn(T, STACKED_LINEAR_OUT, generator=g),
        seed=torch.tensor([SEED], dtype=torch.int64),
    )
    return {name: tensor.to(device) for name, tensor in tensors.items()}


def _grad_leaves(inputs: dict[str, torch.Tensor], names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    return tuple(inputs[name].requires_grad_() for name in names)


# An op case's setup: (shape, backend, device) -> (forward callable, the tensors its backward differentiates).
Setup = Callable[[Shape, str, torch.device], tuple]


def _normal_setup(shape: Shape, backend: str, device: torch.device):
    seed = torch.tensor([SEED], dtype=torch.int64, device=device)
    size = (shape.T, shape.B, shape.D)
    return (lambda: ops.normal(seed, size, backend=backend)), ()


def _noised_latents_setup(shape: Shape, backend: str, device: torch.device):
    x = _random(shape, device)
    W, a, b = _grad_leaves(x, ("W", "a", "b"))
    return (lambda: ops.noised_latents(W, x["y"], a, b, x["seed"], backend=backend)), (W, a, b)


def _loss_dt_setup(shape: Shape, backend: str, device: torch.device):
    x = _random(shape, device)
    logits, W, weight = _grad_leaves(x, ("logits", "W", "weight"))
    return (lambda: ops.denoising_loss(logits, W, x["y"], weight, backend=backend)), (logits, W, weight)


def _loss_fm_setup(shape: Shape, backend: str, device: torch.device):
    x = _random(shape, device)
    logits, W, weight = _grad_leaves(x, ("logits", "W", "weight"))
    noise_coef = -torch.ones(shape.T, device=device)

    def forward():
        return ops.denoising_loss(
            logits, W, x["y"], weight, readout="linear", noise_coef=noise_coef, seed=x["seed"], backend=backend
        )

    return forward, (logits, W, weight)


def _latent_update_setup(shape: Shape, backend: str, device: torch.device):
    x = _random(shape, device)
    p, q, r = x["pqr"].unbind()

    def forward():
        with torch.no_grad():
            return ops.latent_update(x["step_logits"], x["W"], x["z"], p, q, r, x["seed"], backend=backend)

    return forward, ()


def _latent_update_bp_setup(shape: Shape, backend: str, device: torch.device):
    x = _random(shape, device)
    logits, W, z = _grad_leaves(x, ("step_logits", "W", "z"))
    alpha = x["pqr"][0].clone().requires_grad_()

    def forward():
        return ops.latent_update(logits, W, z, alpha, 1 - alpha, 0.0, x["seed"], backend=backend)

    return forward, (logits, W, z, alpha)


def _stacked_linear_setup(shape: Shape, backend: str, device: torch.device):
    x = _random(shape, device)
    leaves = _grad_leaves(x, ("x", "linear_weight", "linear_bias"))
    return (lambda: ops.stacked_linear(*leaves, backend=backend)), leaves


def _epilogue_shape(s: Shape) -> tuple[int, int, int, int]:
    return (min(s.B, EPILOGUE_MAX_BATCH), EPILOGUE_CHANNELS * s.T, EPILOGUE_SIZE, EPILOGUE_SIZE)


def _conv_epilogue_setup(shape: Shape, backend: str, device: torch.device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(_epilogue_shape(shape), generator=g).to(device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    seed = torch.tensor([SEED], dtype=torch.int64, device=device)
    return (lambda: ops.conv_epilogue(x, pooled=True, p=0.2, seed=seed, blocks=shape.T, backend=backend)), (x,)


# ---------------------------------------------------------------------------------------------- bytes


def _normal_bytes(s: Shape) -> dict[str, int]:
    """fwd: write ``eps [T, B, D]``; read the seed."""
    return {"fwd": F32 * s.T * s.B * s.D + I64}


def _noised_latents_bytes(s: Shape) -> dict[str, int]:
    """fwd: read ``W, y, a, b, seed``, write ``z``.
    bwd: read ``grad_z, W, y, a, seed`` (``b`` is not needed), write ``gW, ga, gb``."""
    TB, TBD, CD = s.T * s.B, s.T * s.B * s.D, s.C * s.D
    return {
        "fwd": F32 * (CD + 2 * TB + TBD) + I64 * (s.B + 1),
        "bwd": F32 * (TBD + CD + TB) + I64 * (s.B + 1) + F32 * (CD + 2 * TB),
    }


def _loss_bytes(s: Shape, noise: bool) -> dict[str, int]:
    """fwd: read ``logits, W, y, weight [T]`` (+ ``noise_coef [T], seed``), write ``loss, row_sq_error [T, B]``.
    bwd: read ``grad_loss, logits, W, y, weight, row_sq_error`` (+ ``noise_coef, seed``), write
    ``glogits, gW, gweight [T]``."""
    TB, TBC, CD = s.T * s.B, s.T * s.B * s.C, s.C * s.D
    extra = F32 * s.T + I64 if noise else 0
    return {
        "fwd": F32 * (TBC + CD + s.T) + I64 * s.B + extra + F32 * (1 + TB),
        "bwd": F32 * (1 + TBC + CD + s.T + TB) + I64 * s.B + extra + F32 * (TBC + CD + s.T),
    }


def _latent_update_bytes(s: Shape) -> dict[str, int]:
    """fwd (one step on B rows): read ``logits [B, C], W, z [B, D], p, q, r, seed``, write ``z_new [B, D]``."""
    return {"fwd": F32 * (s.B * s.C + s.C * s.D + s.B * s.D + 3 + s.B * s.D) + I64}


def _latent_update_bp_bytes(s: Shape) -> dict[str, int]:
    """fwd (one step on B rows, no noise): read ``logits [B, C], W, z [B, D], alpha``, write ``z_new [B, D]``.
    bwd: read ``grad_z_new [B, D], logits, W, z, alpha``, write ``glogits [B, C], gW, gz [B, D], galpha``."""
    BC, CD, BD = s.B * s.C, s.C * s.D, s.B * s.D
    return {"fwd": F32 * (BC + CD + BD + 1 + BD), "bwd": F32 * (BD + BC + CD + BD + 1) + F32 * (BC + CD + BD + 1)}


def _stacked_linear_bytes(s: Shape) -> dict[str, int]:
    """fwd: read ``x [T, B, D], weight [T, D, H], bias [T, H]``, write ``y [T, B, H]``.
    bwd: read ``grad_y [T, B, H], x, weight``, write ``dx, dweight, dbias``."""
    H = STACKED_LINEAR_OUT
    x, w, b, y = s.T * s.B * s.D, s.T * s.D * H, s.T * H, s.T * s.B * H
    return {"fwd": F32 * (x + w + b + y), "bwd": F32 * (y + x + w) + F32 * (x + w + b)}


def _conv_epilogue_bytes(s: Shape) -> dict[str, int]:
    """fwd: read ``x`` (N floats), write ``y`` (N / 4 floats) and the argmax (N / 4 bytes).
    bwd: read ``grad_y``, ``y`` and the argmax, write ``grad_x`` (N floats)."""
    B, K, H, W = _epilogue_shape(s)
    n_in, n_out = B * K * H * W, B * K * (H // 2) * (W // 2)
    return {"fwd": F32 * (n_in + n_out) + n_out + I64, "bwd": F32 * (2 * n_out + n_in) + n_out}


# ---------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class OpCase:
    """One benchmarked op configuration: its passes, how to set it up, and the bytes it must move."""

    name: str
    op: str
    config: str
    passes: tuple[str, ...]
    setup: Setup
    byte_counts: Callable[[Shape], dict[str, int]]
    judged: bool = True  # whether the acceptance criteria (bench/ops_criteria.py) apply to it

    def bytes_moved(self, shape: Shape, pass_: str) -> int:
        """Bytes the op must read and write at least in ``pass_`` (see the module docstring)."""
        return self.byte_counts(shape)[pass_]


CASES = (
    OpCase("normal", "normal", "", ("fwd",), _normal_setup, _normal_bytes),
    OpCase("noised_latents", "noised_latents", "", PASSES, _noised_latents_setup, _noised_latents_bytes),
    OpCase("denoising_loss[DT]", "denoising_loss", "DT", PASSES, _loss_dt_setup, lambda s: _loss_bytes(s, False)),
    OpCase("denoising_loss[FM]", "denoising_loss", "FM", PASSES, _loss_fm_setup, lambda s: _loss_bytes(s, True)),
    OpCase("latent_update", "latent_update", "", ("fwd",), _latent_update_setup, _latent_update_bytes),
    OpCase("latent_update[BP]", "latent_update", "BP", PASSES, _latent_update_bp_setup, _latent_update_bp_bytes),
    OpCase("stacked_linear", "stacked_linear", "", PASSES, _stacked_linear_setup, _stacked_linear_bytes, judged=False),
    OpCase("conv_epilogue", "conv_epilogue", "", PASSES, _conv_epilogue_setup, _conv_epilogue_bytes),
)
CASE_PASSES = tuple((case, pass_) for case in CASES for pass_ in case.passes)


def prepare(case: OpCase, pass_: str, shape: Shape, backend: str, device: torch.device) -> Callable[[], object]:
    """A zero-argument callable that runs ``pass_`` of ``case`` once, its inputs already in place.

    ``fwd`` runs the op (recording the autograd graph where inputs require grad). ``bwd`` runs the
    forward once here, outside any timing, and returns a callable that calls
    ``torch.autograd.grad(out, inputs, grad_out, retain_graph=True)`` on that saved graph, so only
    the backward pass runs; ``grad_out`` is a fixed random tensor (1 for a scalar loss).
    """
    if pass_ not in case.passes:
        raise ValueError(f"pass_: {case.name} has passes {case.passes}, got {pass_!r}")
    forward, leaves = case.setup(shape, backend, device)
    if pass_ == "fwd":
        return forward
    out = forward()
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=g).to(device) if out.dim() else torch.ones_like(out)
    return lambda: torch.autograd.grad(out, leaves, grad_out, retain_graph=True)


def timed_backends(device: torch.device) -> dict[str, str]:
    """Every backend with ``""`` if it is timed on ``device`` here, else the reason it is skipped.

    Triton on CPU tensors runs in its interpreter, a correctness tool whose speed means nothing,
    so it is never timed on the CPU.
    """
    skipped = {}
    for name, status in backends.statuses().items():
        if name == "triton" and device.type == "cpu":
            skipped[name] = (
                "on the CPU, Triton runs in its interpreter (TRITON_INTERPRET=1): a correctness tool, not timed"
            )
        elif device.type not in status.devices:
            skipped[name] = f"cannot run on {device.type} here: {status.reason or 'not supported'}"
        else:
            skipped[name] = ""
    return skipped


def lacks(backend: str, case: OpCase) -> str:
    """Why ``backend`` has no implementation of ``case``'s op (the registry's declaration), or ``""``."""
    return backends.get(backend).lacks.get(case.op, "")
