"""Command-line plumbing every application shares: a one-line argparse and the one-line error.

User mistakes (bad flags, config keys, missing data or weight files, a run folder in use) end with
one line on stderr and exit code 2; a preempted run exits with code 75 after saving, so SLURM can
requeue it; a crash exits with 1 after a traceback and one line naming the rank. The code also goes
to ``$BAVQ_EXIT_FILE`` (see bavq.exitstatus), because launchers report every failure as 1.
"""

from __future__ import annotations

import argparse
import sys

from bavq import dist
from bavq.exitstatus import EXIT_USAGE, write_exit_status


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports an error in one line (plus a hint) instead of usage + error."""

    def error(self, message: str):
        if dist.launcher_rank() == 0:
            write_exit_status(EXIT_USAGE, message)
        line = f"{self.prog}: error: {message} (see {self.prog} --help)\n"
        self.exit(EXIT_USAGE, line if dist.prints_user_errors() else None)


def fail(prog: str, message: str) -> int:
    """Report a user mistake in one line and return the exit code (2). Under a launcher every rank
    meets the same mistake: only local rank 0 prints. The launcher then adds its own traceback and
    exits 1 whatever the ranks' code (torchrun and every `accelerate launch` mode, measured); its log
    still names each rank's "exitcode: 2" (README, "Exit codes")."""
    if dist.prints_user_errors():
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE
