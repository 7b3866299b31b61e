"""Run the real ``slurm/*.sbatch`` scripts without a cluster: fake ``scontrol``, ``srun``, ``accelerate``
and ``bavq-prep`` go first on PATH. Fake ``srun`` runs its command once per fake node (with that
node's ``SLURM_NODEID``), and the fake programs record their argv instead of working, so a test
reads exactly what each node would have run.

    python tests/_fake_slurm.py train --nodes 2 BAVQ_BACKEND=deepspeed   # each node's accelerate command
    python tests/_fake_slurm.py prep --tasks 4 PREP_INPUT=/datasets/imagenet PREP_OUTPUT=/shards/imagenet

The script's environment starts clean (PATH, HOME, LANG), so a dry run inside a real allocation is
not confused by the real job.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "slurm" / "train.sbatch"
PREP_SCRIPT = ROOT / "slurm" / "prep_shards.sbatch"

# One stand-in program; each fake name on PATH is a tiny shell wrapper calling it with its own name.
_FAKE = r'''
import json, os, signal, subprocess, sys

prog, args = sys.argv[1], sys.argv[2:]
hosts = os.environ["BAVQ_DRYRUN_HOSTS"].split()

def record(argv):
    row = {"program": prog, "argv": argv, "node": os.environ.get("SLURM_NODEID"),
           "usr1_ignored": signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN}
    with open(os.environ["BAVQ_DRYRUN_LOG"], "a") as fh:
        fh.write(json.dumps(row) + "\n")

if prog == "scontrol":
    record(args)
    if args[:2] == ["show", "hostnames"]:
        print("\n".join(hosts))
elif prog == "srun":  # options are --name=value words up to the command
    n = next((i for i, a in enumerate(args) if not a.startswith("-")), len(args))
    record(args[:n])
    tasks = [subprocess.Popen(args[n:], env=dict(os.environ, SLURM_NODEID=str(i), SLURM_PROCID=str(i),
                                                 SLURMD_NODENAME=host)) for i, host in enumerate(hosts)]
    sys.exit(max(t.wait() for t in tasks))  # all nodes run at once, as under a real srun
else:
    record([prog] + args)
    sys.exit(int(os.environ.get("BAVQ_DRYRUN_EXIT", "0")))
'''
FAKE_PROGRAMS = ("scontrol", "srun", "accelerate", "bavq-prep")


@dataclass
class Call:
    """One recorded invocation of a fake program."""

    program: str
    argv: list[str]  # for accelerate / bavq-prep the full command line, for srun / scontrol the arguments
    node: int | None  # SLURM_NODEID seen by the program (None outside srun)
    usr1_ignored: bool  # whether SIGUSR1 was ignored when the program started


@dataclass
class DryRun:
    """The outcome of running one script with the stand-ins."""

    returncode: int
    output: str  # the script's stdout and stderr
    calls: list[Call] = field(default_factory=list)

    def of(self, program: str) -> list[Call]:
        return [c for c in self.calls if c.program == program]


def job_env(hosts: Sequence[str], job_id: int = 4242, gpus_on_node: int | None = None) -> dict[str, str]:
    """The SLURM variables of a batch job on ``hosts`` (what sbatch would give the script)."""
    env = {"SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": ",".join(hosts), "SLURM_NNODES": str(len(hosts))}
    if gpus_on_node is not None:
        env["SLURM_GPUS_ON_NODE"] = str(gpus_on_node)
    return env


def array_task_env(task_id: int, task_max: int, job_id: int = 4300) -> dict[str, str]:
    """The SLURM variables of array task ``task_id`` of ``sbatch --array=0-task_max``."""
    return {"SLURM_JOB_ID": str(job_id + task_id), "SLURM_ARRAY_JOB_ID": str(job_id),
            "SLURM_ARRAY_TASK_ID": str(task_id), "SLURM_ARRAY_TASK_MIN": "0",
            "SLURM_ARRAY_TASK_MAX": str(task_max), "SLURM_ARRAY_TASK_COUNT": str(task_max + 1),
            "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node-0"}


def _install_fakes(folder: Path, names: Sequence[str]) -> None:
    program = folder / "_bavq_fake.py"
    program.write_text(_FAKE)
    for name in names:
        path = folder / name
        path.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(program))} {name} "$@"\n')
        path.chmod(0o755)


def run_script(script: str | Path, env: Mapping[str, str], hosts: Sequence[str] = ("node-0",),
               exit_code: int = 0, cwd: str | Path | None = None, timeout: float = 60,
               fakes: Sequence[str] = FAKE_PROGRAMS) -> DryRun:
    """Run ``script`` under bash with the stand-ins and ``env`` (on top of a clean PATH/HOME/LANG).

    ``hosts`` are the fake nodes (fake srun runs its command on all of them at once);
    ``exit_code`` is what the fake accelerate / bavq-prep exit with; ``fakes`` says which programs
    are replaced (leave out "accelerate" to run the real launcher on localhost "nodes").
    BAVQ_VENV defaults to empty (no activation, so the fakes are not shadowed by the venv's).
    """
    with tempfile.TemporaryDirectory(prefix="bavq-dryrun-") as tmp:
        folder = Path(tmp)
        _install_fakes(folder, fakes)
        log = folder / "calls.jsonl"
        full = {"PATH": f"{folder}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
                "HOME": os.environ.get("HOME", tmp), "LANG": "C.UTF-8", "BAVQ_VENV": "",
                "SLURM_SUBMIT_DIR": str(Path(cwd or os.getcwd()).resolve()),
                "BAVQ_EXIT_FILE": str(folder / "exit_status"), **env,  # a dry run writes nothing in the project
                "BAVQ_DRYRUN_LOG": str(log), "BAVQ_DRYRUN_HOSTS": " ".join(hosts),
                "BAVQ_DRYRUN_EXIT": str(exit_code)}
        proc = subprocess.run(["bash", str(Path(script).resolve())], env=full, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout)
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    calls = [Call(r["program"], r["argv"], None if r["node"] is None else int(r["node"]), r["usr1_ignored"])
             for r in rows]
    return DryRun(proc.returncode, proc.stdout + proc.stderr, calls)


def _print_calls(header: str, run: DryRun, program: str) -> None:
    for call in sorted(run.of(program), key=lambda c: -1 if c.node is None else c.node):
        where = f"node {call.node}" if call.node is not None else header
        print(f"{where}: {shlex.join(call.argv)}")
    if run.returncode != 0 or not run.of(program):
        print(run.output.rstrip(), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Print the commands a script would run on each fake node (train) or array task (prep)."""
    p = argparse.ArgumentParser(prog="python tests/_fake_slurm.py", description=__doc__.splitlines()[0])
    p.add_argument("script", choices=("train", "prep"), help="slurm/train.sbatch or slurm/prep_shards.sbatch")
    p.add_argument("--nodes", type=int, default=2, help="train: fake nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="train: SLURM_GPUS_ON_NODE")
    p.add_argument("--tasks", type=int, default=4, help="prep: array tasks (--array=0-TASKS-1)")
    p.add_argument("settings", nargs="*", metavar="VAR=value", help="script settings, e.g. BAVQ_BACKEND=deepspeed")
    args = p.parse_intermixed_args(argv)
    settings = dict(s.split("=", 1) for s in args.settings)
    if args.script == "train":
        hosts = [f"node-{i}" for i in range(args.nodes)]
        run = run_script(TRAIN_SCRIPT, {**job_env(hosts, gpus_on_node=args.gpus_per_node), **settings}, hosts,
                         cwd=ROOT)
        _print_calls("batch", run, "accelerate")
        return run.returncode
    code = 0
    for task in range(args.tasks):
        run = run_script(PREP_SCRIPT, {**array_task_env(task, args.tasks - 1), **settings}, cwd=ROOT)
        _print_calls(f"task {task}", run, "bavq-prep")
        code = code or run.returncode
    return code


if __name__ == "__main__":
    sys.exit(main())
