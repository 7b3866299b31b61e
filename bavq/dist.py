"""Distributed helpers: the only module that reads launcher variables (RANK, WORLD_SIZE, SLURM_*).

Reductions are written to be called unconditionally: when torch.distributed is not initialized
they are no-ops, so one process and R processes run the same code (vector-quantize-pytorch habit).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import torch
import torch.distributed as torch_dist


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value != "" else default
    except ValueError:
        return default


def launcher_world_size() -> int:
    """WORLD_SIZE as set by torchrun / accelerate launch (1 when launched as a plain process)."""
    return _env_int("WORLD_SIZE", 1)


def launcher_rank() -> int:
    return _env_int("RANK", 0)


def launcher_local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def launched_by_distributed_launcher() -> bool:
    """True under torchrun / accelerate launch with several processes (they set LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ


def cpu_launcher_dropped_processes() -> bool:
    """True when Accelerate's CPU launcher was asked for several processes but started one.

    ``accelerate launch --cpu --num_processes N`` (or a config file with ``use_cpu: true`` and N > 1)
    goes to Accelerate's simple launcher, which runs ONE process whatever N is. What that child sees
    (measured with accelerate 1.15): ``ACCELERATE_USE_CPU=True``, ``MASTER_ADDR``/``MASTER_PORT`` (set
    only when N > 1 or several machines were asked) and no ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``. A real
    multi-process launcher (torchrun, ``accelerate launch --multi_gpu``) always sets ``WORLD_SIZE``.
    """
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return use_cpu and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ


def prints_user_errors() -> bool:
    """Whether this process reports a user error: once per machine (local rank 0), not once per rank.
    Every rank meets the same config mistake; local rather than global rank 0, so that a mistake seen
    only on one node (a missing file there) is still reported from that node."""
    return launcher_local_rank() == 0


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def get_rank() -> int:
    return torch_dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def comm_device() -> torch.device:
    """The device of every tensor that enters a collective: the one place that decides it.

    NCCL serves CUDA tensors only (this rank's current GPU); gloo and a single process use the CPU.
    Allocate with ``device=dist.comm_device()`` (or :func:`tensor`) and move results elsewhere only
    after the reduction (DESIGN.md, "Devices").
    """
    if is_initialized() and "nccl" in str(torch_dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def tensor(values, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A new tensor of ``values`` on :func:`comm_device`, ready for a collective."""
    return torch.as_tensor(values, dtype=dtype, device=comm_device())


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return a.type != "cuda" or (a.index if a.index is not None else torch.cuda.current_device()) == b.index


_recorders: list[list] = []  # see record_collectives()


def _collective(op: str, tensor: torch.Tensor) -> bool:
    """Check ``tensor`` against the communication device and record the call; True when a process
    group exists and the collective must run. Checked even in a one-rank group, so that a one-GPU
    NCCL run exposes a misplaced tensor as clearly as a multi-GPU one."""
    if not is_initialized():
        return False
    device = comm_device()
    for log in _recorders:
        log.append((op, tensor.device, tensor.dtype, tuple(tensor.shape)))
    if not _same_device(tensor.device, device):
        raise RuntimeError(f"dist.{op}: a tensor on {tensor.device} entered a collective that runs on {device} "
                           f"({torch_dist.get_backend()}); allocate it with device=dist.comm_device()")
    return True


@contextlib.contextmanager
def record_collectives():
    """Record (op, device, dtype, shape) of every collective issued through this module (tests)."""
    log: list = []
    _recorders.append(log)
    try:
        yield log
    finally:
        _recorders.remove(log)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all ranks; a no-op in a single process. Returns it."""
    if _collective("all_reduce_sum", tensor):
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Max of ``tensor`` in place over all ranks; a no-op in a single process."""
    if _collective("all_reduce_max", tensor):
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Copy rank ``src``'s ``tensor`` to every rank in place; a no-op in a single process."""
    if _collective("broadcast", tensor):
        torch_dist.broadcast(tensor, src=src)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Return rank ``src``'s picklable ``obj`` on every rank (torch moves the pickle to the
    communication device itself)."""
    if not (is_initialized() and get_world_size() > 1):
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """List of every rank's ``obj`` (rank order); ``[obj]`` in a single process."""
    if not (is_initialized() and get_world_size() > 1):
        return [obj]
    out = [None] * get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 in rank order (same shape on every rank)."""
    if not _collective("all_gather_cat", tensor):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    torch_dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def barrier() -> None:
    if is_initialized() and get_world_size() > 1:
        torch_dist.barrier()


def shutdown(wait: bool = True) -> None:
    """Wait for every rank (``wait``), then tear the process group down. A process that exits with a
    live gloo group can abort in C++ teardown ("terminate called without an active exception") and
    make the launcher kill ranks that are still finishing; call this on every exit path (with
    ``wait=False`` where the other ranks may not come: errors seen by one rank only).

    The abort: gloo's worker threads still hold AsyncWork objects with tensors; destroyed during
    interpreter finalization they take the GIL of a dying interpreter (pytorch#190489). Without
    ``wait``, only gloo groups are destroyed: NCCL's destroy aborts communicators, which can hang
    while peers are stuck in collectives (torchtitan#1342); the exit abort was seen with gloo."""
    if is_initialized():
        if wait:
            barrier()
        elif torch_dist.get_backend() != "gloo":
            return
        torch_dist.destroy_process_group()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one rank (e.g. a preemption signal)."""
    if not is_initialized():
        return flag
    # One host sync per call (the answer decides a branch on every rank), on a one-element tensor.
    return bool(all_reduce_max(tensor([1.0 if flag else 0.0], torch.float32)).item() > 0)


# ----------------------------------------------------------------------------- SLURM
def slurm_job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID") or None


def under_slurm() -> bool:
    return slurm_job_id() is not None


def slurm_requeue() -> tuple[bool, str]:
    """Ask SLURM to requeue this job (``scontrol requeue $SLURM_JOB_ID``). Returns (ok, message)."""
    job = slurm_job_id()
    if job is None:
        return False, "not running under SLURM (no SLURM_JOB_ID); not requeued"
    if shutil.which("scontrol") is None:
        return False, "scontrol not found on PATH; not requeued"
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if proc.returncode != 0:
        return False, f"scontrol requeue {job} failed: {proc.stderr.strip()}"
    return True, f"requeued SLURM job {job}"


# ----------------------------------------------------------------------------- launcher store
def default_store():
    """The c10d store the process group was created with (torchrun's agent store), or None."""
    if not is_initialized():
        return None
    return torch_dist.distributed_c10d._get_default_store()


def launcher_restart_count() -> int:
    """torchrun's restart counter (keys in the agent store outlive a worker-group restart)."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0)
