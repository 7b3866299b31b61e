"""Checkpoints and resume: exact continuation, preemption, kills during a save, damaged checkpoints,
config guards, and DeepSpeed ZeRO-2 save / resume / export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import ROOT, make_image_folder, read_jsonl, run_cli, tiny_overrides

from bavq.tokenizer import Tokenizer
from bavq.train.checkpoint import list_checkpoints
from bavq.weights import verify_checkpoint


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "images")


def loss_rows(run: Path) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if "total" in r]


def assert_same_run(a: Path, b: Path) -> None:
    """Bitwise: every logged loss and every final weight and codebook buffer."""
    rows_a, rows_b = loss_rows(a), loss_rows(b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        assert ra["total"] == rb["total"] and ra["samples_seen"] == rb["samples_seen"], (ra, rb)
    wa, wb = load_file(str(a / "final_model.safetensors")), load_file(str(b / "final_model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("quantizer, nproc", [("vq_ema", 1), ("ba_vq", 1), ("vq_ema", 2), ("ba_vq", 2)])
def test_stopped_and_resumed_run_equals_uninterrupted(image_folder, tmp_path, quantizer, nproc):
    args = tiny_overrides(image_folder, tmp_path, quantizer, batch=8 // nproc, steps=6) + [
        "quantizer.dead_code_threshold=0.5", "train.save_every=2"]
    full = run_cli(args + ["--name=full"], nproc=nproc)
    assert full.returncode == 0, full.stderr[-3000:]
    first = run_cli(args + ["--name=split", "train.stop_at_step=3"], nproc=nproc)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped at step 3" in first.stderr and not (tmp_path / "split" / "final_metrics.json").exists()
    second = run_cli(args + ["--name=split"], nproc=nproc)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "at step 3" in second.stderr
    assert_same_run(tmp_path / "full", tmp_path / "split")


def start_training(args: list[str], nproc: int = 1) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bavq.train", *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "bavq.train", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180.0, interval: float = 0.05) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the training run")
        time.sleep(interval)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_saves_and_restart_continues(image_folder, tmp_path, nproc):
    args = tiny_overrides(image_folder, tmp_path, "ba_vq", batch=8 // nproc, steps=400) + ["--name=pre"]
    run = tmp_path / "pre"
    proc = start_training(args, nproc)
    wait_for(lambda: (run / "metrics.jsonl").exists() and len(loss_rows(run)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to every rank
    _, err = proc.communicate(timeout=180)
    if nproc == 1:
        assert proc.returncode == 75, err[-3000:]
    assert (run / "PREEMPTED").is_file(), err[-3000:]
    step = int((run / "PREEMPTED").read_text())
    assert step >= 3 and (run / "checkpoints" / f"step_{step:08d}").is_dir()
    assert verify_checkpoint(run / "checkpoints" / f"step_{step:08d}") is None
    again = run_cli([a for a in args if not a.startswith("--max_steps")] + [f"--max_steps={step + 2}"], nproc=nproc)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at step {step}" in again.stderr and not (run / "PREEMPTED").exists()
    assert json.loads((run / "final_metrics.json").read_text())["steps"] == step + 2


@pytest.mark.slow
def test_sigkill_during_save_keeps_previous_checkpoint(image_folder, tmp_path):
    args = tiny_overrides(image_folder, tmp_path, "vq_ema", batch=8, steps=400) + [
        "--name=kill", "train.save_every=1", "train.keep_last=3", "model.base_channels=64"]
    root = tmp_path / "kill" / "checkpoints"
    for _attempt in range(3):  # the kill must land while a checkpoint is being written
        proc = start_training(args)
        wait_for(lambda: len(list_checkpoints(root)) >= 2 and any(root.glob(".tmp-step_*")), proc, interval=0.002)
        proc.kill()
        proc.communicate()
        if any(root.glob(".tmp-step_*")):
            break
    else:
        pytest.fail("could not kill the run while it was writing a checkpoint")
    latest = root / (root / "latest").read_text().strip()
    assert verify_checkpoint(latest) is None  # latest still names a complete checkpoint
    step = int(latest.name.split("_")[1])
    again = run_cli([a for a in args if not a.startswith("--max_steps")] + [f"--max_steps={step + 1}"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at step {step}" in again.stderr
    assert not any(root.glob(".tmp-step_*"))  # the partial save was cleaned up


@pytest.mark.slow
def test_damaged_checkpoint_is_refused_and_previous_used(image_folder, tmp_path):
    args = tiny_overrides(image_folder, tmp_path, "ba_vq", batch=8, steps=4) + [
        "--name=dmg", "train.save_every=2", "train.keep_last=3"]
    assert run_cli(args).returncode == 0
    root = tmp_path / "dmg" / "checkpoints"
    damaged = root / "step_00000004"
    victim = max((p for p in damaged.rglob("*") if p.is_file() and p.name != "MANIFEST.json"),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    explicit = run_cli(args + [f"--resume={damaged}"])
    assert explicit.returncode == 2 and "refusing checkpoint" in explicit.stderr
    assert "Traceback" not in explicit.stderr
    auto = run_cli([a for a in args if not a.startswith("--max_steps")] + ["--max_steps=5"])
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "skipping damaged checkpoint" in auto.stderr and "step_00000002 at step 2" in auto.stderr


@pytest.mark.slow
def test_resume_with_different_quantizer_is_refused(image_folder, tmp_path):
    args = tiny_overrides(image_folder, tmp_path, "ba_vq", batch=8, steps=2) + ["--name=guard"]
    assert run_cli(args).returncode == 0
    changed = run_cli([a for a in args if not a.startswith("--codebook_size")] + ["--codebook_size=64"])
    assert changed.returncode == 2
    assert "resume refused: quantizer.num_codes" in changed.stderr and "Traceback" not in changed.stderr
    fresh = run_cli(args + ["--resume=none"])  # starting over would overwrite the run's checkpoints
    assert fresh.returncode == 2 and "already holds checkpoints" in fresh.stderr


@pytest.mark.slow
def test_deepspeed_zero2_gan_trains_saves_resumes_and_exports(image_folder, tmp_path):
    args = tiny_overrides(image_folder, tmp_path, "ba_vq", batch=4, steps=3) + [
        "--name=ds", "train.backend=deepspeed", "loss.disc_weight=0.5", "model.disc_layers=2"]
    first = run_cli(args + ["train.stop_at_step=2"], nproc=2, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "ds" / "checkpoints" / "step_00000002"
    assert (ckpt / "pytorch_model").is_dir() and (ckpt / "pytorch_model_1").is_dir()  # gen and disc shards
    # why the README tells zero_to_fp32 users to pass --tag pytorch_model: DeepSpeed's own pointer
    # names the engine saved last, the discriminator's
    assert (ckpt / "latest").read_text().strip() == "pytorch_model_1"
    second = run_cli(args, nproc=2, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "at step 2" in second.stderr
    final = json.loads((tmp_path / "ds" / "final_metrics.json").read_text())
    assert final["world_size"] == 2 and final["steps"] == 3
    last = tmp_path / "ds" / "checkpoints" / "step_00000003"
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "bavq.export", str(last), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = load_file(str(out / "model.safetensors"))
    live = load_file(str(tmp_path / "ds" / "final_model.safetensors"))
    for key, value in live.items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=0, msg=key)
    # the ZeRO checkpoint, the run folder and the exported folder are the same tokenizer
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    indices = Tokenizer.from_pretrained(last).encode(x)
    for source in (tmp_path / "ds", out):
        torch.testing.assert_close(Tokenizer.from_pretrained(source).encode(x), indices, rtol=0, atol=0)
