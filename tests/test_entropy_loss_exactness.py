"""BA-VQ's entropy loss is a loss of the GLOBAL batch: with 2 ranks each holding half of it, the
value equals one process's and each rank's input gradient equals the single process's gradient times
the world size (the data-parallel average divides it back), DESIGN.md "Exactness"."""

from __future__ import annotations

import pytest
import torch
from _mp import run_distributed

from bavq.quantizers import BAVQ

K, D, B, H = 256, 8, 8, 8  # 8 * 8 * 8 = 512 rows


def _batch() -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    centers = torch.randn(16, D, generator=gen) * 2
    rows = centers[torch.randint(0, 16, (B * H * H,), generator=gen)] + 0.5 * torch.randn(B * H * H, D, generator=gen)
    return rows.view(B, H, H, D).permute(0, 3, 1, 2).contiguous()


def _loss_and_grad(rank: int, world_size: int) -> tuple[float, object]:
    torch.set_num_threads(1)
    q = BAVQ(K, D, beta_mode="fixed", beta_start=0.5, beta_end=0.5, entropy_weight=2.0,
             entropy_loss_weight=1.0, chunk_size=64, seed=1)
    z = _batch().chunk(world_size)[rank].clone().requires_grad_(True)
    out = q(z)
    out.loss.backward()
    return float(out.loss.detach()), z.grad.numpy()


@pytest.mark.slow
def test_entropy_loss_two_ranks_equal_one_process():
    single_loss, single_grad = _loss_and_grad(0, 1)
    ranks = run_distributed(_loss_and_grad, 2)
    assert abs(sum(loss for loss, _ in ranks) / 2 - single_loss) <= 1e-5 * abs(single_loss)
    halves = torch.from_numpy(single_grad).chunk(2)
    for (_loss, grad), expected in zip(ranks, halves):
        torch.testing.assert_close(torch.from_numpy(grad) / 2, expected, rtol=1e-4, atol=1e-7)
    assert float(torch.from_numpy(single_grad).abs().max()) > 0
