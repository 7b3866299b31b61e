"""A rank never trains alone: one daemon thread per rank that stops it within a bound when

- its launcher died (``os.getppid()`` changed): torchrun starts workers in their own sessions, so
  a SIGKILL of the launcher alone would otherwise leave every rank training on and writing the
  run (a relaunch would then race the orphans);
- a peer rank stopped beating: every rank bumps a counter in the launcher's rendezvous store
  each ``interval_s``; rank r watches rank r+1 (a ring: O(W) store traffic, not O(W^2)). A
  counter that has not moved for ``timeout_s`` means that process is dead or frozen (the thread
  beats while the main thread computes or waits in a collective). The watcher prints one line
  naming the rank, posts it in the store so every other rank stops at its next beat, and exits.

Why our own and not torch's: torchrun kills a node's other workers when one *exits*, but on
another node (or a rank frozen without exiting) the survivors would block in NCCL until the
collective timeout. The process-group timeout (``train.collective_timeout_s``) stays as the last
resort. A clean exit marks the rank "done" first, so its silence is never mistaken for a death.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from bavq.exitstatus import EXIT_CRASH, write_exit_status


def _fatal(message: str, announce: bool = True) -> None:
    if announce:
        print(f"bavq-train: error: {message}", file=sys.stderr, flush=True)
        write_exit_status(EXIT_CRASH, message)
    os._exit(EXIT_CRASH)  # the main thread may be blocked in a collective: no clean unwind is possible


class Watchdog:
    """Parent watch and ring heartbeat for ``rank`` of ``world``. ``store`` is a c10d Store shared
    by the ranks (None: parent watch only); ``timeout_s`` <= 0 disables the heartbeat."""

    active: "Watchdog | None" = None  # this process's started watchdog (the exit path stops it)

    def __init__(self, rank: int, world: int, store=None, prefix: str = "bavq/watchdog",
                 interval_s: float = 1.0, timeout_s: float = 60.0, watch_parent: bool = True):
        self.rank, self.world, self.store, self.prefix = rank, world, store, prefix
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.parent = os.getppid() if watch_parent else None
        self.heartbeat = store is not None and world > 1 and timeout_s > 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bavq-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        if self.parent is not None or self.heartbeat:
            self._thread.start()
            Watchdog.active = self
        return self

    def stop(self) -> None:
        """A clean exit of this rank: stop beating and tell the watcher not to raise the alarm."""
        self._stop.set()
        if self.heartbeat:
            try:
                self.store.set(self._key("done", self.rank), "1")
            except Exception:  # noqa: BLE001 - the store may already be gone at teardown
                pass

    def silent_ranks(self, wait_s: float | None = None) -> list[int]:
        """The other ranks whose heartbeat does not move within ``wait_s`` (default 2.5 beats) and that
        did not exit cleanly: the dead ones. For the report after a failed collective (O(W) store reads)."""
        if not self.heartbeat:
            return []
        others = [r for r in range(self.world) if r != self.rank]
        try:
            before = {r: self.store.add(self._key("beat", r), 0) for r in others}
            time.sleep(2.5 * self.interval_s if wait_s is None else wait_s)
            still = [r for r in others if self.store.add(self._key("beat", r), 0) == before[r]]
            return [r for r in still if not self._peer_done(r)]
        except Exception:  # noqa: BLE001 - the store went down with its host
            return []

    def _key(self, kind: str, rank: int | None = None) -> str:
        return f"{self.prefix}/{kind}" + (f"/{rank}" if rank is not None else "")

    def _run(self) -> None:
        peer = (self.rank + 1) % self.world
        seen, changed, store_ok = -1, time.monotonic(), time.monotonic()
        while not self._stop.wait(self.interval_s):
            if self.parent is not None and os.getppid() != self.parent:
                _fatal(f"rank {self.rank}: its launcher (pid {self.parent}) is gone; stopping this rank so no "
                       "orphan keeps writing the run; relaunch to resume from the last checkpoint")
            if not self.heartbeat:
                continue
            now = time.monotonic()
            try:
                self.store.add(self._key("beat", self.rank), 1)
                if self.store.check([self._key("abort")]):
                    _fatal(self.store.get(self._key("abort")).decode(), announce=self.rank == 0)
                count = self.store.add(self._key("beat", peer), 0)
                store_ok = now
            except Exception as exc:  # noqa: BLE001 - store host (launcher of node 0) unreachable
                if self._stop.is_set():
                    return
                if now - store_ok > self.timeout_s:
                    _fatal(f"rank {self.rank}: the rendezvous store has been unreachable for {now - store_ok:.0f} s "
                           f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}); the head "
                           "node's launcher died? relaunch to resume from the last checkpoint")
                continue
            if count != seen:
                seen, changed = count, now
            elif now - changed > self.timeout_s and not self._peer_done(peer) and not self._stop.is_set():
                message = (f"rank {peer} stopped responding (no heartbeat for {now - changed:.0f} s; killed, OOM "
                           f"or frozen?); stopping all ranks — relaunch to resume from the last complete checkpoint")
                try:
                    self.store.set(self._key("abort"), message)
                except Exception:  # noqa: BLE001
                    pass
                _fatal(message)

    def _peer_done(self, peer: int) -> bool:
        try:
            return bool(self.store.check([self._key("done", peer)]))
        except Exception:  # noqa: BLE001
            return False
