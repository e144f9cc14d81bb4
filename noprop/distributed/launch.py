"""Run a function on N local processes joined in one process group: :func:`spawn`.

``torchrun`` is the launcher for the command line; :func:`spawn` is the one for Python callers
(tests, benchmarks, notebooks) that want the ranks' return values back and hard limits on time:

* the parent process hosts the rendezvous store (a ``TCPStore`` on a port the OS picks, so
  there is no race for a free port) and outlives every rank, so heartbeats keep working when any
  rank dies (:mod:`noprop.distributed.liveness` names the lost rank);
* every rank is a fresh interpreter (``multiprocessing`` start method ``spawn``) that joins the
  process group, calls ``fn(rank, world_size, *args)`` and sends back its return value, or the
  exception's type, message and traceback;
* the parent waits until every rank has reported or died; after ``timeout`` seconds it kills every
  rank still running (SIGTERM, then SIGKILL after a grace period) and raises :class:`SpawnError`
  naming each rank's outcome, so a failing test never leaves processes behind.
"""

from __future__ import annotations

import datetime
import os
import pickle
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GRACE_SECONDS = 5.0  # between SIGTERM and SIGKILL when the parent stops a rank
PREFIX = "spawn"  # the process group's keys live under this prefix of the parent's store


@dataclass
class RankOutcome:
    """What one rank of :func:`spawn` did.

    Attributes:
        rank: the rank.
        value: ``fn``'s return value (None unless ``ok``).
        error: ``"TypeName: message"`` of the exception it raised, ``"exit code N"`` /
            ``"killed by signal N"`` if it died without reporting, ``"timed out"`` if the parent
            stopped it; None if ``ok``.
        details: the traceback of a raised exception ("" otherwise).
        seconds: wall time from the launch to its report (or to the parent's verdict).
    """

    rank: int
    value: Any = None
    error: str | None = None
    details: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


class SpawnError(RuntimeError):
    """One or more ranks of :func:`spawn` failed or timed out; ``outcomes`` holds every rank's :class:`RankOutcome`."""

    def __init__(self, outcomes: list[RankOutcome]):
        self.outcomes = outcomes
        lines = [f"rank {o.rank}: {o.error}" for o in outcomes if not o.ok]
        super().__init__("; ".join(lines))


def _rank_entry(fn: Callable, rank: int, world_size: int, port: int, backend: str, timeout: float, threads: int, args: tuple, results) -> None:
    started = time.perf_counter()
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size)})
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=timeout))
        dist.init_process_group(
            backend, store=dist.PrefixStore(PREFIX, store), rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout)
        )
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # pickled here, by value: the queue's own pickler would share tensors through file
        # descriptors that die with this process
        results.put((rank, pickle.dumps(value), None, "", time.perf_counter() - started))
    except BaseException as error:  # reported to the parent, which raises SpawnError
        message = f"{type(error).__name__}: {' '.join(str(error).split())}"
        results.put((rank, pickle.dumps(None), message, traceback.format_exc(), time.perf_counter() - started))


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    *,
    backend: str = "gloo",
    timeout: float = 120.0,
    threads: int = 1,
    raise_on_error: bool = True,
) -> list[RankOutcome]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh local processes in one process group.

    Args:
        fn: a function importable by name (defined at the top level of a module); its return
            value must be picklable.
        world_size: number of ranks (>= 1).
        args: extra arguments, pickled to every rank.
        backend: the process group's backend (``"gloo"``; ``"nccl"`` needs one GPU per rank).
        timeout: seconds for the whole run; also the process group's collective timeout.
        threads: ``torch.set_num_threads`` in every rank (0 leaves torch's default; 1 keeps N
            ranks from oversubscribing the cores).
        raise_on_error: raise :class:`SpawnError` if any rank fails; otherwise return the outcomes.

    Returns:
        One :class:`RankOutcome` per rank, in rank order.

    Raises:
        SpawnError: a rank raised, died or outlived ``timeout`` (every rank still running is
            killed first).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected an int >= 1, got {world_size!r}")
    if not timeout > 0:
        raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r}")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout))
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    processes = [
        context.Process(target=_rank_entry, args=(fn, rank, world_size, store.port, backend, timeout, threads, args, results), daemon=True)
        for rank in range(world_size)
    ]
    start = time.perf_counter()
    for process in processes:
        process.start()
    outcomes: dict[int, RankOutcome] = {}
    deadline = start + timeout
    try:
        while len(outcomes) < world_size and time.perf_counter() < deadline:
            while not results.empty():
                rank, value, error, details, seconds = results.get()
                outcomes[rank] = RankOutcome(rank, pickle.loads(value), error, details, seconds)
            for rank, process in enumerate(processes):
                if rank not in outcomes and not process.is_alive() and results.empty():
                    code = process.exitcode
                    reason = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code} without a report"
                    outcomes[rank] = RankOutcome(rank, error=reason, seconds=time.perf_counter() - start)
            time.sleep(0.05)
    finally:
        _stop(processes)
        while not results.empty():
            rank, value, error, details, seconds = results.get()
            outcomes.setdefault(rank, RankOutcome(rank, pickle.loads(value), error, details, seconds))
    for rank in range(world_size):
        outcomes.setdefault(rank, RankOutcome(rank, error=f"timed out after {timeout:g} s", seconds=time.perf_counter() - start))
    ordered = [outcomes[rank] for rank in range(world_size)]
    if raise_on_error and any(not o.ok for o in ordered):
        raise SpawnError(ordered)
    return ordered


def _stop(processes: list) -> None:
    """SIGTERM every live process, SIGKILL those alive after :data:`GRACE_SECONDS`, reap all."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.perf_counter() + GRACE_SECONDS
    for process in processes:
        process.join(max(0.0, deadline - time.perf_counter()))
        if process.is_alive():
            process.kill()
            process.join()
