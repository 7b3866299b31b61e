"""Evaluation metrics comparable to the literature: codebook statistics, PSNR and SSIM.

Codebook usage and perplexity are computed from *global* histograms: every rank adds its hard
indices to a :class:`CodebookStats`, one ``reduce()`` sums the histograms over ranks, and only then
are ratios taken (never average per-rank ratios). :class:`WindowUsage` is the training-time
"usage over the last 65,536 tokens" (LlamaGen style), fed with global per-step counts.
PSNR and SSIM are computed per image on uint8-quantized images, then averaged by the caller.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bavq import dist


def entropy_of_counts(counts: Tensor) -> Tensor:
    """Shannon entropy (nats) of the distribution ``counts / counts.sum()``; 0 for an empty histogram."""
    counts = counts.double()
    total = counts.sum()
    probs = counts / total.clamp_min(1e-300)
    return -torch.special.xlogy(probs, probs).sum()


class CodebookStats:
    """Pooled hard-index histogram of an evaluation set, summed over ranks.

    Call :meth:`update` with every batch of indices, :meth:`reduce` once on every rank (one
    all-reduce), then :meth:`compute`.
    """

    def __init__(self, num_codes: int):
        if num_codes < 1:
            raise ValueError(f"num_codes must be >= 1, got {num_codes}")
        self.num_codes = num_codes
        self._hist: Tensor | None = None
        self._reduced = False

    def update(self, indices: Tensor) -> None:
        """Add the hard indices of one batch (any shape, int) to the local histogram."""
        if self._reduced:
            raise RuntimeError("CodebookStats.update() after reduce(): make a new CodebookStats")
        flat = indices.detach().reshape(-1).long()
        counts = torch.bincount(flat, minlength=self.num_codes)
        if counts.numel() > self.num_codes:
            raise ValueError(f"index {int(flat.max())} is out of range for {self.num_codes} codes")
        if self._hist is None:
            self._hist = torch.zeros(self.num_codes, dtype=torch.int64, device=counts.device)
        self._hist += counts

    def reduce(self) -> None:
        """Sum the histogram over all ranks (collective: every rank must call it, once)."""
        if self._reduced:
            raise RuntimeError("CodebookStats.reduce() called twice; it would double the counts")
        # A rank that saw no batch still takes part; the histogram lives where the collective runs.
        device = dist.comm_device()
        hist = self._hist.to(device) if self._hist is not None else torch.zeros(
            self.num_codes, dtype=torch.int64, device=device)
        self._hist = dist.all_reduce_sum(hist)
        self._reduced = True

    @property
    def histogram(self) -> Tensor:
        """The (num_codes,) int64 histogram (global after :meth:`reduce`)."""
        if self._hist is None:
            return torch.zeros(self.num_codes, dtype=torch.int64, device="cpu")
        return self._hist

    def compute(self) -> dict[str, float]:
        """codebook_usage (fraction of codes used at least once), perplexity, normalized_entropy
        (H / log K), dead_codes and tokens of the pooled histogram."""
        hist = self.histogram
        tokens = int(hist.sum())
        if tokens == 0:
            raise ValueError("CodebookStats.compute(): no indices were added")
        entropy = float(entropy_of_counts(hist))
        used = int((hist > 0).sum())
        return {
            "codebook_usage": used / self.num_codes,
            "perplexity": math.exp(entropy),
            "normalized_entropy": entropy / math.log(self.num_codes) if self.num_codes > 1 else 0.0,
            "dead_codes": self.num_codes - used,
            "tokens": tokens,
        }


class WindowUsage(nn.Module):
    """Fraction of codes used in the last ``window`` tokens, from global per-step hard counts.

    The state is two tensors (checkpointed through ``state_dict``): for each code, the token
    position at the end of the last step that used it, and the number of tokens seen. A step
    counts as inside the window when it ends after ``tokens - window``, so the window is exact at
    step granularity (with 8,192 tokens per step, the last 8 steps for a 65,536-token window).
    """

    def __init__(self, num_codes: int, window: int = 65536):
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1 token, got {window}")
        self.num_codes = num_codes
        self.window = window
        # 0 means "never used": positions are counted from 1 after the first token.
        self.register_buffer("last_seen", torch.zeros(num_codes, dtype=torch.int64))
        self.register_buffer("tokens", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def update(self, counts: Tensor) -> None:
        """Add one step's global hard histogram (num_codes,), integer or integral float."""
        counts = counts.detach().round().to(device=self.last_seen.device, dtype=torch.int64)
        if counts.shape != self.last_seen.shape:
            raise ValueError(f"counts must have shape ({self.num_codes},), got {tuple(counts.shape)}")
        end = self.tokens + counts.sum()
        self.last_seen.copy_(torch.where(counts > 0, end, self.last_seen))
        self.tokens.copy_(end)

    def usage(self) -> Tensor:
        """Fraction (0-dim float tensor) of codes used inside the window."""
        start = (self.tokens - self.window).clamp_min(0)
        return (self.last_seen > start).float().mean()


def to_uint8_levels(images: Tensor) -> Tensor:
    """Images in [-1, 1] -> float tensor of the uint8 levels round((x + 1) * 127.5) in 0..255."""
    return ((images.detach().float() + 1.0) * 127.5).round().clamp(0.0, 255.0)


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two (B, C, H, W) image batches of one shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")


def psnr_per_image(x: Tensor, y: Tensor) -> Tensor:
    """PSNR (dB) of each image pair over all channels, on uint8-quantized [-1, 1] images.

    Returns a (B,) float64 tensor; identical images give +inf (as scikit-image does). The caller
    averages over the evaluation set (mean of per-image PSNR, the convention of the VQ papers).
    """
    _check_pair(x, y)
    mse = (to_uint8_levels(x).double() - to_uint8_levels(y).double()).square().flatten(1).mean(1)
    return 10.0 * torch.log10(255.0**2 / mse)


def ssim_per_image(x: Tensor, y: Tensor) -> Tensor:
    """SSIM of each image pair (Gaussian window 11, sigma 1.5, data range 255) on uint8-quantized
    [-1, 1] images; (B,) tensor. Uses torchmetrics' reference implementation per image."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair(x, y)
    return structural_similarity_index_measure(
        to_uint8_levels(x), to_uint8_levels(y), data_range=255.0, reduction="none"
    )
