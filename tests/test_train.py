"""The real training entry point on tiny data: 1 process, 2 processes (gloo), and their equality."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def make_image_folder(root: Path, per_class: int = 40, size: int = 16) -> Path:
    """Two classes of small RGB images with structure (smooth gradients plus noise)."""
    rng = np.random.default_rng(0)
    for c in range(2):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            yy, xx = np.mgrid[0:size, 0:size] / size
            base = np.stack([xx * (c + 1), yy, (xx + yy) / 2], axis=-1)
            img = np.clip(base + 0.2 * rng.standard_normal((size, size, 3)), 0, 1)
            Image.fromarray((img * 255).astype(np.uint8)).save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "images")


def tiny_overrides(data_root: Path, out: Path, quantizer: str, batch: int, steps: int = 4) -> list[str]:
    return [
        f"--quantizer={quantizer}", "--codebook_size=32", f"--max_steps={steps}", "--no_wandb",
        "quantizer.code_dim=8", "quantizer.chunk_size=24", "model.base_channels=16", "model.num_res_blocks=1",
        "data.source=image_folder", f"data.root={data_root}", "data.image_size=16", "data.num_workers=0",
        "data.val_fraction=0.2", f"train.batch_size={batch}", f"train.output_dir={out}", "train.log_every=1",
        "train.lr=1e-3", "train.grad_clip=0", "log.tensorboard=false", "log.progress=false", "eval.batch_size=8",
    ]


def run_cli(args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "bavq.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "bavq.train", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_outputs(run: Path, world_size: int, steps: int) -> dict:
    for name in ("config.yaml", "metrics.jsonl", "final_metrics.json", "final_model.safetensors",
                 "final_model.pt", "code_histogram.npy", "reconstructions.png"):
        assert (run / name).is_file(), f"{name} missing in {run}"
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["world_size"] == world_size and final["steps"] == steps
    for key in ("codebook_usage", "perplexity", "normalized_entropy", "psnr", "ssim", "wall_seconds"):
        assert isinstance(final[key], float) and np.isfinite(final[key]), key
    assert 0 < final["codebook_usage"] <= 1 and final["perplexity"] >= 1
    assert final["rfid"] is None and "Inception" in final["rfid_reason"]
    assert final["dead_codes"] == round(32 * (1 - final["codebook_usage"]))
    assert (run / "checkpoints" / "latest").is_file()
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "total" in r] == list(range(1, steps + 1))
    return final


@pytest.mark.slow
@pytest.mark.parametrize("quantizer", ["vq_ema", "ba_vq"])
def test_two_ranks_equal_one_process_with_double_batch(image_folder, tmp_path, quantizer):
    one = run_cli(tiny_overrides(image_folder, tmp_path / "one", quantizer, batch=8) + ["--name=r"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(tiny_overrides(image_folder, tmp_path / "two", quantizer, batch=4) + ["--name=r"], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    final_one = check_outputs(tmp_path / "one" / "r", world_size=1, steps=4)
    final_two = check_outputs(tmp_path / "two" / "r", world_size=2, steps=4)
    # every rank held the same codebook at the end (checksums gathered from all ranks)
    sums = final_two["codebook_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    rows_one = [r for r in read_jsonl(tmp_path / "one" / "r" / "metrics.jsonl") if "total" in r]
    rows_two = [r for r in read_jsonl(tmp_path / "two" / "r" / "metrics.jsonl") if "total" in r]
    for a, b in zip(rows_one, rows_two):
        assert a["total"] == pytest.approx(b["total"], rel=1e-5, abs=1e-6), (a, b)
        assert a["samples_seen"] == b["samples_seen"]
    w1 = load_file(str(tmp_path / "one" / "r" / "final_model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "r" / "final_model.safetensors"))
    for key in ("quantizer.codebook", "quantizer.ema_count", "quantizer.ema_sum"):
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-5, atol=1e-6)
    assert final_one["images"] == final_two["images"]  # evaluation saw each held-out image once


@pytest.mark.parametrize("args, needle", [
    (["--quantizer=pq"], "--quantizer"),
    (["--codebook_size=1", "--max_steps=1"], "quantizer.num_codes"),
    (["--max_steps=1", "data.source=image_folder", "data.root=/no/such/folder"], "/no/such/folder"),
    (["--max_steps=1", "quantizer.no_such_key=3"], "quantizer.no_such_key"),
    (["--max_steps=1", "--config=/no/such.yaml"], "/no/such.yaml"),
])
def test_bad_command_lines_exit_2_with_one_line(tmp_path, args, needle):
    proc = run_cli(args + ["--no_wandb", f"train.output_dir={tmp_path}"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
