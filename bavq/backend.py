"""Accelerate set-up: the one place that joins the launcher's process group (training, bavq-eval and
bavq-tokenize all go through :func:`make_accelerator`; the training application adds its DeepSpeed
plugins from bavq.train.deepspeed_backend).

Facts this module encodes (see DESIGN.md):
- On a machine without a GPU, Accelerate must be told it is on CPU, or every rank believes it is
  rank 0 of 1 (a silent single-process run). We also compare Accelerate's process count with the
  launcher's WORLD_SIZE and refuse to start when they differ.
- DDP must not broadcast buffers: rank 0's codebook would overwrite everyone's each forward and
  hide a missing statistics reduction.
- Schedulers are stepped once per optimizer step by us, not num_processes times by Accelerate.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from datetime import timedelta
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

from bavq import dist
from bavq.config import Config


class LaunchError(RuntimeError):
    """The launcher and the training process disagree (wrong flags, missing CPU mode, ...)."""


def running_on_cpu() -> bool:
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")


def make_accelerator(cfg: Config, run_dir: str, log_with: list[str] | None = None,
                     deepspeed_plugins: Callable[[Config], dict] | None = None) -> Accelerator:
    """Build the Accelerator and check the process count. With ``deepspeed_plugins`` (a function of the
    config returning Accelerate's named DeepSpeed plugins) it is a DeepSpeed Accelerator."""
    check_launcher()
    cpu = running_on_cpu()
    if cpu:  # DeepSpeed (imported by Accelerate when installed) otherwise warns on every rank at start
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    handlers = [DistributedDataParallelKwargs(broadcast_buffers=False)]
    if dist.launched_by_distributed_launcher():
        # gloo on CPU: NCCL cannot run there, and without a CPU backend each rank would be alone.
        # (Only under a launcher: a backend without a process group fails in a plain process.)
        # A bounded timeout (not torch's 30 min) so a hung peer ends the job while SLURM still has time.
        timeout = timedelta(seconds=cfg.train.collective_timeout_s)
        handlers.append(InitProcessGroupKwargs(backend="gloo" if cpu else "nccl", timeout=timeout))
    if cfg.train.mixed_precision == "fp16" and cpu:
        raise LaunchError("train.mixed_precision=fp16 is not supported on CPU; use bf16 or no")
    kwargs = dict(
        # Accelerate enables DeepSpeed only when cpu=False; on a CPU-only machine the device is the CPU
        # anyway and the gloo process group above keeps the ranks apart.
        cpu=cpu and deepspeed_plugins is None,
        mixed_precision=cfg.train.mixed_precision,
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,
        log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir=run_dir, logging_dir=run_dir),
    )
    if deepspeed_plugins is not None:
        kwargs["deepspeed_plugins"] = deepspeed_plugins(cfg)
    # We rely on broadcast_buffers=False (no buffer sync at all, not even at init: a rank whose
    # codebook differed would then fail the checksum check instead of being silently overwritten).
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated", category=FutureWarning)
    accelerator = Accelerator(**kwargs)
    check_world_size(accelerator.num_processes)
    return accelerator


def plain_accelerator(cfg: Config, work_dir: str) -> Accelerator:
    """An Accelerator that only joins the launcher's process group and picks this rank's device: no
    DeepSpeed engine and no mixed-precision wrapper, whatever trained the weights (bavq-eval, bavq-tokenize)."""
    plain = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, backend="ddp", mixed_precision="no"))
    return make_accelerator(plain, work_dir, None)


def check_launcher() -> None:
    """Refuse ``accelerate launch --cpu --num_processes N>1``: it would train as one process."""
    if dist.cpu_launcher_dropped_processes():
        raise LaunchError(
            "`accelerate launch --cpu` starts ONE process whatever --num_processes says; for N CPU processes "
            "use `accelerate launch --multi_gpu --num_processes N` or `torchrun --nproc_per_node N` "
            "(for one process drop --num_processes, or unset MASTER_ADDR if you exported it)")


def check_world_size(num_processes: int) -> None:
    """Fail when Accelerate sees fewer processes than the launcher started (the CPU false pass)."""
    expected = dist.launcher_world_size()
    if num_processes != expected:
        raise LaunchError(
            f"the launcher started WORLD_SIZE={expected} processes but Accelerate sees {num_processes}: "
            "on a CPU machine launch with `accelerate launch --multi_gpu --num_processes N` or "
            "`torchrun --nproc_per_node N` (not `--cpu`, which silently runs one process)"
        )
    if dist.is_initialized() and dist.get_world_size() != num_processes:
        raise LaunchError(f"torch.distributed has {dist.get_world_size()} ranks but Accelerate {num_processes}")
