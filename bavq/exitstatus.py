"""Exit codes and the exit-status file that carries them past the launcher.

``accelerate launch`` (and torchrun) report any failing rank as exit code 1, so the scheduler
cannot tell "preempted, requeue me" from "bad config, do not". The SLURM script therefore names a
file in ``BAVQ_EXIT_FILE``; rank 0 writes ``CODE reason`` there on every exit it controls (and a
rank that detects a dead peer writes it too). A missing file means the job died without a word
(SIGKILL, OOM, node loss): a crash.
"""

from __future__ import annotations

import os
from pathlib import Path

EXIT_OK = 0
EXIT_CRASH = 1  # a rank died or failed: requeue (up to the script's limit), resume from the last checkpoint
EXIT_USAGE = 2  # the user must change something (config, data path, a live run holds the folder): no requeue
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint saved after a signal; requeue

EXIT_FILE_ENV = "BAVQ_EXIT_FILE"


def exit_file() -> Path | None:
    value = os.environ.get(EXIT_FILE_ENV, "")
    return Path(value) if value else None


def write_exit_status(code: int, reason: str) -> None:
    """Write ``CODE reason`` to ``$BAVQ_EXIT_FILE`` (atomically; no-op when the variable is unset)."""
    path = exit_file()
    if path is None:
        return
    try:
        if code == EXIT_CRASH and path.is_file() and path.read_text().split(" ", 1)[0] not in ("", str(EXIT_CRASH)):
            return  # a peer's crash that followed a decided exit (e.g. rank 0's user error) must not hide it
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(f"{code} {' '.join(reason.split())}\n")
        os.replace(tmp, path)
    except OSError as exc:  # never turn an exit into a crash; the script then falls back to srun's code
        print(f"bavq: warning: could not write the exit status to {path}: {exc}", flush=True)
