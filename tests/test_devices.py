"""Every collective of a training step, an evaluation and the metrics runs on the communication
device, and no bavq code in those paths creates a tensor without saying where (tests/_device_probe.py
makes the default device differ from the model's, as on a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_train import ROOT, image_folder, tiny_overrides  # noqa: F401 - image_folder is a fixture

PROBE = ROOT / "tests" / "_device_probe.py"


def run_probe(command: str, args: list[str], out, nproc: int) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "BAVQ_PROBE_OUT": str(out),
           "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run([*launcher, str(PROBE), command, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def read_probe(out, nproc: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.slow
@pytest.mark.parametrize("quantizer", ["vq_ema", "ba_vq"])
def test_training_and_evaluation_collectives_on_comm_device(image_folder, tmp_path, quantizer):  # noqa: F811
    extra = ["quantizer.entropy_loss_weight=0.1"] if quantizer == "ba_vq" else ["quantizer.dead_code_threshold=0.5"]
    args = tiny_overrides(image_folder, tmp_path / "runs", quantizer, batch=4, steps=3) + ["--name=probe", *extra]
    proc = run_probe("train", args, tmp_path / "probe_train", 2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in read_probe(tmp_path / "probe_train", 2):
        ops = {row["op"] for row in rank["collectives"]}
        # the quantizer's statistics, the losses at log steps, the eval sums and the preemption flag
        assert {"all_reduce_sum", "all_reduce_max"} <= ops, ops
        assert all(row["device"] == "cpu" for row in rank["collectives"]), rank["collectives"]
        assert rank["trapped"] == [], f"tensors created without a device in bavq code: {rank['trapped']}"

    proc = run_probe("eval", [str(tmp_path / "runs" / "probe"), "--out", str(tmp_path / "eval.json")],
                     tmp_path / "probe_eval", 2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in read_probe(tmp_path / "probe_eval", 2):
        assert len(rank["collectives"]) >= 2 and rank["trapped"] == [], rank


PROBE_SELF_TEST = """
import os, sys
sys.path.insert(0, "tests")
import torch, torch.distributed as torch_dist
import _device_probe as probe
from bavq import dist
torch_dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
# Code compiled under a bavq file name counts as bavq code for the trap.
as_bavq = lambda src: compile(src, os.path.join(probe.BAVQ_DIR, "probe_self_test.py"), "exec")
with probe.ImplicitDeviceTrap():
    exec(as_bavq("dist.all_reduce_sum(torch.zeros(2, device=dist.comm_device())); dist.any_rank(True)"))
    print("explicit: ok")
    try:
        exec(as_bavq("dist.all_reduce_sum(torch.zeros(2))"))
        print("implicit: missed")
    except RuntimeError as exc:
        print("implicit: caught", "comm_device" in str(exc))
    print("test code:", torch.zeros(1).device)
torch_dist.destroy_process_group()
"""


def test_probe_catches_a_tensor_created_without_a_device(tmp_path):
    """The check can fail on this CPU machine: a device-less factory call in bavq code that feeds a
    collective is caught, explicit allocations pass, and code outside bavq is left alone."""
    proc = subprocess.run([sys.executable, "-c", PROBE_SELF_TEST, str(tmp_path / "store")], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["explicit: ok", "implicit: caught True", "test code: cpu"], proc.stdout
