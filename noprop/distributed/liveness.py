"""Heartbeats through the process group's store, so that a lost rank is named instead of waited for.

Every rank runs one daemon thread that, every :data:`HEARTBEAT_SECONDS`, increments its own
counter ``noprop/<session>/beat/<rank>`` in the rendezvous store (``TCPStore``: the ``torchrun``
agent's, or the parent's under :func:`noprop.distributed.spawn`) and reads every peer's. A rank
that raises records ``failed/<rank>`` with its error; one that finishes records ``done/<rank>``.

Two ways a lost rank surfaces, whichever comes first:

* a collective fails (gloo notices a closed connection at once when a peer process dies; a hung
  peer makes it time out after the process group's timeout): the trainer calls
  :meth:`Liveness.diagnose`, which watches the counters for :data:`DIAGNOSIS_SECONDS` and returns
  a :class:`RankLostError` naming the ranks whose heartbeat stopped (or that reported a failure);
* a peer's heartbeat stops for ``timeout`` seconds while this rank is blocked somewhere that does
  not fail on its own: the thread prints the error naming the rank and ends the process
  (exit status 1) :data:`EXIT_GRACE_SECONDS` later unless the trainer has stopped by then.

If the store itself becomes unreachable, its host is gone: rank 0 when the process group was
initialised from ``MASTER_ADDR`` by rank 0, the launcher (``torchrun``'s agent, :func:`spawn`'s
parent) otherwise; the error says so. Each rank reads every peer's counter, ``world_size``
small store requests per heartbeat.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time

HEARTBEAT_SECONDS = 0.5
DIAGNOSIS_SECONDS = 4 * HEARTBEAT_SECONDS  # a live peer beats several times in this window
EXIT_GRACE_SECONDS = 5.0
EXIT_STATUS = 1
_sessions = itertools.count(1)  # every rank opens its sessions in the same order: same key prefix


class RankLostError(RuntimeError):
    """Another rank of the process group died, hung or failed; the message names it.

    Attributes:
        ranks: the lost ranks (empty when only the store's host is known to be gone).
    """

    def __init__(self, message: str, ranks: tuple[int, ...] = ()):
        super().__init__(message)
        self.ranks = ranks


class Liveness:
    """This rank's heartbeat and its watch over the peers' (see the module docstring).

    Args:
        store: the process group's store (a ``torch.distributed.Store``).
        rank, world_size: this rank and the group's size.
        timeout: seconds of silence after which a peer is declared lost by the thread.
    """

    def __init__(self, store, rank: int, world_size: int, timeout: float):
        self.store, self.rank, self.world_size, self.timeout = store, rank, world_size, float(timeout)
        self.prefix = f"noprop/{next(_sessions)}"
        self.peers = [r for r in range(world_size) if r != rank]
        self._counts: dict[int, int] = {}
        self._changed: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="noprop-heartbeat", daemon=True)

    def _key(self, kind: str, rank: int) -> str:
        return f"{self.prefix}/{kind}/{rank}"

    def start(self) -> "Liveness":
        """Beat once (so peers see this rank at once) and start the thread."""
        self.store.add(self._key("beat", self.rank), 1)
        now = time.monotonic()
        self._changed = {peer: now for peer in self.peers}
        self._thread.start()
        return self

    def close(self, failure: str | None = None) -> None:
        """Stop the thread; record ``failure`` (this rank's error) or that this rank finished."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        try:
            if failure is None:
                self.store.set(self._key("done", self.rank), "1")
            else:
                self.store.set(self._key("failed", self.rank), failure[:500])
        except Exception:  # the store's host is gone: nobody is left to tell
            pass

    def _read(self) -> dict[int, int]:
        return {peer: int(self.store.add(self._key("beat", peer), 0)) for peer in self.peers}

    def _status(self, peer: str | int, kind: str) -> str | None:
        key = self._key(kind, int(peer))
        if not self.store.check([key]):
            return None
        return self.store.get(key).decode(errors="replace")

    def _silent(self, counts: dict[int, int], since: dict[int, float], now: float, limit: float) -> list[int]:
        """Peers whose counter has not moved for ``limit`` seconds and that neither finished nor reported a failure."""
        return [p for p in self.peers if now - since[p] >= limit and self._status(p, "done") is None]

    def _update(self, now: float) -> None:
        counts = self._read()
        for peer, count in counts.items():
            if self._counts.get(peer) != count:
                self._counts[peer] = count
                self._changed[peer] = now

    def _run(self) -> None:
        unreachable_since = None
        while not self._stop.wait(HEARTBEAT_SECONDS):
            now = time.monotonic()
            try:
                self.store.add(self._key("beat", self.rank), 1)
                self._update(now)
                unreachable_since = None
                lost = self._silent(self._counts, self._changed, now, self.timeout)
                message = self._describe(lost, now) if lost else None
            except Exception as error:  # the store's host is gone
                unreachable_since = unreachable_since or now
                message = self._store_lost(error) if now - unreachable_since >= self.timeout else None
            if message and not self._stop.wait(EXIT_GRACE_SECONDS):
                print(f"noprop: rank {self.rank}: error: {message}; stopping this rank", file=sys.stderr, flush=True)
                os._exit(EXIT_STATUS)

    def _describe(self, lost: list[int], now: float) -> str:
        parts = []
        for peer in lost:
            failure = self._status(peer, "failed")
            if failure is not None:
                parts.append(f"rank {peer} failed ({failure})")
            else:
                parts.append(f"rank {peer} was lost (no heartbeat for {now - self._changed[peer]:.1f} s: killed, crashed or hung)")
        return "; ".join(parts)

    def _store_lost(self, error: BaseException) -> str:
        return (
            "the rendezvous store is unreachable, so its host is gone (rank 0, or the launcher: torchrun's agent, "
            f"noprop.distributed.spawn's parent): {' '.join(str(error).split())[:200]}"
        )

    def diagnose(self, cause: BaseException | None = None) -> RankLostError | None:
        """After a failed collective: which peers are gone? Watches the heartbeats for :data:`DIAGNOSIS_SECONDS`.

        Returns:
            A :class:`RankLostError` naming every peer that reported a failure or whose heartbeat
            did not move in the window (or saying that the store's host is gone), or None when
            every peer is alive (the failure is not a lost rank).
        """
        try:
            failed = [p for p in self.peers if self._status(p, "failed") is not None]
            before = self._read()
            start = time.monotonic()
            time.sleep(DIAGNOSIS_SECONDS)
            after = self._read()
        except Exception as error:
            return RankLostError(self._store_lost(error))
        now = time.monotonic()
        since = {p: start if after[p] == before[p] else now for p in self.peers}
        lost = sorted(set(failed) | set(self._silent(after, since, now, DIAGNOSIS_SECONDS * 0.9)))
        if not lost:
            return None
        for peer in lost:
            self._changed[peer] = min(self._changed.get(peer, start), start)
        message = self._describe(lost, now)
        if cause is not None:
            message += f" [the collective's error: {' '.join(str(cause).split())[:200]}]"
        return RankLostError(message, tuple(lost))
