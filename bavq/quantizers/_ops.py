"""Shared codebook math, written once: chunked distances, hard and soft statistics, global sampling.

Nothing here materializes an N x K matrix for the whole batch: rows are processed in chunks of
``chunk_rows(K, chunk_size, budget)`` rows and at most two (chunk x K) fp32 work buffers are alive
at a time. The buffers are allocated once per call and reused (``out=``): on CPU a fresh 128 MiB
allocation per chunk costs page faults that tripled the time of the distance matmul.
Squared distances use ``||x||^2 - 2 x e^T + ||e||^2`` through ``addmm``; since ``||x||^2`` is a
row constant it is left out of the (chunk x K) matrix and added to the per-row results only.

Fused kernels (issue 15): ``soft_assign`` and ``nearest_codes`` first try a fused path
(``_fused.py``: a C++ sweep on CPU; ``_triton.py``: a two-pass Triton kernel on CUDA) and run the
eager code below, the reference, when none applies. ``BAVQ_KERNELS=eager`` in the environment or
``set_kernels("eager")`` forces the eager code; ``set_kernels("auto")`` is the default.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from bavq import dist
from bavq.quantizers._limits import LOG_P_FLOOR


@contextlib.contextmanager
def fp32_math(device_type: str):
    """Autocast off and full-precision fp32 matmuls (no TF32 / bf16 passes) inside the block.

    bf16 autocast changes the nearest code of ~70% of rows and TF32 of ~40% at K >= 4096
    (DESIGN.md, Numerics), so codebook math never runs in reduced precision.
    """
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)


def chunk_rows(num_codes: int, chunk_size: int, budget_mib: int) -> int:
    """Rows per chunk: at most ``chunk_size`` and such that a (rows x K) fp32 matrix fits the budget."""
    return max(1, min(chunk_size, budget_mib * 2**20 // (4 * num_codes)))


def to_rows(z: Tensor, code_dim: int) -> Tensor:
    """(B, D, *spatial) channel-first -> (B * prod(spatial), D) rows (a view when possible)."""
    if z.dim() < 2 or z.shape[1] != code_dim:
        raise ValueError(f"expected input of shape (B, {code_dim}, *spatial), got {tuple(z.shape)}")
    return z.movedim(1, -1).reshape(-1, code_dim)


def from_rows(rows: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`to_rows` for an input of ``shape`` (B, D, *spatial)."""
    return rows.reshape(shape[0], *shape[2:], rows.shape[-1]).movedim(-1, 1)


_KERNELS = {"mode": os.environ.get("BAVQ_KERNELS", "auto")}


def set_kernels(mode: str) -> str:
    """Select "auto" (fused kernels where they apply) or "eager" (always the eager reference);
    returns the previous mode."""
    if mode not in ("auto", "eager"):
        raise ValueError(f"kernels must be 'auto' or 'eager', got '{mode}'")
    previous, _KERNELS["mode"] = _KERNELS["mode"], mode
    return previous


def _fused_backend(x: Tensor, codebook: Tensor):
    """The module serving fused kernels for these tensors (``_fused`` or ``_triton``), or None."""
    if _KERNELS["mode"] == "eager" or x.dtype != torch.float32 or codebook.dtype != torch.float32:
        return None
    if x.shape[0] == 0 or x.device != codebook.device:
        return None
    if x.device.type == "cuda":
        from bavq.quantizers import _triton

        return _triton if _triton.available() else None
    if x.device.type == "cpu":
        from bavq.quantizers import _fused

        return _fused
    return None


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-row inner product of two (n, K) matrices without an (n, K) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


