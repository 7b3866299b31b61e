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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ----------------------------------------------------------------------------- progress
def test_plain_progress_off_a_terminal_prints_lines_without_carriage_returns(tmp_path):
    import io

    from bavq.progress import PlainProgress, progress

    log = io.StringIO()  # not a TTY, like a SLURM log
    bar = progress(total=4, desc="job", unit="step", file=log, every=0.0, mininterval=0.5)
    assert isinstance(bar, PlainProgress)
    with bar:
        for _ in range(4):
            bar.update(1)
            bar.set_postfix(loss="0.5", refresh=False)
    text = log.getvalue()
    assert "\r" not in text and text.count("\n") == 4
    assert text.splitlines()[1].startswith("job: 2/4 step (50%)") and "left" in text and "loss=0.5" in text
    quiet = io.StringIO()
    with progress(total=10, desc="job", file=quiet, every=3600) as bar:  # only the closing line
        bar.update(3)
    assert quiet.getvalue().startswith("job: 3/10") and quiet.getvalue().count("\n") == 1

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    from tqdm import tqdm

    assert isinstance(progress(total=1, file=Terminal()), tqdm)
    silent = progress(total=1, enabled=False)
    silent.update(1), silent.close()


def test_eval_progress_callback_sees_every_batch():
    import torch

    from bavq.config import load_config
    from bavq.evaluation import evaluate_model
    from bavq.models import build_model
    from bavq.quantizers import build_quantizer

    cfg = load_config(None, ["quantizer.num_codes=8", "quantizer.code_dim=4", "model.base_channels=8",
                             "model.num_res_blocks=1", "data.image_size=8", "train.max_steps=1"])
    model = build_model(cfg.model, cfg.quantizer, build_quantizer(cfg.quantizer), image_size=cfg.data.image_size)
    loader = [(torch.rand(2, 3, 8, 8) * 2 - 1, None) for _ in range(3)]
    seen = []

    def progress(it):
        for item in it:
            seen.append(1)
            yield item

    result = evaluate_model(model, loader, cfg, "cpu", progress=progress)
    assert len(seen) == 3 and result.images == 6


def test_deepspeed_cpu_extension_build_is_announced_once(tmp_path, monkeypatch, capsys):
    pytest.importorskip("deepspeed")
    from bavq.train import deepspeed_backend as dsb

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    folder = dsb.pending_cpu_extension_build()
    assert folder is not None and Path(folder).parent == tmp_path
    dsb.announce_extension_build()
    assert "compiling" in capsys.readouterr().err
    (Path(folder) / "deepspeed_shm_comm.so").write_bytes(b"")  # built by an earlier launch
    assert dsb.pending_cpu_extension_build() is None


