"""Run outputs and trackers: metrics.jsonl, W&B, TensorBoard, console. Main process writes."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import yaml


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.detach().float().item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def plain_metrics(metrics: dict) -> dict:
    """Tensors to Python numbers (NaN/inf to None) so JSON stays valid."""
    return {k: _plain(v) for k, v in metrics.items()}


def choose_trackers(wandb_on: bool, tensorboard_on: bool, warn) -> list[str]:
    """Trackers for Accelerate's ``log_with``. W&B falls back to offline mode when not logged in,
    because an online run without a key raises at start-up and a 3 a.m. job should not die of it."""
    trackers = []
    if wandb_on:
        try:
            import wandb  # noqa: F401
        except ImportError:
            warn("WARNING: wandb is not installed; W&B logging is off (pip install wandb)")
        else:
            mode = os.environ.get("WANDB_MODE", "")
            if mode not in ("offline", "disabled", "dryrun") and not _wandb_logged_in():
                warn("WARNING: no W&B login found; logging W&B offline (run `wandb login`, or --no_wandb)")
                os.environ["WANDB_MODE"] = "offline"
            trackers.append("wandb")
    if tensorboard_on:
        trackers.append("tensorboard")
    return trackers


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run folder, created once so a resumed job continues the same run."""
    path = run_dir / "wandb_id.txt"
    if path.is_file():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


class RunLogger:
    """Writes metrics.jsonl and forwards to Accelerate's trackers; a no-op on non-main ranks."""

    def __init__(self, accelerator, run_dir: Path, trackers: list[str], project: str, config: dict, name: str):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.run_dir = Path(run_dir)
        self.trackers = trackers
        self.start = time.time()
        if trackers:
            init_kwargs = {}
            if "wandb" in trackers:
                run_id = wandb_run_id(self.run_dir) if self.main else None
                init_kwargs["wandb"] = {"name": name, "id": run_id, "resume": "allow", "dir": str(self.run_dir)}
            accelerator.init_trackers(project, config=None, init_kwargs=init_kwargs)
            self._store_config(_flatten(config))

    def _store_config(self, values: dict) -> None:
        """The config as hyperparameters. W&B: every launch (a resumed run updates the same run).
        TensorBoard: once per run folder, in the fixed subfolder ``hparams`` (Accelerate would add a new
        time-stamped folder, twice, at every launch and resume)."""
        for tracker in self.accelerator.trackers:
            if tracker.name != "tensorboard":
                tracker.store_init_configuration(values)
                continue
            folder = Path(tracker.writer.log_dir) / "hparams"
            if not folder.exists():
                tracker.writer.add_hparams(values, metric_dict={}, run_name="hparams")
                (folder / "hparams.yml").write_text(yaml.safe_dump(values, sort_keys=False))

    def _tensorboard(self):
        if not (self.main and "tensorboard" in self.trackers):
            return None
        return self.accelerator.get_tracker("tensorboard", unwrap=True)

    def log_evaluation(self, step: int, result) -> None:
        """A held-out evaluation (bavq.evaluation.EvalResult): ``val/`` scalars everywhere, and in
        TensorBoard the reconstruction grid (originals over reconstructions) and the code histogram.
        Called at the final evaluation, so a run without ``train.eval_every`` still shows them."""
        if not self.main:
            return
        self.log(step, {f"val/{k}": v for k, v in result.summary().items() if not isinstance(v, str)})
        writer = self._tensorboard()
        if writer is None:
            return
        if result.samples:
            from torchvision.utils import make_grid

            both = torch.cat([result.samples["images"], result.samples["recon"]]).float()
            grid = make_grid((both + 1) / 2, nrow=result.samples["images"].shape[0], padding=1)
            writer.add_image("val/reconstructions", grid.clamp(0, 1), global_step=step)
        if result.histogram is not None and result.histogram.sum() > 0:
            counts = result.histogram.astype("float64")
            codes = torch.arange(len(counts), dtype=torch.float64).numpy()
            writer.add_histogram_raw("val/code_histogram", min=0, max=len(counts) - 1, num=counts.sum(),
                                     sum=float((codes * counts).sum()), sum_squares=float((codes ** 2 * counts).sum()),
                                     bucket_limits=(codes + 0.5).tolist(), bucket_counts=counts.tolist(),
                                     global_step=step)
        writer.flush()

    def log(self, step: int, metrics: dict) -> None:
        if not self.main:
            return
        row = {"step": step, **plain_metrics(metrics)}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.trackers:
            numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(numeric, step=step)

    def print(self, message: str) -> None:
        if self.main:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)

    def close(self) -> None:
        if self.trackers:
            self.accelerator.end_training()


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = str(value) if isinstance(value, list) else value
    return out
