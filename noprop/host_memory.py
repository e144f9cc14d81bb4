"""How the process's C heap hands out large host buffers: the CPU training step's page faults.

A CPU training step allocates and frees the same large tensors every step (the conv stages'
activations and their gradients: about 0.8 GB per step for the paper's block at T = 10, B = 128).
glibc serves every allocation over its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
returns it with ``munmap`` when freed, so every step touches brand-new pages: measured on this
project's CPU machine, ~210,000 minor page faults per step, and writing a fresh 128 MB tensor
takes 44 ms against 11 ms for a reused one.

Policies (:func:`set_host_memory`; ``noprop train --host-memory``, default ``"reuse"`` on a CPU):

- ``"reuse"``: ``mallopt(M_MMAP_MAX, 0)`` and ``mallopt(M_TRIM_THRESHOLD, 1 TiB)``: large blocks
  come from the heap and freed ones stay there for the next step (page faults per step drop to
  ~1-40 MB after the first steps). The process keeps the memory of its largest step until it
  exits, which a training process does anyway.
- ``"system"``: large blocks are mapped anew and returned to the system, as glibc does by
  default: ``M_MMAP_MAX`` 65,536, ``M_MMAP_THRESHOLD`` 32 MiB and ``M_TRIM_THRESHOLD`` 64 MiB
  (where glibc's dynamic threshold settles in a process that frees blocks of 32 MiB and more:
  its ceiling, and the most reuse glibc's defaults ever give), then ``malloc_trim(0)``, which
  returns the heap's free memory. glibc's *dynamic* adjustment itself, its state before any
  ``mallopt``, cannot be restored.

This is a setting of the whole process, like ``torch.set_num_threads``. It applies where the C
library is glibc (Linux); elsewhere :func:`set_host_memory` changes nothing and returns False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from noprop.validation import check_choice

HOST_MEMORY_POLICIES = ("reuse", "system")

# glibc's <malloc.h> parameter numbers and its default values
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
GLIBC_SETTLED = {M_MMAP_MAX: 65536, M_MMAP_THRESHOLD: 32 * 2**20, M_TRIM_THRESHOLD: 64 * 2**20}
KEEP_FREED = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}  # mallopt takes an int: the largest trim threshold


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # glibc only
        libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return libc


def set_host_memory(policy: str, release: bool = True) -> bool:
    """Set the process's large-allocation policy (see the module docstring).

    Args:
        policy: ``"reuse"`` (freed large blocks stay in the heap) or ``"system"`` (blocks of 32 MiB
            and more are mapped anew and returned, glibc's default behaviour).
        release: with ``"system"``, return the heap's free memory now (``malloc_trim(0)``). A
            benchmark that alternates policies in one process passes False, so switching back to
            ``"reuse"`` finds its heap as a process of its own would.

    Returns:
        True if the policy was applied, False where the C library is not glibc (nothing changed).

    Raises:
        ValueError: an unknown ``policy``.
        RuntimeError: glibc refused a setting (names it).
    """
    check_choice("host_memory", policy, HOST_MEMORY_POLICIES)
    libc = _glibc()
    if libc is None:
        return False
    settings = KEEP_FREED if policy == "reuse" else GLIBC_SETTLED
    for parameter, value in settings.items():
        if libc.mallopt(parameter, value) != 1:
            raise RuntimeError(f"host_memory: mallopt({parameter}, {value}) failed for policy {policy!r}")
    if policy == "system" and release:
        libc.malloc_trim(0)
    return True