@torch.no_grad()
def nearest_codes(x: Tensor, codebook: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """Hard assignment argmin_k ||x - e_k||^2 of each row of x (N, D).

    Returns (indices (N,) int64, squared distance to the nearest code (N,)).
    """
    backend = _fused_backend(x, codebook)
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
        _column_max_(neg_gap, d.sub_(d_min[:, None]).neg_())
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


def _row_softmax_(a: Tensor, a_max: Tensor, u: Tensor) -> Tensor:
    """The row piece shared by every E-step: a (n, K) logits, a_max their row maxima.

    In place: a <- b = a - a_max (unclamped, in (-inf, 0]); u <- exp(max(b, LOG_P_FLOOR)), the
    unnormalized p whose row max is exp(0) = 1. Returns norm = sum_k u (>= 1), so the row
    log-sum-exp is a_max + log(norm) and p = u / norm.
    """
    a.sub_(a_max[:, None])
    torch.clamp(a, min=LOG_P_FLOOR, out=u)
    return u.exp_().sum(1)


def _column_max_(col_max: Tensor, w: Tensor) -> None:
    """The column piece: running max over row chunks of w (n, K), into col_max (K,)."""
    torch.maximum(col_max, w.amax(0), out=col_max)


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
        _column_max_(best_b, a.sub_(a.amax(1, keepdim=True)))
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
    to the floor) and cannot move; a column max per chunk detects them exactly.
    """
    backend = _fused_backend(x, codebook)
    if backend is not None:
        fused = backend.soft_assign(x, codebook, log_weight, beta, rows, nearest)
        if fused is not None:
            # The fused kernels do not yet return the column maximum behind ``reached`` (a
            # diagnostic): one extra chunked pass computes it (TODO: fold it into the kernels).
            return SoftStats(**fused, reached=reached_codes(x, codebook, log_weight, beta, rows))
    n, dim = x.shape
    num_codes = codebook.shape[0]
    sq_codes = codebook.square().sum(1)
    sq_rows = x.square().sum(1)
    out = {name: x.new_empty(n) for name in ("min_dist", "hard_dist", "entropy", "soft_dist")}
    indices = torch.empty(n, dtype=torch.int64, device=x.device)
    sums_t = x.new_zeros(dim + 1, num_codes)  # rows 0..D-1: M^b transposed; row D: S
    best_b = x.new_full((num_codes,), -math.inf)
    scores = x.new_empty(min(rows, n), num_codes)
    probs = torch.empty_like(scores)
    fused_bias = -beta * sq_codes if log_weight is None else None
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        xc, a, u = x[start:stop], scores[: stop - start], probs[: stop - start]
        if log_weight is None:
            torch.addmm(fused_bias, xc, codebook.t(), alpha=2.0 * beta, out=a)
            a_max, a_arg = a.max(1)
            indices[start:stop] = a_arg
            out["min_dist"][start:stop] = a_max / -beta
            out["hard_dist"][start:stop] = out["min_dist"][start:stop]
        else:
            torch.addmm(sq_codes, xc, codebook.t(), alpha=-2.0, out=u)  # d' = d - ||x||^2
            d_min, d_arg = u.min(1)
            torch.add(log_weight, u, alpha=-beta, out=a)  # a' = log_weight - beta d'
            a_max, a_arg = a.max(1)
            out["min_dist"][start:stop] = d_min
            if nearest:
                indices[start:stop] = d_arg
                out["hard_dist"][start:stop] = d_min
            else:
                indices[start:stop] = a_arg
                out["hard_dist"][start:stop] = u.gather(1, a_arg[:, None]).squeeze(1)
        norm = _row_softmax_(a, a_max, u)  # a <- b = a' - max a' (<= 0); u <- exp(b), floored
        _column_max_(best_b, a)
        # sum_k p_k b_k, multiplying b in place (it is not read again): an in-place mul + sum takes
        # about half the time of the bmm row dot on a 2048 x 16384 chunk (benchmarks/bench_kernel.py).
        # Entries below the floor contribute e^-80 * b instead of e^b * b: both vanish in fp32.
        mean_b = a.mul_(u).sum(1).div_(norm)
        out["entropy"][start:stop] = norm.log() - mean_b  # H = log norm - sum_k p_k b_k
        mean_a = mean_b + a_max  # sum_k p_k a'_k
        mean_w = 0.0 if log_weight is None else (u @ log_weight) / norm
        out["soft_dist"][start:stop] = (mean_w - mean_a) / beta  # sum_k p_k d'_k
        weights = torch.cat([xc, torch.ones_like(xc[:, :1])], dim=1).div_(norm[:, None])
        sums_t.addmm_(weights.t(), u)  # (D+1, chunk) @ (chunk, K): the fast layout on CPU
    for name in ("min_dist", "hard_dist", "soft_dist"):
        out[name].add_(sq_rows)
    out["min_dist"].clamp_(min=0.0)
    out["hard_dist"].clamp_(min=0.0)
    return SoftStats(indices=indices, soft_counts=sums_t[dim].clone(), soft_sums=sums_t[:dim].t().clone(),
                     reached=(best_b > LOG_P_FLOOR).to(x.dtype), **out)


@torch.no_grad()
def balance_potentials(x: Tensor, codebook: Tensor, log_weight: Tensor | None, beta: float, rows: int,
                       log_ratio: Tensor, iters: int) -> Tensor:
    """Column potentials v (K,) of the balanced E-step p(k|x) = exp(a(x,k) + u_x + v_k).

    Log-domain Sinkhorn: each iteration is one chunked pass that takes the row potentials
    u_x = -logsumexp_k(a + v) (the row piece of :func:`soft_assign`) and accumulates the column
    log-sum-exp L_k = logsumexp_x(a + v + u) over the GLOBAL batch: a running (max, sum of exp) per
    column over chunks, then all-reduce max and all-reduce sum of K values, so R ranks give the v of
    one process. Then v <- v + log(n r_k) - L, i.e. v = log(n r_k) - logsumexp_x(a + u), where
    ``log_ratio`` is log r_k (sum_k r_k = 1) and log n = logsumexp_k L_k (every row sums to 1, so
    the columns sum to the global row count: no extra collective). The final E-step is
    ``soft_assign(x, codebook, log_weight + v, ...)``: its rows sum to 1 and its columns to n r_k
    up to the last iteration's residual. Never holds more than two (chunk x K) buffers.
    """
    n, num_codes = x.shape[0], codebook.shape[0]
    sq_codes = codebook.square().sum(1)
    base = x.new_zeros(num_codes) if log_weight is None else log_weight
    v = torch.zeros_like(base)
    scores = x.new_empty(max(min(rows, n), 1), num_codes)
    probs = torch.empty_like(scores)
    for _ in range(iters):
        bias = (base + v).sub_(beta * sq_codes)
        col_max = x.new_full((num_codes,), -math.inf)
        col_sum = x.new_zeros(num_codes)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            a, u = scores[: stop - start], probs[: stop - start]
            torch.addmm(bias, x[start:stop], codebook.t(), alpha=2.0 * beta, out=a)  # a + v (row consts dropped)
            norm = _row_softmax_(a, a.amax(1), u)
            a.sub_(norm.log_()[:, None])  # w = a + v + u = log p(k|x) under the current v, unclamped
            new_max = torch.maximum(col_max, a.amax(0))
            col_sum.mul_((col_max - new_max).exp_())
            a.sub_(new_max).clamp_(min=LOG_P_FLOOR).exp_()
            col_sum.add_(a.sum(0))
            col_max = new_max
        col_lse = _global_lse(col_max, col_sum)
        v.add_(log_ratio + torch.logsumexp(col_lse, 0) - col_lse)
    return v


def _global_lse(local_max: Tensor, local_sum: Tensor) -> Tensor:
    """log sum over ranks of local_sum * exp(local_max): all-reduce max, then sum of rescaled exp."""
    global_max = dist.all_reduce_max(local_max.clone())
    # A rank with no rows has max -inf and sum 0: its term is 0, never NaN.
    scale = torch.where(torch.isfinite(local_max), (local_max - global_max).exp(), torch.zeros_like(local_max))
    total = dist.all_reduce_sum(local_sum * scale)
    return global_max + total.log()


def _entropy_loss_grad(x: Tensor, codebook: Tensor, log_weight: Tensor, beta: float, log_mean_p: Tensor,
                       rows: int) -> Tensor:
    """Gradient w.r.t. x of sum_x [H(p(.|x)) + p(.|x) . c], c = log mean_x p fixed, chunk by chunk.

    With a_k = log_weight_k - beta d(x,k): d/da_j = p_j (g_j - sum_k p_k g_k), g = c - log p, and
    d a_j / dx = -2 beta (x - e_j), hence grad = -2 beta (x sum_j w_j - w @ E) with w = that vector.
    """
    grad = torch.empty_like(x)
    bias = log_weight - beta * codebook.square().sum(1)
    for start in range(0, x.shape[0], rows):
        xc = x[start : start + rows]
        log_p = torch.addmm(bias, xc, codebook.t(), alpha=2.0 * beta)
        log_p.sub_(log_p.amax(1, keepdim=True)).clamp_(min=LOG_P_FLOOR)
        p = log_p.exp()
        norm = p.sum(1, keepdim=True)
        p.div_(norm)
        log_p.sub_(norm.log())
        g = log_p.neg_().add_(log_mean_p)  # in place: log p is no longer needed
        w = g.sub_(_row_dot(p, g)[:, None]).mul_(p)
        grad[start : start + rows] = -2.0 * beta * (xc * w.sum(1, keepdim=True) - w @ codebook)
    return grad


class EntropyLoss(torch.autograd.Function):
    """mean_x H(p(.|x)) - H(mean_x p(.|x)) with a chunked backward that never holds N x K.

    The forward receives the value already computed by the E-step. Because
    d/dp_x [-H(mean p)] = (log mean p + 1) / N and sum_k dp_k = 0, the gradient equals that of
    (1/N) sum_x [H(p_x) + p_x . sg(log mean p)], which splits into independent row chunks.
    ``grad_scale`` (a 0-dim tensor) multiplies the row gradients, e.g. to turn this call's 1/rows
    into the 1/N of a global batch spread over ranks.
    """

    @staticmethod
    def forward(ctx, x, value, codebook, log_weight, log_mean_p, beta, rows, grad_scale):  # noqa: D102
        ctx.save_for_backward(x, codebook, log_weight, log_mean_p, grad_scale)
        ctx.beta, ctx.rows = beta, rows
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, codebook, log_weight, log_mean_p, grad_scale = ctx.saved_tensors
        with torch.no_grad(), fp32_math(x.device.type):
            grad = _entropy_loss_grad(x, codebook, log_weight, ctx.beta, log_mean_p, ctx.rows)
            grad.mul_(grad_out.float() * grad_scale / max(x.shape[0], 1))
        return grad, None, None, None, None, None, None, None


def shared_generator(seed: int, step: int, purpose: int) -> torch.Generator:
    """A CPU generator seeded identically on every rank from (seed, step, purpose)."""
    gen = torch.Generator()
    gen.manual_seed((seed * 1_000_003 + step * 16 + purpose) % (2**63))
    return gen


@torch.no_grad()
def sample_global_rows(local: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` rows drawn from the concatenation (rank order) of every rank's ``local`` rows.

    Identical on every rank and identical to one process holding the whole batch: the shared
    generator picks global row numbers (without replacement when there are enough rows, with
    replacement otherwise), each rank fills in the rows it owns, and one all-reduce (sum) of the
    (count, D) result completes it. The traffic is count x D floats whatever the batch size or
    the number of ranks (a fixed-size subset rather than gathering every rank's batch); the
    per-rank row counts come from a tiny all_gather, so ranks may even hold different numbers.
    """
    sizes = dist.all_gather_cat(torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device))
    sizes = sizes.cpu()
    total = int(sizes.sum())
    if total == 0:
        raise RuntimeError("cannot sample codebook vectors from an empty global batch")
    offset = int(sizes[: dist.get_rank()].sum())
    if total >= count:  # drawn on the CPU by the shared CPU generator, then moved
        chosen = torch.randperm(total, generator=generator, device="cpu")[:count]
    else:
        chosen = torch.randint(0, total, (count,), generator=generator, device="cpu")
    chosen = chosen.to(local.device)
    mine = (chosen >= offset) & (chosen < offset + local.shape[0])
    picked = local.new_zeros(count, local.shape[1])
    picked[mine] = local[chosen[mine] - offset]
    return dist.all_reduce_sum(picked)