def test_sweep_says_where_logs_are_and_reports_each_cell(tmp_path, capsys, monkeypatch):
    from test_sweep import fake_trainer, write_sweep

    from bavq import sweep as sweep_mod

    calls: list[str] = []
    monkeypatch.setattr(sweep_mod.subprocess, "run", fake_trainer(set(), calls))
    assert sweep_mod.main([str(write_sweep(tmp_path)), "--variants", "vq", "--only-k", "16"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("bavq-sweep: 2 of 2 cells to run") and str(tmp_path / "exp" / "sweep_logs") in out[0]
    assert out[1].startswith("[1/2] t_vq_k16_s0: running (log ") and "left for 1 cells" in out[2]


# ----------------------------------------------------------------------------- bavq-prep
def _images(root: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image

    (root / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "a" / f"{i:02d}.png")
    return root


def test_prep_image_folder_holds_out_the_trainers_split_by_default(tmp_path, capsys):
    import json

    from bavq.config import DataConfig
    from bavq.data.sources import holdout_split
    from bavq.prep import build_parser, main

    root = _images(tmp_path / "img", 20)
    assert main(["--source", "image_folder", "--input", str(root), "--output", str(tmp_path / "s"),
                 "--workers", "0", "--no-shuffle"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "bavq-prep: 20/20 img (100%)" in err  # plain progress line in a log
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    _, val = holdout_split(20, DataConfig.val_fraction)  # what the trainer holds out of the same folder
    assert manifest["splits"]["val"]["count"] == len(val) == 2
    helptext = build_parser()._subparsers._group_actions[0].choices["write"].format_help()
    assert "(default: 1000)" in helptext and "(default: 0.1" in helptext and "(default: keep)" in helptext


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupted_parallel_prep_ends_with_one_line_and_stays_resumable(tmp_path, how):
    import pickle
    import signal
    import time

    import numpy as np

    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    data = np.random.default_rng(0).integers(0, 256, (2000, 3072)).astype(np.uint8)
    for name in ("data_batch_1", "test_batch"):
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data, "labels": [0] * len(data)}, fh)
    out = tmp_path / "shards"
    cmd = [sys.executable, "-c", "import sys; from bavq.prep import main; sys.exit(main())", "--source",
           "cifar10", "--input", str(tmp_path / "cifar"), "--output", str(out), "--no-download", "--resize", "96",
           "--format", "png", "--samples_per_shard", "50", "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not list(out.glob("train-*.tar")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "finished before it could be interrupted"
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches every process of the group
    else:
        proc.send_signal(signal.SIGTERM)  # kill / scancel of the main process
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (130 if how == "ctrl-c" else 143), err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("bavq-prep: interrupted (") and "rerun the same command" in lines[-1], err
    assert len(lines) <= 3, err  # the summary of what was written, the last progress line, ours
    assert not list(out.glob(".*.tmp"))  # no half-written shard left behind
    # the bookkeeping a rerun resumes from: finished shards recorded (a rerun keeps them; a shard
    # renamed but not yet recorded is rewritten), no sizes.json until every shard exists
    records = list((out / ".bavq-prep").glob("train-*.tar.json"))
    assert records and all((out / r.name[:-5]).is_file() for r in records)
    assert not (out / "sizes.json").exists()


# ----------------------------------------------------------------------------- bavq-report labels and legends
def _figures(monkeypatch) -> list:
    """Every figure bavq-report saves, kept open for inspection."""
    from matplotlib.figure import Figure

    saved, original = [], Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    monkeypatch.setattr("matplotlib.pyplot.close", lambda *a: None)
    return saved


def test_report_labels_stay_short_and_legends_stay_off_the_data(tmp_path, monkeypatch):
    from test_report import make_run

    from bavq.report import write_report

    runs = tmp_path / "runs"
    # a sweep cell: labelled with the sweep variant's name, whatever its config
    cell = make_run(runs, "fm_ba_l1_k64_s0", quantizer="ba_vq", threshold=0.5)
    (cell / "sweep.json").write_text('{"variant": "ba_vq_l1", "num_codes": 64, "seed": 0}')
    # plain runs of one quantizer label that differ in several long settings: numbered, explained in a note
    for i, (steps, growth) in enumerate([(10000, 0.001), (300, 0.012)]):
        for seed in (0, 1):
            make_run(runs, f"tune{i}_s{seed}", seed=seed, threshold=0.5, extra=[
                f"quantizer.beta_anneal_steps={steps}", f"quantizer.max_beta_growth={growth}",
                "train.warmup_steps=7" if i else "train.warmup_steps=0"])
    figures = _figures(monkeypatch)
    result = write_report([str(runs)], tmp_path / "out")
    variants = {g["variant"] for g in result["groups"]}
    assert variants == {"ba_vq_l1", "VQ-EMA + restart [#1]", "VQ-EMA + restart [#2]"}
    assert len(result["label_notes"]) == 2 and "quantizer.beta_anneal_steps=300" in " ".join(result["label_notes"])
    assert "[#1] = " in (tmp_path / "out" / "index.md").read_text()
    assert figures
    for fig in figures:
        renderer = fig.canvas.get_renderer()
        legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        for legend in legends:
            box = legend.get_window_extent(renderer)
            assert legend.get_texts()[0].get_fontsize() >= 8
            for ax in fig.axes:
                assert not box.overlaps(ax.get_window_extent(renderer)), "legend over the axes"
            if legend in fig.legends:  # below the panels, no wider than the figure
                assert box.width <= fig.bbox.width + 1

    result = write_report([str(runs)], tmp_path / "out2", label_keys=["quantizer.name", "quantizer.max_beta_growth"])
    assert "name=vq_ema, max_beta_growth=0.012" in {g["variant"] for g in result["groups"]}


# ----------------------------------------------------------------------------- TensorBoard
def test_tensorboard_gets_final_evaluation_media_and_one_hparams_folder(tmp_path):
    pytest.importorskip("tensorboard")
    import numpy as np
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bavq.evaluation import EvalResult
    from bavq.train.run_logger import RunLogger

    def launch():  # one launch (fresh or resumed) of the same run folder
        acc = Accelerator(cpu=True, log_with=["tensorboard"],
                          project_config=ProjectConfiguration(project_dir=str(tmp_path), logging_dir=str(tmp_path)))
        return RunLogger(acc, tmp_path, ["tensorboard"], "proj", {"train": {"lr": 1e-3}, "data": {"root": ""}}, "r")

    for _ in range(2):
        logger = launch()
        logger.close()
    logger = launch()
    result = EvalResult(codebook={"codebook_usage": 0.5, "perplexity": 3.0}, psnr=20.0, ssim=0.5, images=4,
                        rec_l1=0.1, rfid_reason="none", histogram=np.array([5, 0, 3, 1]),
                        samples={"images": torch.zeros(2, 3, 4, 4), "recon": torch.ones(2, 3, 4, 4)})
    logger.log_evaluation(7, result)
    logger.close()
    board = tmp_path / "proj"
    assert [p.name for p in board.iterdir() if p.is_dir()] == ["hparams"]  # once per run, fixed place
    events = EventAccumulator(str(board), size_guidance={"images": 0, "histograms": 0}).Reload()
    assert "val/reconstructions" in events.Tags()["images"]
    assert "val/code_histogram" in events.Tags()["histograms"]
    assert events.Scalars("val/psnr")[0].step == 7
