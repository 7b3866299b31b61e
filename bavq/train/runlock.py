"""One writer per run: an ``fcntl.flock`` on ``RUN/run.lock`` held by the live run's rank 0.

Why flock and not a pid file: the kernel drops the lock when the holder dies (SIGKILL, OOM, node
reboot of a local disk), so a stale lock never blocks a relaunch and nothing has to guess whether
a recorded pid is still ours. The file's text (host, pid, start time, SLURM job) is only there to
name the live holder in the refusal. On network file systems flock must be supported by the mount
(NFSv4, Lustre with ``-o flock``); where it is not, ``flock`` raises and we say so.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from bavq.config import ConfigError

LOCK_NAME = "run.lock"


class RunLockedError(ConfigError):
    """Another live process holds the run's lock (a user error: exit 2, not requeued)."""


class RunLock:
    """The run folder's writer lock. ``acquire`` waits up to ``wait_s`` for a dying holder
    (orphaned ranks stop within the watchdog bound) before refusing."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fh = None

    def acquire(self, wait_s: float = 0.0, job: str | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # never truncate before we hold the lock: the text names the holder
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = self.holder() or "an unknown process"
                    fh.close()
                    raise RunLockedError(
                        f"run folder {self.path.parent} is in use by a live run ({holder}); stop that run "
                        "first, or use another --name") from None
                time.sleep(0.2)
            except OSError as exc:
                fh.close()
                raise RunLockedError(f"cannot lock {self.path} ({exc}); the file system must support flock "
                                     "(e.g. mount Lustre with -o flock)") from None
        fh.seek(0)
        fh.truncate()
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        fh.write(f"host={socket.gethostname()} pid={os.getpid()} started={started}"
                 + (f" slurm_job={job}" if job else "") + "\n")
        fh.flush()
        self._fh = fh

    def holder(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def acquire_run_lock(run_dir: Path, wait_s: float, is_main: bool) -> RunLock | None:
    """Collective: rank 0 takes the lock, every rank learns whether it could (and raises if not)."""
    from bavq import dist

    lock, error = None, None
    if is_main:
        lock = RunLock(run_dir)
        try:
            lock.acquire(wait_s, job=dist.slurm_job_id())
        except RunLockedError as exc:
            error = str(exc)
    error = dist.broadcast_object(error)
    if error:
        raise RunLockedError(error)
    return lock
