"""Multi-process test helper: ``run_distributed(fn, world_size, *args)`` runs ``fn(rank, world_size,
*args)`` in spawned CPU processes joined in a gloo group and returns the results in rank order."""

from __future__ import annotations

import os
import tempfile
import traceback

import torch.distributed as torch_dist
import torch.multiprocessing as mp


def _spawned(rank, world_size, init_file, fn, args, queue):
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world_size)
    try:
        torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        queue.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - report every failure to the parent instead of hanging
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned CPU processes.

    Each process first joins a gloo group on a private file store. ``fn`` must be a module-level
    function (spawn pickles it). Returns the results in rank order; a failure in any
    rank raises with that rank's traceback.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_spawned, args=(r, world_size, init_file, fn, args, queue))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results = {}
        try:
            for _ in range(world_size):
                rank, ok, payload = queue.get(timeout=timeout)
                if not ok:
                    raise RuntimeError(f"rank {rank} failed:\n{payload}")
                results[rank] = payload
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    return [results[r] for r in range(world_size)]
