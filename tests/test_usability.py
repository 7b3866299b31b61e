"""What a new user meets first: launcher mistakes, one-line errors, failed starts that leave nothing
behind, documented data locations, progress in batch logs (issue 13, item 5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bavq import dist
from bavq.cli import fail
from bavq.paths import removed_on_failure

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU")}
    return {**env, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("python -m bavq.train: error:")]


# ----------------------------------------------------------------------------- launchers
@pytest.mark.parametrize("env, dropped", [
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, True),  # --cpu, N=2
    ({"ACCELERATE_USE_CPU": "True"}, False),  # --cpu, one process: no rendezvous variables at all
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2"}, False),  # a real group
    ({"MASTER_ADDR": "127.0.0.1"}, False),  # no Accelerate CPU launcher
])
def test_cpu_launcher_signature(monkeypatch, env, dropped):
    for key in ("ACCELERATE_USE_CPU", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert dist.cpu_launcher_dropped_processes() is dropped


def test_accelerate_cpu_with_two_processes_is_refused_and_leaves_no_folder(tmp_path):
    """The real launcher (its environment is what the check reads): one error line, no run folder."""
    out = tmp_path / "experiments"
    cmd = [str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "bavq.train", "--config",
           "configs/demo.yaml", "--name", "cpu2", "--no_wandb", f"train.output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "--multi_gpu" in lines[0], proc.stderr[-3000:]
    assert not out.exists()


def test_user_error_is_printed_once_under_torchrun_and_launcher_exit_status(tmp_path):
    """Both ranks meet the mistake; one line is printed. torchrun exits 1 (not our 2) but logs each
    rank's "exitcode: 2" — the measured behaviour the README documents."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "bavq.train", "--max_steps=1", "--no_wandb", "quantizer.no_such_key=3", f"train.output_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "quantizer.no_such_key" in lines[0], proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr


def test_fail_prints_on_local_rank_zero_only(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert fail("bavq-x", "bad") == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert fail("bavq-x", "bad") == 2
    assert capsys.readouterr().err == "bavq-x: error: bad\n"


# ----------------------------------------------------------------------------- failed starts
def test_removed_on_failure_removes_only_what_the_block_created(tmp_path):
    kept = tmp_path / "old"
    (kept / "run").mkdir(parents=True)
    with pytest.raises(ValueError):
        with removed_on_failure(kept / "run"):
            (kept / "run" / "x").write_text("1")
            raise ValueError
    assert (kept / "run" / "x").is_file()  # existed before: untouched
    new = tmp_path / "a" / "b" / "run"
    with pytest.raises(KeyboardInterrupt):
        with removed_on_failure(new):
            new.mkdir(parents=True)
            raise KeyboardInterrupt
    assert not (tmp_path / "a").exists()  # the outermost created folder goes
    with removed_on_failure(new):
        new.mkdir(parents=True)
    assert new.is_dir()  # success keeps it


def test_trainer_failed_start_leaves_no_run_folder(tmp_path):
    from bavq.config import load_config
    from bavq.train.trainer import Trainer

    out = tmp_path / "experiments"
    cfg = load_config(None, ["data.source=fashion_mnist", f"data.root={tmp_path / 'missing'}", "data.download=false",
                             "train.max_steps=1", "log.wandb=false", "log.tensorboard=false",
                             f"train.output_dir={out}", "train.name=x"])
    from bavq.config import ConfigError

    with pytest.raises(ConfigError):
        Trainer(cfg)
    assert not out.exists()


def test_failed_cifar_download_leaves_no_folder(tmp_path, monkeypatch):
    import torchvision.datasets

    from bavq.config import ConfigError
    from bavq.data import sources

    def offline(root, train=True, download=False):  # what torchvision does without a network
        Path(root).mkdir(parents=True, exist_ok=True)
        raise RuntimeError("Error downloading cifar-10-python.tar.gz")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.setenv("BAVQ_DATA", str(tmp_path / "data"))
    sources.load_cifar10.cache_clear()
    with pytest.raises(ConfigError, match="BAVQ_DATA"):
        sources.load_cifar10("", download=True)
    assert not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------- one truth for data locations
def test_default_data_location_is_documented_as_the_code_uses_it(tmp_path, monkeypatch):
    from bavq.config import field_docs
    from bavq.data.sources import default_root

    monkeypatch.setenv("BAVQ_DATA", str(tmp_path))
    assert default_root("cifar10") == tmp_path / "cifar10"
    monkeypatch.delenv("BAVQ_DATA")
    assert default_root("cifar10") == Path.home() / ".cache" / "bavq" / "cifar10"
    default, doc = field_docs()["data.root"]
    assert "$BAVQ_DATA/SOURCE" in doc and "~/.cache/bavq" in doc
    readme = (ROOT / "README.md").read_text()
    assert f"| `data.root` | `{default}` | {doc} |" in readme  # the README row is the generated one
    assert "data/cifar10" not in readme
