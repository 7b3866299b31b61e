"""The balanced E-step's column potentials: log-domain Sinkhorn over the GLOBAL batch, chunked."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bavq import dist
from bavq.quantizers._limits import LOG_P_FLOOR
from bavq.quantizers._ops import fused_backend, row_softmax_


@torch.no_grad()
def balance_potentials(x: Tensor, codebook: Tensor, log_weight: Tensor | None, beta: float, rows: int,
                       log_ratio: Tensor, iters: int, start: Tensor | None = None) -> Tensor:
    """Column potentials v (K,) of the balanced E-step p(k|x) = exp(a(x,k) + u_x + v_k).

    Log-domain Sinkhorn: each iteration is one chunked pass that takes the row potentials
    u_x = -logsumexp_k(a + v) (the row piece of :func:`soft_assign`) and accumulates the column
    log-sum-exp L_k = logsumexp_x(a + v + u) over the GLOBAL batch: a running (max, sum of exp) per
    column over chunks, then all-reduce max and all-reduce sum of K values, so R ranks give the v of
    one process. Then v <- v + log(n r_k) - L, i.e. v = log(n r_k) - logsumexp_x(a + u), where
    ``log_ratio`` is log r_k (sum_k r_k = 1) and log n = logsumexp_k L_k (every row sums to 1, so
    the columns sum to the global row count: no extra collective). The final E-step is
    ``soft_assign(x, codebook, log_weight + v, ...)``: its rows sum to 1 and its columns to n r_k
    up to the last iteration's residual. Never holds more than two (chunk x K) buffers. Each pass is
    the fused backend's ``column_lse`` (C++ on CPU, Triton row + column passes on CUDA) when one
    applies, else :func:`_column_lse_eager`, the reference.
    """
    base = x.new_zeros(codebook.shape[0]) if log_weight is None else log_weight
    v = torch.zeros_like(base) if start is None else start.clone()  # ``start``: warm start (last step's v)
    backend = fused_backend(x, codebook)
    for _ in range(iters):
        code_bias = base + v
        local = None if backend is None else backend.column_lse(x, codebook, code_bias, beta, rows)
        if local is None:
            local = _column_lse_eager(x, codebook, code_bias, beta, rows)
        col_lse = _global_lse(*local)
        v.add_(log_ratio + torch.logsumexp(col_lse, 0) - col_lse)
    return v


def _column_lse_eager(x: Tensor, codebook: Tensor, code_bias: Tensor, beta: float, rows: int) -> tuple[Tensor, Tensor]:
    """The reference of the fused ``column_lse``: local (M, S) with logsumexp_x w = M + log S, where
    w = a - logsumexp_k a and a = code_bias - beta d (row constants dropped), over chunks of rows."""
    n, num_codes = x.shape[0], codebook.shape[0]
    bias = code_bias - beta * codebook.square().sum(1)
    scores = x.new_empty(max(min(rows, n), 1), num_codes)
    probs = torch.empty_like(scores)
    col_max = x.new_full((num_codes,), -math.inf)
    col_sum = x.new_zeros(num_codes)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        a, u = scores[: stop - start], probs[: stop - start]
        torch.addmm(bias, x[start:stop], codebook.t(), alpha=2.0 * beta, out=a)
        norm = row_softmax_(a, a.amax(1), u)
        a.sub_(norm.log_()[:, None])  # w = log p(k|x) under the current v, unclamped
        new_max = torch.maximum(col_max, a.amax(0))
        col_sum.mul_((col_max - new_max).exp_())
        a.sub_(new_max).clamp_(min=LOG_P_FLOOR).exp_()
        col_sum.add_(a.sum(0))
        col_max = new_max
    return col_max, col_sum


def _global_lse(local_max: Tensor, local_sum: Tensor) -> Tensor:
    """log sum over ranks of local_sum * exp(local_max): all-reduce max, then sum of rescaled exp."""
    global_max = dist.all_reduce_max(local_max.clone())
    # A rank with no rows has max -inf and sum 0: its term is 0, never NaN.
    scale = torch.where(torch.isfinite(local_max), (local_max - global_max).exp(), torch.zeros_like(local_max))
    total = dist.all_reduce_sum(local_sum * scale)
    return global_max + total.log()
