"""Soak: N random kill/resume cycles of a 2-rank CPU run (gloo) against an uninterrupted one.

Each cycle launches the same run (torchrun, 2 ranks), lets it train for a random moment after its
first logged step, then hits it with one random fault:
  kill-rank     SIGKILL of one rank (OOM, kill -9)
  kill-launcher SIGKILL of the launcher alone (its ranks must stop by themselves)
  preempt       SIGTERM to the launcher (forwarded to the ranks: save, exit 75)
and checks how it ended (exit code, seconds until every rank was gone). The next launch must resume
from the last complete checkpoint: the steps lost are (last logged step) - (resumed step), which must
not exceed train.save_every (0 for a preemption). After the cycles the run is finished and its final
metrics and weights are compared with an uninterrupted run of the same config.

    python benchmarks/soak_resume.py --cycles 4 --steps 40 --save_every 3

Not a test: it takes minutes and its timings depend on the machine. Prints one line per cycle and
a summary; exits 1 when a cycle lost more than save_every steps, a rank outlived its bound, or the
finished run differs from the uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FAULTS = ("kill-rank", "kill-launcher", "preempt")


def make_images(root: Path, n: int = 96, size: int = 16) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n // 2):
            yy, xx = np.mgrid[0:size, 0:size] / size
            img = np.clip(np.stack([xx * (c + 1), yy, (xx + yy) / 2], -1) + 0.2 * rng.standard_normal((size, size, 3)),
                          0, 1)
            Image.fromarray((img * 255).astype(np.uint8)).save(root / f"c{c}" / f"{i:03d}.png")
    return root


def train_args(data: Path, out: Path, name: str, steps: int, save_every: int) -> list[str]:
    return ["--quantizer=ba_vq", "--codebook_size=32", f"--max_steps={steps}", "--no_wandb", f"--name={name}",
            "quantizer.code_dim=8", "model.base_channels=16", "model.num_res_blocks=1", "data.source=image_folder",
            f"data.root={data}", "data.image_size=16", "data.num_workers=0", "data.val_fraction=0.2",
            "train.batch_size=4", f"train.output_dir={out}", "train.log_every=1", "train.lr=1e-3",
            f"train.save_every={save_every}", "train.heartbeat_timeout_s=10", "log.tensorboard=false",
            "log.progress=false", "eval.batch_size=8"]


def launch(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bavq.train",
           *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return max((r["step"] for r in rows if "total" in r), default=0)


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "zombie" not in status


def resumed_step(stderr: str) -> int:
    m = re.search(r"resumed from \S+ at step (\d+)", stderr)
    return int(m.group(1)) if m else 0


def rows_written(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def one_cycle(args, run: Path, rng: random.Random, fault: str) -> dict:
    """Launch, wait for a new logged step, then a random moment, inject ``fault``; wait until every
    rank is gone. Returns the exit code, the seconds that took, the last logged step and stderr."""
    before = rows_written(run)
    proc = launch(args)
    deadline = time.time() + 600
    while rows_written(run) <= before and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 3.0))
    ranks = children(proc.pid)
    if proc.poll() is not None:  # finished (or failed) before the fault
        _, err = proc.communicate()
        return {"rc": proc.returncode, "last": logged_steps(run), "stderr": err, "stop_s": 0.0, "finished": True}
    if fault == "kill-rank" and ranks:
        os.kill(rng.choice(ranks), signal.SIGKILL)
    elif fault == "kill-launcher":
        os.kill(proc.pid, signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    t0 = time.time()
    while (proc.poll() is None or any(alive(p) for p in ranks)) and time.time() - t0 < 120:
        time.sleep(0.05)
    stop_s = time.time() - t0
    _, err = proc.communicate()
    return {"rc": proc.returncode, "last": logged_steps(run), "stderr": err, "stop_s": stop_s, "finished": False}


def final_of(run: Path) -> dict:
    return json.loads((run / "final_metrics.json").read_text())


def weights_equal(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "final_model.safetensors")), load_file(str(b / "final_model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save_every", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bound_s", type=float, default=30.0, help="seconds within which every rank must be gone")
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory(prefix="bavq-soak-") as tmp:
        tmp = Path(tmp)
        data = make_images(tmp / "images")
        ref = launch(train_args(data, tmp, "ref", a.steps, a.save_every))
        _, err = ref.communicate(timeout=1800)
        if ref.returncode != 0:
            print(err[-3000:])
            return 1
        args, run = train_args(data, tmp, "soak", a.steps, a.save_every), tmp / "soak"
        survived, lost_beyond, slow_stops, pending = 0, 0, 0, None

        def report(stderr: str) -> None:
            """The launch after a fault says where it resumed: steps lost = last logged - resumed."""
            nonlocal lost_beyond
            cycle, fault, res = pending
            resumed = resumed_step(stderr)
            lost, allowed = res["last"] - resumed, 0 if fault == "preempt" else a.save_every
            lost_beyond += lost > allowed
            print(f"cycle {cycle}: {fault:13s} rc {res['rc']:4d}  all ranks gone after {res['stop_s']:5.1f} s  "
                  f"last logged step {res['last']:3d}  resumed at {resumed:3d}  steps lost {lost} (allowed {allowed})",
                  flush=True)

        for cycle in range(1, a.cycles + 1):
            fault = rng.choice(FAULTS)
            res = one_cycle(args, run, rng, fault)
            if pending is not None:
                report(res["stderr"])
            if res["finished"]:
                pending = None
                print(f"cycle {cycle}: the run ended before the fault (rc {res['rc']})")
                break
            survived += 1
            slow_stops += res["stop_s"] > a.bound_s
            pending = (cycle, fault, res)
        done = launch(args)
        _, err = done.communicate(timeout=1800)
        if pending is not None:
            report(err)
        if done.returncode != 0:
            print(err[-3000:])
            return 1
        f_ref, f_soak = final_of(tmp / "ref"), final_of(run)
        same = weights_equal(tmp / "ref", run)
        print(f"cycles survived {survived}/{a.cycles}; checkpoints lost beyond the save interval: {lost_beyond}; "
              f"stops slower than {a.bound_s:.0f} s: {slow_stops}")
        for key in ("steps", "samples_seen", "psnr", "codebook_usage", "perplexity"):
            print(f"  {key:15s} uninterrupted {f_ref[key]!s:>22}  soaked {f_soak[key]!s:>22}")
        print(f"  final weights bitwise equal: {same}")
        ok = lost_beyond == 0 and slow_stops == 0 and same and f_ref["steps"] == f_soak["steps"]
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
