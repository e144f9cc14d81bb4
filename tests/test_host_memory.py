"""noprop.host_memory: the ``reuse`` policy serves a repeated large allocation without new page faults.

Each case runs in its own process: the policy is a setting of the whole process.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from noprop.config import TrainConfig
from noprop.host_memory import _glibc, set_host_memory

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGES = 16384  # a 64 MiB tensor in 4 KiB pages

# Allocates, fills and frees a 64 MiB tensor 12 times under a policy; prints each round's minor page faults.
PROBE = """
import resource, sys, torch
from noprop.host_memory import set_host_memory
assert set_host_memory(sys.argv[1])
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = torch.empty(64 * 2**20 // 4)
    buffer.fill_(1.0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del buffer
"""

needs_glibc = pytest.mark.skipif(_glibc() is None, reason="the host-memory policies need glibc's mallopt")


def page_faults(policy: str) -> list[int]:
    done = subprocess.run([sys.executable, "-c", PROBE, policy], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [int(line) for line in done.stdout.split()]


def transparent_huge_pages_always() -> bool:
    path = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.is_file() and "[always]" in path.read_text()


@needs_glibc
def test_reuse_serves_a_repeated_large_allocation_from_the_heap():
    faults = page_faults("reuse")
    assert faults[0] >= PAGES // 2, f"the first 64 MiB must be faulted in: {faults}"
    # The first rounds may still map new memory: the small remainders posix_memalign splits off a
    # block go to glibc's per-thread cache (up to 7 of a size), where they keep the freed block from
    # merging with the heap's free top. Measured: from the fifth round on, none fault.
    assert max(faults[6:]) < PAGES // 10, f"freed blocks are reused without page faults after a warm-up: {faults}"


@needs_glibc
@pytest.mark.skipif(transparent_huge_pages_always(), reason="with transparent huge pages always on, fresh mappings fault per 2 MiB")
def test_system_maps_every_large_allocation_anew():
    faults = page_faults("system")
    assert min(faults) >= PAGES // 2, f"every 64 MiB allocation is a fresh mapping under glibc's defaults: {faults}"


def test_an_unknown_policy_is_refused_by_name():
    with pytest.raises(ValueError, match="host_memory: expected one of"):
        set_host_memory("keep")
    with pytest.raises(ValueError, match="host_memory"):
        TrainConfig(host_memory="pooled")
