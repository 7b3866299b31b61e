"""Exactness: R ranks holding slices of a global batch end with the buffers of one process that saw
the whole batch (rtol 1e-5), and every rank holds the same codebook bit for bit (DESIGN.md)."""

from __future__ import annotations

import pytest
import torch
from _mp import run_distributed  # tests/ is on sys.path under pytest (no package)

from bavq.quantizers import BAVQ, VQEMA

K, D, GLOBAL_ROWS, STEPS = 16384, 8, 4096, 2
# 512-row chunks: every rank's chunks have the shapes of the single process's chunks, so the
# per-row distance computations are identical and only the order of the sums differs.
COMMON = {"chunk_size": 512, "decay": 0.9, "seed": 7}
CASES = {
    "vq_ema": ("vq_ema", {}),
    "vq_ema_data_init": ("vq_ema", {"init": "data"}),
    "vq_ema_restart": ("vq_ema", {"dead_code_threshold": 1.0}),
    "ba_vq": ("ba_vq", {}),  # the defaults: balanced E-step, anneal beta
    "ba_vq_softmax": ("ba_vq", {"estep": "softmax"}),
    "ba_vq_deferred": ("ba_vq", {"deferred": True}),
    "ba_vq_balanced_5": ("ba_vq", {"estep": "balanced", "balance_iters": 5}),
    "ba_vq_warm_start": ("ba_vq", {"balance_iters": 1, "balance_warm_start": True}),
    "ba_vq_online_balance": ("ba_vq", {"balance_iters": 0, "balance_warm_start": True, "balance_beta_scale": True}),
    "ba_vq_balanced_prior_map": ("ba_vq", {"estep": "balanced", "balance_target": "prior", "assign": "map",
                                           "entropy_weight": 2.0, "beta_mode": "fixed"}),
    "ba_vq_hard_restart": ("ba_vq", {"restart_counts": "hard", "dead_code_threshold": 0.95}),
    "ba_vq_map_init_restart": ("ba_vq", {"estep": "softmax", "beta_mode": "fixed", "entropy_weight": 2.0,
                                         "assign": "map", "init": "data", "dead_code_threshold": 0.95}),
}


def _build(kind: str, kwargs: dict):
    kwargs = {k: v for k, v in kwargs.items() if k != "deferred"}
    return (VQEMA if kind == "vq_ema" else BAVQ)(K, D, **COMMON, **kwargs)


def _global_batch(step: int) -> torch.Tensor:
    # (B, D, H, W) with B * H * W = GLOBAL_ROWS; clustered so that codes compete for data.
    gen = torch.Generator().manual_seed(100 + step)
    centers = torch.randn(64, D, generator=gen) * 3
    rows = centers[torch.randint(0, 64, (GLOBAL_ROWS,), generator=gen)] + torch.randn(GLOBAL_ROWS, D, generator=gen)
    return rows.view(GLOBAL_ROWS // 64, 8, 8, D).permute(0, 3, 1, 2).contiguous()


def _train(q, kwargs: dict, rank: int, world_size: int) -> dict:
    for step in range(STEPS):
        z = _global_batch(step).chunk(world_size)[rank]
        if kwargs.get("deferred") and step > 0:  # gradient-accumulation style: 2 micro-steps, 1 update
            q.auto_update = False
            # Global micro-batch i is micro-batch i of every rank (of RANKS = 2), also for the single
            # process: the balanced E-step (the default) balances each global micro-batch on its own.
            parts = _global_batch(step).chunk(2)
            for i in range(2):
                q(torch.cat([part.chunk(2)[i] for part in parts]).chunk(world_size)[rank])
            q.update_codebook()
        else:
            q(z)
    return {name: value.clone() for name, value in q.state_dict().items()}


def _to_numpy(state: dict) -> dict:
    # numpy arrays pickle by value; tensors would travel as shared-memory handles that die with the worker.
    return {name: value.numpy() for name, value in state.items()}


def _worker(rank: int, world_size: int) -> dict:
    torch.set_num_threads(1)
    return {name: _to_numpy(_train(_build(kind, kwargs), kwargs, rank, world_size))
            for name, (kind, kwargs) in CASES.items()}


@pytest.mark.slow
def test_two_ranks_equal_one_process():
    ranks = [{name: {buf: torch.from_numpy(v) for buf, v in state.items()} for name, state in result.items()}
             for result in run_distributed(_worker, 2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the BLAS blocking of the workers: same per-row rounding
    try:
        singles = {name: _train(_build(kind, kwargs), kwargs, 0, 1) for name, (kind, kwargs) in CASES.items()}
    finally:
        torch.set_num_threads(threads)
    for name, (kind, kwargs) in CASES.items():
        single = singles[name]
        for buf, expected in single.items():
            assert torch.equal(ranks[0][name][buf], ranks[1][name][buf]), f"{name}: ranks differ on {buf}"
            # rtol 1e-5, plus an absolute floor of 1e-5 of the buffer's scale for entries that are sums
            # of signed terms (M^b), where fp32 summation order alone moves the result by ~1e-7 * scale.
            scale = float(expected.abs().max()) if expected.is_floating_point() else 0.0
            torch.testing.assert_close(ranks[0][name][buf], expected, rtol=1e-5, atol=1e-5 * scale,
                                       msg=lambda m, name=name, buf=buf: f"{name}/{buf}: {m}")
        if "dead_code_threshold" in kwargs:  # the restart path really ran
            counts = "ema_hard_count" if kwargs.get("restart_counts") == "hard" else "ema_count"
            assert (single[counts] == kwargs["dead_code_threshold"]).any(), name