@torch.no_grad()
def jitter_duplicates(codes: Tensor, generator: torch.Generator, scale: float = 0.1) -> Tensor:
    """``codes`` with every repeated row after its first copy moved by Gaussian noise.

    Data init draws K rows of the global batch with replacement when it holds fewer than K rows
    (K = 16,384 vs 64 x 49 = 3,136 tokens): identical codes then split the same data forever and
    capped usage near 25%. The noise has ``scale`` times the per-dimension std of the drawn rows
    (a small fraction of the data's spread) and comes from the shared generator, so every rank
    gets the same codebook; the first copy of each row stays an exact data vector.
    """
    num, dim = codes.shape
    _, inverse = torch.unique(codes, dim=0, return_inverse=True)
    positions = torch.arange(num, device=codes.device)
    first = torch.full((int(inverse.max()) + 1,), num, device=codes.device, dtype=positions.dtype)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    repeated = positions != first[inverse]
    noise = torch.randn(num, dim, generator=generator).to(codes.device)  # drawn in full: rank-independent
    std = codes.std(0) if num > 1 else codes.new_zeros(dim)
    std = torch.where(std > 0, std, codes.abs().mean().clamp_min(1e-3).expand(dim))
    return torch.where(repeated[:, None], codes + scale * std * noise, codes)
