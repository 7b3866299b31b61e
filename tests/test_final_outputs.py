"""final_model.* are written atomically: a kill in the middle of writing them leaves the previous
complete files (or none), never a truncated file that bavq-eval would prefer over a checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file
from test_train import ROOT

SCRIPT = r"""
import sys, time
from pathlib import Path
import numpy as np, torch
import safetensors.torch
from bavq.config import load_config
from bavq.evaluation import EvalResult, write_final_outputs
from bavq.models import build_model
from bavq.quantizers import build_quantizer

run, value, hang = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "hang"
cfg = load_config(None, ["train.max_steps=1", "quantizer.num_codes=16", "quantizer.code_dim=4",
                         "model.base_channels=8", "model.num_res_blocks=1", "data.image_size=16"])
model = build_model(cfg.model, cfg.quantizer, build_quantizer(cfg.quantizer), image_size=cfg.data.image_size)
with torch.no_grad():
    for p in model.parameters():
        p.fill_(value)
result = EvalResult(codebook={"codebook_usage": 1.0}, psnr=1.0, ssim=1.0, images=1, rec_l1=0.0,
                    histogram=np.ones(16, dtype=np.int64))
if hang:  # write half of the bytes, then stall: the parent kills us mid-write
    real = safetensors.torch.save_file
    def stalled(state, path, *a, **k):
        real(state, path, *a, **k)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        print("WRITING", flush=True)
        time.sleep(600)
    safetensors.torch.save_file = stalled
write_final_outputs(run, cfg, model, result, {}, is_main=True)
print("DONE", flush=True)
"""


def _write(run, value: float, hang: bool) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(run), str(value), "hang" if hang else "ok"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_kill_while_writing_final_model_keeps_the_previous_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    first = _write(run, 0.5, hang=False)
    assert first.wait(timeout=120) == 0 and "DONE" in first.stdout.read()
    before = load_file(str(run / "final_model.safetensors"))

    second = _write(run, 0.25, hang=True)
    deadline = time.time() + 120
    line = second.stdout.readline()
    assert line.strip() == "WRITING" and time.time() < deadline
    second.send_signal(signal.SIGKILL)
    second.wait(timeout=30)
    after = load_file(str(run / "final_model.safetensors"))  # complete and still the first version
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    weights = [v for k, v in after.items() if "weight" in k and v.is_floating_point()]
    assert weights and all(float(w.flatten()[0]) == 0.5 for w in weights)


def test_first_write_killed_leaves_no_final_model(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = _write(run, 0.5, hang=True)
    assert proc.stdout.readline().strip() == "WRITING"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run / "final_model.safetensors").exists()
