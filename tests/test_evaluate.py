"""bavq-eval: whole-split evaluation over 1 and 2 ranks equals a direct computation from indices."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _builders import eval_loader
from test_fid import SMALL_SIZE, direct_features, random_inception_state, scipy_fid
from test_train import ROOT, make_image_folder, run_cli, tiny_overrides

from bavq.models import LPIPS
from bavq.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalrun")
    data = make_image_folder(tmp / "images", per_class=30)
    proc = run_cli(tiny_overrides(data, tmp / "out", "ba_vq", batch=8, steps=3) + ["--name=r"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out" / "r"


def direct_histogram(run) -> tuple[np.ndarray, int]:
    tokenizer = Tokenizer.from_pretrained(run)
    k = tokenizer.num_codes
    hist, images, keys = np.zeros(k, dtype=np.int64), 0, []
    for x, batch_keys in eval_loader(tokenizer.config, 0, 1):
        hist += np.bincount(tokenizer.encode(x).flatten().numpy(), minlength=k)
        images += x.shape[0]
        keys += list(batch_keys)
    assert len(keys) == len(set(keys)) == images
    return hist, images


def run_eval(run, out, nproc: int, overrides: tuple[str, ...] = ()) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run([*launcher, "-m", "bavq.evaluate", str(run), "--out", str(out), *overrides], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_eval_matches_direct_computation(trained_run, tmp_path, nproc):
    hist, images = direct_histogram(trained_run)
    result = run_eval(trained_run, tmp_path / "eval.json", nproc)
    saved = np.load(tmp_path / "eval.histogram.npy")
    np.testing.assert_array_equal(saved, hist)  # every held-out image counted exactly once
    assert result["images"] == images and result["world_size"] == nproc
    p = hist[hist > 0] / hist.sum()
    assert result["codebook_usage"] == pytest.approx((hist > 0).mean())
    assert result["dead_codes"] == int((hist == 0).sum())
    assert result["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-5)
    final = json.loads((trained_run / "final_metrics.json").read_text())
    assert result["codebook_usage"] == pytest.approx(final["codebook_usage"])
    assert result["psnr"] == pytest.approx(final["psnr"], rel=1e-5)


def test_eval_bad_checkpoint_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bavq.evaluate", str(tmp_path / "nothing")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def direct_reconstructions(run) -> tuple[torch.Tensor, torch.Tensor]:
    """Every held-out image and its reconstruction (clamped to [-1, 1], as evaluation does), one process."""
    tokenizer = Tokenizer.from_pretrained(run)
    images, recons = [], []
    for x, _keys in eval_loader(tokenizer.config, 0, 1):
        images.append(x)
        recons.append(tokenizer.reconstruct(x).float().clamp(-1, 1))
    return torch.cat(images), torch.cat(recons)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(random_inception_state(), path)
    return path


@pytest.fixture(scope="module")
def direct_rfid_lpips(trained_run, inception_file, lpips_file):
    images, recon = direct_reconstructions(trained_run)
    rfid = scipy_fid(direct_features(inception_file, images), direct_features(inception_file, recon))
    with torch.no_grad():
        lpips = LPIPS.from_file(lpips_file)(images, recon).double().mean().item()  # per image, then mean
    return rfid, lpips, images.shape[0]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_eval_rfid_and_lpips_match_direct_computation(trained_run, tmp_path, inception_file, lpips_file,
                                                      direct_rfid_lpips, nproc):
    rfid, lpips, images = direct_rfid_lpips
    result = run_eval(trained_run, tmp_path / "eval.json", nproc,
                      (f"eval.inception_weights={inception_file}", f"eval.inception_input_size={SMALL_SIZE}",
                       f"loss.lpips_weights={lpips_file}"))
    assert result["images"] == images and result["world_size"] == nproc  # every held-out image once
    assert result["rfid"] > 0 and result["rfid"] == pytest.approx(rfid, rel=1e-5)
    assert result["lpips"] > 0 and result["lpips"] == pytest.approx(lpips, rel=1e-5)
    assert "rfid_reason" not in result and "lpips_reason" not in result


def test_eval_without_weights_reports_null_with_reason(trained_run):
    final = json.loads((trained_run / "final_metrics.json").read_text())
    assert final["rfid"] is None and "eval.inception_weights" in final["rfid_reason"]
    assert final["lpips"] is None and "loss.lpips_weights" in final["lpips_reason"]


@pytest.mark.parametrize("key", ["eval.inception_weights", "loss.lpips_weights"])
def test_eval_missing_weights_file_is_one_line(trained_run, tmp_path, key):
    proc = subprocess.run([sys.executable, "-m", "bavq.evaluate", str(trained_run), "--out", str(tmp_path / "e.json"),
                           f"{key}={tmp_path / 'missing.pth'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert key in proc.stderr and "Traceback" not in proc.stderr
