"""Evaluation is independent of the training backend: a DeepSpeed ZeRO-2 bf16 run on 2 CPU ranks
reaches its final metrics with fp32 final weights, and bavq-eval of its DeepSpeed checkpoint (1
process and 2 ranks, no DeepSpeed engine) equals a direct evaluation of the same weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _builders import eval_loader
from safetensors.torch import load_file
from test_evaluate import run_eval
from test_train import image_folder, run_cli, tiny_overrides  # noqa: F401 - image_folder is a fixture

from bavq.config import load_config
from bavq.evaluation import evaluate_model
from bavq.models import plain_generator
from bavq.weights import load_generator_state


@pytest.mark.slow
def test_deepspeed_bf16_run_and_backend_free_evaluation(image_folder, tmp_path):  # noqa: F811
    args = tiny_overrides(image_folder, tmp_path, "ba_vq", batch=4, steps=3) + [
        "--name=dsbf16", "train.backend=deepspeed", "train.mixed_precision=bf16"]
    proc = run_cli(args, nproc=2, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "dsbf16"
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["world_size"] == 2 and np.isfinite(final["psnr"]) and final["codebook_usage"] > 0
    weights = load_file(str(run / "final_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())

    ckpt = run / "checkpoints" / "step_00000003"
    assert (ckpt / "pytorch_model").is_dir()  # ZeRO shards: the path bavq-eval must read without DeepSpeed
    cfg = load_config(run / "config.yaml")
    state, _ = load_generator_state(ckpt)
    direct = evaluate_model(plain_generator(cfg, state), eval_loader(cfg, 0, 1), cfg, "cpu")
    for nproc in (1, 2):
        got = run_eval(ckpt, tmp_path / f"eval{nproc}.json", nproc)
        assert got["world_size"] == nproc and got["images"] == direct.images
        for key in ("psnr", "ssim", "codebook_usage", "perplexity", "rec_l1"):
            assert got[key] == pytest.approx(direct.summary()[key], rel=1e-6), (nproc, key)
        hist = np.load(tmp_path / f"eval{nproc}.histogram.npy")
        np.testing.assert_array_equal(hist, direct.histogram)
