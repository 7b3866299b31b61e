"""Codebook statistics (global histograms, window usage) and per-image PSNR / SSIM."""

from __future__ import annotations

import math

import pytest
import torch
from _mp import run_distributed  # tests/ is on sys.path under pytest (no package)

from bavq.metrics import CodebookStats, WindowUsage, psnr_per_image, ssim_per_image


def test_codebook_stats_against_hand_computation():
    stats = CodebookStats(5)
    stats.update(torch.tensor([[0, 0], [1, 3]]))
    stats.update(torch.tensor([0, 1, 0, 3]))
    stats.reduce()  # one process: a no-op sum
    result = stats.compute()
    probs = [4 / 8, 2 / 8, 2 / 8]
    entropy = -sum(p * math.log(p) for p in probs)
    assert result["codebook_usage"] == 3 / 5 and result["dead_codes"] == 2 and result["tokens"] == 8
    assert math.isclose(result["perplexity"], math.exp(entropy), rel_tol=1e-12)
    assert math.isclose(result["normalized_entropy"], entropy / math.log(5), rel_tol=1e-12)
    assert stats.histogram.tolist() == [4, 2, 0, 2, 0]


def test_codebook_stats_misuse_errors():
    stats = CodebookStats(4)
    with pytest.raises(ValueError, match="out of range"):
        stats.update(torch.tensor([4]))
    with pytest.raises(ValueError, match="no indices"):
        stats.compute()
    stats.reduce()
    with pytest.raises(RuntimeError, match="twice"):
        stats.reduce()
    with pytest.raises(RuntimeError, match="after reduce"):
        stats.update(torch.tensor([0]))


def _ranks_indices(rank: int) -> torch.Tensor:
    # rank 0 uses codes 0-3, rank 1 codes 2-9: per-rank usage would say 4/16 and 8/16, global 10/16.
    return torch.tensor([0, 1, 2, 3, 3]) if rank == 0 else torch.arange(2, 10).repeat(2)


def _histogram_worker(rank: int, world_size: int):
    stats = CodebookStats(16)
    stats.update(_ranks_indices(rank))
    stats.reduce()
    return stats.histogram.tolist(), stats.compute()


@pytest.mark.slow
def test_two_rank_histogram_reduction_is_global():
    results = run_distributed(_histogram_worker, 2)
    single = CodebookStats(16)
    single.update(torch.cat([_ranks_indices(0), _ranks_indices(1)]))
    assert results[0] == results[1]
    assert results[0][0] == single.histogram.tolist()
    assert results[0][1] == single.compute() and results[0][1]["codebook_usage"] == 10 / 16


def test_window_usage_counts_the_last_window_tokens_and_round_trips():
    window = WindowUsage(num_codes=8, window=10)
    assert float(window.usage()) == 0.0
    window.update(torch.tensor([3, 2, 0, 0, 0, 0, 0, 0]))  # 5 tokens, codes {0, 1}
    window.update(torch.tensor([0, 0, 5, 0, 0, 0, 0, 0]))  # 10 tokens, codes {0, 1, 2}
    assert float(window.usage()) == 3 / 8
    window.update(torch.tensor([0, 0, 0, 4, 1, 0, 0, 0.0]))  # 15 tokens: the first step left the window
    assert float(window.usage()) == 3 / 8  # codes {2, 3, 4}
    restored = WindowUsage(num_codes=8, window=10)
    restored.load_state_dict(window.state_dict())
    for module in (window, restored):
        module.update(torch.tensor([0, 0, 0, 0, 0, 0, 0, 10]))  # one step fills the window: {7}
    assert float(window.usage()) == float(restored.usage()) == 1 / 8
    with pytest.raises(ValueError, match="shape"):
        window.update(torch.zeros(3))


def _uint8(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round((x + 1) * 127.5), 0, 255).to(torch.uint8)


def test_psnr_per_image_on_uint8_levels():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 8, 8, generator=gen) * 2 - 1
    y = (x + 0.05 * torch.randn(3, 3, 8, 8, generator=gen)).clamp(-1, 1)
    got = psnr_per_image(x, y)
    for i in range(3):
        mse = (_uint8(x[i]).double() - _uint8(y[i]).double()).square().mean()
        assert math.isclose(float(got[i]), 10 * math.log10(255**2 / float(mse)), rel_tol=1e-12)
    # A difference below half a uint8 level vanishes after quantization: identical images, +inf.
    levels = torch.randint(0, 256, (2, 3, 4, 4), generator=gen).float() / 127.5 - 1
    assert torch.isinf(psnr_per_image(levels, levels + 0.3 / 127.5)).all()
    with pytest.raises(ValueError, match="B, C, H, W"):
        psnr_per_image(x, y[:, :1])


def test_ssim_per_image_matches_single_image_calls():
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    y = (x + 0.2 * torch.randn(2, 3, 16, 16, generator=gen)).clamp(-1, 1)
    got = ssim_per_image(x, y)
    assert got.shape == (2,)
    for i in range(2):
        expected = ssim(_uint8(x[i : i + 1]).float(), _uint8(y[i : i + 1]).float(), data_range=255.0)
        assert math.isclose(float(got[i]), float(expected), rel_tol=1e-5)
    torch.testing.assert_close(ssim_per_image(x, x), torch.ones(2))
