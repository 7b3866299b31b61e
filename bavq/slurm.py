"""Dry runs of the SLURM templates in ``slurm/``: what each node or array task would run, no cluster needed.

    python -m bavq.slurm train --nodes 2 --backend deepspeed --extra "train.max_steps=100"
    python -m bavq.slurm prep --tasks 4 --input /datasets/imagenet --output /datasets/imagenet-shards

The real script runs under bash with stand-ins for ``scontrol``, ``srun``, ``accelerate`` and
``bavq-prep`` first on PATH: fake ``srun`` runs its command once per fake node (with that node's
``SLURM_NODEID``), and the fake programs record their argv instead of working. Tests use the same
machinery and compare the recorded commands with :func:`node_launch_command`.

This module never reads the current process's launcher variables (``bavq.dist`` does); it only
writes fake ones into the environment of the scripts it runs, which starts clean so a dry run
inside a real allocation is not confused by the real job.
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

TRAIN_SCRIPT = "slurm/train.sbatch"
PREP_SCRIPT = "slurm/prep_shards.sbatch"
DEFAULT_TRAIN_CONFIG = "configs/imagenet_vqgan_f16_k16384_ba_vq.yaml"
DEFAULT_GPUS_PER_NODE = 8
DEEPSPEED_JSON = "launch/deepspeed/zero2.json"  # the generator JSON train.sbatch passes with deepspeed

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


def accelerate_config_name(backend: str, num_machines: int, num_processes: int) -> str:
    """The file under launch/accelerate/ that slurm/train.sbatch picks for BAVQ_BACKEND."""
    if backend == "deepspeed":
        return "deepspeed_zero2.yaml"
    if backend != "ddp":
        raise ValueError(f"BAVQ_BACKEND must be ddp or deepspeed, got '{backend}'")
    if num_processes == 1:
        return "1gpu.yaml"
    return "multi_gpu.yaml" if num_machines == 1 else "multi_node.yaml"


def node_launch_command(env: Mapping[str, str], head: str) -> list[str]:
    """The ``accelerate launch`` argv slurm/train.sbatch runs on the node of ``env["SLURM_NODEID"]``.

    ``env`` is the job's environment (SLURM_NNODES, SLURM_JOB_ID, optional SLURM_GPUS_ON_NODE and
    the BAVQ_* settings) plus the node's SLURM_NODEID; ``head`` is the first host of the job.
    Empty settings count as unset, as in the script's ``${VAR:-default}``.
    """
    nnodes = int(env.get("SLURM_NNODES") or 1)
    gpus = int(env.get("GPUS_PER_NODE") or env.get("SLURM_GPUS_ON_NODE") or DEFAULT_GPUS_PER_NODE)
    backend = env.get("BAVQ_BACKEND") or "ddp"
    config = env.get("BAVQ_CONFIG") or DEFAULT_TRAIN_CONFIG
    name = env.get("BAVQ_NAME") or Path(config).name.removesuffix(".yaml")
    port = env.get("BAVQ_PORT") or str(20000 + int(env["SLURM_JOB_ID"]) % 20000)
    acc = env.get("BAVQ_ACCELERATE_CONFIG") or "launch/accelerate/" + accelerate_config_name(
        backend, nnodes, nnodes * gpus)
    return ["accelerate", "launch", "--config_file", acc, "--num_machines", str(nnodes),
            "--machine_rank", str(env["SLURM_NODEID"]), "--num_processes", str(nnodes * gpus),
            "--main_process_ip", head, "--main_process_port", port,
            "-m", "bavq.train", "--config", config, "--name", name, f"train.backend={backend}",
            *([f"train.deepspeed_config={DEEPSPEED_JSON}"] if backend == "deepspeed" else []),
            *(env.get("BAVQ_EXTRA") or "").split()]


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
    script = Path(script)
    if not script.is_file():
        raise FileNotFoundError(f"no SLURM script at '{script}' (run from the repository root or pass --script)")
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
        proc = subprocess.run(["bash", str(script.resolve())], env=full, cwd=cwd, capture_output=True,
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
    """``python -m bavq.slurm {train,prep}``: print the commands the script would run."""
    p = argparse.ArgumentParser(prog="python -m bavq.slurm", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="dry-run slurm/train.sbatch")
    t.add_argument("--nodes", type=int, default=2)
    t.add_argument("--gpus-per-node", type=int, default=DEFAULT_GPUS_PER_NODE)
    t.add_argument("--backend", default="ddp", help="BAVQ_BACKEND: ddp or deepspeed")
    t.add_argument("--config", default="", help="BAVQ_CONFIG")
    t.add_argument("--name", default="", help="BAVQ_NAME")
    t.add_argument("--extra", default="", help="BAVQ_EXTRA: space-separated key.sub=value overrides")
    t.add_argument("--script", default=TRAIN_SCRIPT)
    r = sub.add_parser("prep", help="dry-run slurm/prep_shards.sbatch as an array of --tasks tasks")
    r.add_argument("--tasks", type=int, default=4)
    r.add_argument("--input", default="/datasets/imagenet", help="PREP_INPUT")
    r.add_argument("--output", default="/datasets/imagenet-shards", help="PREP_OUTPUT")
    r.add_argument("--args", default="", help="PREP_ARGS (empty: the script's default)")
    r.add_argument("--script", default=PREP_SCRIPT)
    args = p.parse_args(argv)
    try:
        if args.command == "train":
            hosts = [f"node-{i}" for i in range(args.nodes)]
            env = {**job_env(hosts, gpus_on_node=args.gpus_per_node), "BAVQ_BACKEND": args.backend,
                   "BAVQ_CONFIG": args.config, "BAVQ_NAME": args.name, "BAVQ_EXTRA": args.extra}
            run = run_script(args.script, env, hosts)
            _print_calls("batch", run, "accelerate")
            return run.returncode
        code = 0
        for task in range(args.tasks):
            env = {**array_task_env(task, args.tasks - 1), "PREP_INPUT": args.input, "PREP_OUTPUT": args.output,
                   "PREP_ARGS": args.args}
            run = run_script(args.script, env)
            _print_calls(f"task {task}", run, "bavq-prep")
            code = code or run.returncode
        return code
    except FileNotFoundError as exc:
        print(f"python -m bavq.slurm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
