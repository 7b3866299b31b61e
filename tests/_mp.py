"""Multi-process test helper: ``run_distributed(fn, world_size, *args)`` runs ``fn(rank, world_size,
*args)`` in gloo processes and returns the results in rank order (see bavq.dist.spawn_local)."""

from bavq.dist import spawn_local as run_distributed

__all__ = ["run_distributed"]
