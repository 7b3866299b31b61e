"""Distances and hard assignment, chunked (see :mod:`._ops`): nearest codes, code gaps, best scores,
hard statistics."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bavq.quantizers._ops import column_max_, fused_backend


@torch.no_grad()
def nearest_codes(x: Tensor, codebook: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """Hard assignment argmin_k ||x - e_k||^2 of each row of x (N, D).

    Returns (indices (N,) int64, squared distance to the nearest code (N,)).
    """
    backend = fused_backend(x, codebook)
    if backend is not None:  # CPU: the same code in cache-sized chunks; CUDA: Triton's row pass
        fused = backend.nearest_codes(x, codebook, rows)
        if fused is not None:
            return fused
    n, num_codes = x.shape[0], codebook.shape[0]
    sq_codes = codebook.square().sum(1)
    indices = torch.empty(n, dtype=torch.int64, device=x.device)
    min_dist = torch.empty(n, dtype=x.dtype, device=x.device)
    work = x.new_empty(min(rows, n), num_codes)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        dist_part = work[: stop - start]
        torch.addmm(sq_codes, x[start:stop], codebook.t(), alpha=-2.0, out=dist_part)  # d - ||x||^2
        torch.min(dist_part, dim=1, out=(min_dist[start:stop], indices[start:stop]))
    return indices, min_dist.add_(x.square().sum(1)).clamp_(min=0.0)


@torch.no_grad()
def code_gaps(x: Tensor, codebook: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """How far each code is from being anyone's nearest: (gap (K,), min distance (N,)).

    gap_k = min_x [d(x,k) - min_j d(x,j)] over the rows of x (0 for a code that is some row's
    nearest); the column piece (running max of the negated gaps) over chunks, never N x K at once.
    """
    backend = fused_backend(x, codebook)
    if backend is not None:
        fused = backend.code_gaps(x, codebook, rows)
        if fused is not None:
            return fused
    n, num_codes = x.shape[0], codebook.shape[0]
    sq_codes = codebook.square().sum(1)
    neg_gap = x.new_full((num_codes,), -math.inf)
    min_dist = torch.empty(n, dtype=x.dtype, device=x.device)
    work = x.new_empty(max(min(rows, n), 1), num_codes)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        d = work[: stop - start]
        torch.addmm(sq_codes, x[start:stop], codebook.t(), alpha=-2.0, out=d)  # d - ||x||^2
        d_min = d.amin(1)
        min_dist[start:stop] = d_min
        column_max_(neg_gap, d.sub_(d_min[:, None]).neg_())
    return neg_gap.neg_().clamp_(min=0.0), min_dist.add_(x.square().sum(1)).clamp_(min=0.0)


@torch.no_grad()
def best_scores(x: Tensor, codebook: Tensor, bias: Tensor, scale: float, rows: int) -> Tensor:
    """argmax_k (bias_k + scale * x . e_k) for each row of x, chunked; (N,) int64."""
    n, num_codes = x.shape[0], codebook.shape[0]
    indices = torch.empty(n, dtype=torch.int64, device=x.device)
    work = x.new_empty(min(rows, n), num_codes)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        scores = work[: stop - start]
        torch.addmm(bias, x[start:stop], codebook.t(), alpha=scale, out=scores)
        indices[start:stop] = scores.argmax(1)
    return indices


def hard_sums(x: Tensor, indices: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    """Hard counts (K,) (bincount) and per-code sums of x (K, D) (index_add), never a one-hot."""
    counts = torch.bincount(indices, minlength=num_codes).to(x.dtype)
    sums = x.new_zeros(num_codes, x.shape[1]).index_add_(0, indices, x)
    return counts, sums
