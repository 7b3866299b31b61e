"""The BA E-step over row chunks: soft statistics of p(k|x) = softmax_k(log_weight_k - beta d(x,k))."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bavq.quantizers._limits import LOG_P_FLOOR
from bavq.quantizers._ops import column_max_, fused_backend, row_softmax_


@dataclass
class SoftStats:
    """Local sufficient statistics of one BA E-step (rows of one forward call)."""

    indices: Tensor  # (N,) int64 hard codes
    soft_counts: Tensor  # (K,) S_k = sum_x p(k|x)
    soft_sums: Tensor  # (K, D) M^b_k = sum_x p(k|x) x
    min_dist: Tensor  # (N,) min_k d(x, k)
    hard_dist: Tensor  # (N,) d(x, index(x))
    entropy: Tensor  # (N,) H(p(.|x)) in nats
    soft_dist: Tensor  # (N,) sum_k p(k|x) d(x, k)
    reached: Tensor  # (K,) 1.0 where some row gives code k log-odds above LOG_P_FLOOR, else 0.0
    gaps: Tensor | None = None  # (K,) _nearest.code_gaps of these rows, where the pass had d (a log_weight)


@torch.no_grad()
def reached_codes(x: Tensor, codebook: Tensor, log_weight: Tensor | None, beta: float, rows: int) -> Tensor:
    """(K,) 1.0 where some row of x gives code k log-odds max_x (a(x,k) - max_j a(x,j)) above
    LOG_P_FLOOR, else 0.0 -- the ``reached`` field of :func:`soft_assign`, chunked."""
    num_codes = codebook.shape[0]
    bias = -beta * codebook.square().sum(1)
    if log_weight is not None:
        bias = bias + log_weight
    best_b = x.new_full((num_codes,), -math.inf)
    work = x.new_empty(min(rows, x.shape[0]), num_codes)
    for start in range(0, x.shape[0], rows):
        a = work[: min(start + rows, x.shape[0]) - start]
        torch.addmm(bias, x[start : start + rows], codebook.t(), alpha=2.0 * beta, out=a)
        column_max_(best_b, a.sub_(a.amax(1, keepdim=True)))
    return (best_b > LOG_P_FLOOR).to(x.dtype)


@torch.no_grad()
def soft_assign(x: Tensor, codebook: Tensor, log_weight: Tensor | None, beta: float, rows: int,
                nearest: bool) -> SoftStats:
    """BA E-step over rows of x (N, D): a(x,k) = log_weight_k - beta d(x,k), p = softmax_k a.

    ``log_weight`` is (1 - lambda) log q (plus the Sinkhorn column potentials v in the balanced
    E-step), or None when it is identically 0 (lambda = 1): then a' = -beta (d - ||x||^2) comes
    straight out of one addmm and argmax a' is the nearest code. The -beta ||x||^2 row constant is
    dropped (softmax is shift invariant). The softmax is done in the log domain (max shift), so rows
    never underflow to NaN at K = 16,384. ``reached`` flags the codes whose best log-odds over these
    rows, max_x (a(x,k) - max_j a(x,j)), is above LOG_P_FLOOR: the others get zero mass in fp32 (up
    to the floor) and cannot move; a column max per chunk detects them exactly. With a ``log_weight``
    the pass also holds the distances and returns ``gaps`` (:func:`._nearest.code_gaps`, anneal mode's
    reach measure) from one more column max; else (and on the Triton path) ``gaps`` is None.
    """
    backend = fused_backend(x, codebook)
    if backend is not None:
        fused = backend.soft_assign(x, codebook, log_weight, beta, rows, nearest)
        if fused is not None:
            if "reached" not in fused:  # the Triton passes do not return the column maximum behind it
                fused["reached"] = reached_codes(x, codebook, log_weight, beta, rows)
            return SoftStats(**fused)
    return _soft_assign_eager(x, codebook, log_weight, beta, rows, nearest)


def _soft_assign_eager(x: Tensor, codebook: Tensor, log_weight: Tensor | None, beta: float, rows: int,
                       nearest: bool) -> SoftStats:
    """The reference code of :func:`soft_assign`: two (chunk x K) buffers, reused over the chunks."""
    n, dim = x.shape
    num_codes = codebook.shape[0]
    sq_codes = codebook.square().sum(1)
    sq_rows = x.square().sum(1)
    out = {name: x.new_empty(n) for name in ("min_dist", "hard_dist", "entropy", "soft_dist")}
    out["indices"] = torch.empty(n, dtype=torch.int64, device=x.device)
    sums_t = x.new_zeros(dim + 1, num_codes)  # rows 0..D-1: M^b transposed; row D: S
    best_b = x.new_full((num_codes,), -math.inf)
    scores = x.new_empty(min(rows, n), num_codes)
    probs = torch.empty_like(scores)
    fused_bias = -beta * sq_codes if log_weight is None else None
    neg_gap = None if log_weight is None else x.new_full((num_codes,), -math.inf)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        xc, a, u = x[start:stop], scores[: stop - start], probs[: stop - start]
        part = {name: values[start:stop] for name, values in out.items()}  # views: written in place
        a_max = _chunk_logits(xc, codebook, sq_codes, fused_bias, log_weight, beta, nearest, a, u, part, neg_gap)
        _chunk_soft_stats(xc, a, a_max, u, log_weight, beta, part, best_b, sums_t)
    for name in ("min_dist", "hard_dist", "soft_dist"):
        out[name].add_(sq_rows)
    out["min_dist"].clamp_(min=0.0)
    out["hard_dist"].clamp_(min=0.0)
    gaps = None if neg_gap is None else neg_gap.neg_().clamp_(min=0.0)
    return SoftStats(soft_counts=sums_t[dim].clone(), soft_sums=sums_t[:dim].t().clone(),
                     reached=(best_b > LOG_P_FLOOR).to(x.dtype), gaps=gaps, **out)


def _chunk_logits(xc: Tensor, codebook: Tensor, sq_codes: Tensor, fused_bias: Tensor | None,
                  log_weight: Tensor | None, beta: float, nearest: bool, a: Tensor, u: Tensor,
                  part: dict[str, Tensor], neg_gap: Tensor | None) -> Tensor:
    """The hard part of one chunk: logits a' = log_weight - beta d' into ``a`` (d' = d - ||x||^2),
    the hard code and the min and hard d' into ``part``; returns the row maxima of a'. Without a
    log_weight one addmm with ``fused_bias`` gives a'; with one, ``u`` first holds d' and the column
    max of min_j d' - d' goes into ``neg_gap``."""
    if log_weight is None:
        torch.addmm(fused_bias, xc, codebook.t(), alpha=2.0 * beta, out=a)
        a_max, a_arg = a.max(1)
        part["indices"].copy_(a_arg)
        part["min_dist"].copy_(a_max / -beta)
        part["hard_dist"].copy_(part["min_dist"])
        return a_max
    torch.addmm(sq_codes, xc, codebook.t(), alpha=-2.0, out=u)  # d' = d - ||x||^2
    d_min, d_arg = u.min(1)
    column_max_(neg_gap, torch.sub(d_min[:, None], u, out=a))
    torch.add(log_weight, u, alpha=-beta, out=a)  # a' = log_weight - beta d'
    a_max, a_arg = a.max(1)
    part["min_dist"].copy_(d_min)
    if nearest:
        part["indices"].copy_(d_arg)
        part["hard_dist"].copy_(d_min)
    else:
        part["indices"].copy_(a_arg)
        part["hard_dist"].copy_(u.gather(1, a_arg[:, None]).squeeze(1))
    return a_max


def _chunk_soft_stats(xc: Tensor, a: Tensor, a_max: Tensor, u: Tensor, log_weight: Tensor | None, beta: float,
                      part: dict[str, Tensor], best_b: Tensor, sums_t: Tensor) -> None:
    """The soft part of one chunk from its logits ``a``: entropy and soft d' into ``part``, the column
    max of the log-odds into ``best_b``, S and M^b added into ``sums_t``."""
    norm = row_softmax_(a, a_max, u)  # a <- b = a' - max a' (<= 0); u <- exp(b), floored
    column_max_(best_b, a)
    # sum_k p_k b_k, multiplying b in place (it is not read again): an in-place mul + sum takes
    # about half the time of the bmm row dot on a 2048 x 16384 chunk (benchmarks/bench_kernel.py).
    # Entries below the floor contribute e^-80 * b instead of e^b * b: both vanish in fp32.
    mean_b = a.mul_(u).sum(1).div_(norm)
    part["entropy"].copy_(norm.log() - mean_b)  # H = log norm - sum_k p_k b_k
    mean_a = mean_b + a_max  # sum_k p_k a'_k
    mean_w = 0.0 if log_weight is None else (u @ log_weight) / norm
    part["soft_dist"].copy_((mean_w - mean_a) / beta)  # sum_k p_k d'_k
    weights = torch.cat([xc, torch.ones_like(xc[:, :1])], dim=1).div_(norm[:, None])
    sums_t.addmm_(weights.t(), u)  # (D+1, chunk) @ (chunk, K): the fast layout on CPU
