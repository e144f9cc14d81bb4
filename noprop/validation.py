"""Input checks shared by the ops and the models.

Shape, dtype and device checks read only metadata and always run. Checks that read tensor
values (label range, NaN/Inf) must not synchronise a GPU training step, so :func:`value_check`
decides how to run them: on a CPU tensor they raise a ``ValueError`` at once; on a CUDA tensor
they become a non-blocking device assert (``torch._assert_async``); while a CUDA graph is being
captured or ``torch.compile`` is tracing they are skipped (datasets are checked once when they
are loaded, see :mod:`noprop.data`).
"""

from __future__ import annotations

import math

from typing import Callable, Sequence

import torch


def _capturing_or_compiling() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def value_check(tensor: torch.Tensor, is_valid: Callable[[torch.Tensor], torch.Tensor], message: str) -> None:
    """Raise ``ValueError(message)`` unless ``is_valid(tensor)`` (a bool scalar tensor) holds.

    CPU: checked now. CUDA: an asynchronous device assert (no host sync). Graph capture or
    ``torch.compile`` tracing: skipped.
    """
    if _capturing_or_compiling():
        return
    if tensor.device.type == "cpu":
        if not bool(is_valid(tensor)):
            raise ValueError(message)
    else:
        torch._assert_async(is_valid(tensor), message)


def check_tensor(name: str, value: object) -> torch.Tensor:
    """Return ``value`` if it is a tensor, else raise ``TypeError`` naming ``name``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_floating(name: str, tensor: torch.Tensor) -> None:
    """Raise ``TypeError`` unless ``tensor`` has a floating dtype."""
    check_tensor(name, tensor)
    if not tensor.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {tensor.dtype}")


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Reject NaN or Inf values in ``tensor`` (see :func:`value_check` for when this runs)."""
    value_check(tensor, lambda t: torch.isfinite(t).all(), f"{name}: contains NaN or Inf values")


def check_labels(name: str, y: object, num_classes: int, batch_size: int | None = None) -> torch.Tensor:
    """Check class labels: an int64 ``[B]`` tensor with values in ``[0, num_classes)``.

    Raises:
        TypeError: ``y`` is not an integer tensor.
        ValueError: wrong shape, a count different from ``batch_size``, or a value out of range.
    """
    y = check_tensor(name, y)
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name}: expected an integer tensor of class labels, got dtype {y.dtype}")
    if y.dim() != 1:
        raise ValueError(f"{name}: expected shape [B], got {tuple(y.shape)}")
    if batch_size is not None and y.shape[0] != batch_size:
        raise ValueError(f"{name}: expected {batch_size} labels (one per example), got {y.shape[0]}")
    value_check(
        y,
        lambda t: ((t >= 0) & (t < num_classes)).all(),
        f"{name}: labels must lie in [0, {num_classes})",
    )
    return y.long()


def check_shape(name: str, tensor: torch.Tensor, expected: Sequence[int | None]) -> None:
    """Raise ``ValueError`` unless ``tensor.shape`` matches ``expected`` (None matches any size)."""
    shape = tuple(tensor.shape)
    if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
        wanted = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name}: expected shape {wanted}, got {list(shape)}")


def check_images(name: str, x: object, image_shape: Sequence[int]) -> torch.Tensor:
    """Check a batch of images ``[B, C, H, W]`` against the model's ``(C, H, W)``.

    Raises:
        TypeError: ``x`` is not a floating-point tensor.
        ValueError: the shape differs from ``[B, *image_shape]`` or a value is NaN or Inf.
    """
    x = check_tensor(name, x)
    check_floating(name, x)
    check_shape(name, x, (None, *image_shape))
    check_finite(name, x)
    return x


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value  # type: ignore[return-value]


def check_positive_int(name: str, value: object) -> int:
    """Raise unless ``value`` is an int ``>= 1``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value}")
    return value


def check_number(name: str, value: object, minimum: float = 0.0, allow_equal: bool = False) -> float:
    """Raise unless ``value`` is a finite real number ``> minimum`` (``>= minimum`` with ``allow_equal``).

    Raises:
        TypeError: not an int or float (bools included).
        ValueError: NaN, infinite, or out of range; the message names ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < minimum or (value == minimum and not allow_equal):
        wanted = f">= {minimum}" if allow_equal else f"> {minimum}"
        raise ValueError(f"{name}: expected a finite number {wanted}, got {value}")
    return float(value)
