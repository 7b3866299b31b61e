"""Test environment: offline trackers and hubs, DeepSpeed on CPU, project-local extension cache."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny trained run (1 process, BA-VQ, 2 steps) shared by the tokenizer and tokenize tests:
    ``RUN/final_model.safetensors`` and the DDP-layout checkpoint ``RUN/checkpoints/step_00000002``."""
    from test_train import make_image_folder, run_cli, tiny_overrides

    tmp = tmp_path_factory.mktemp("tiny_run")
    data = make_image_folder(tmp / "images", per_class=12)
    proc = run_cli(tiny_overrides(data, tmp / "out", "ba_vq", batch=8, steps=2) + ["--name=r"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out" / "r"


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    """A random LPIPS weights file in our format (test_models.random_lpips_state)."""
    from safetensors.torch import save_file
    from test_models import random_lpips_state

    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.safetensors"
    save_file(random_lpips_state(), str(path))
    return path
