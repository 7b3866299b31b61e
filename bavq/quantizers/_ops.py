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
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from bavq import dist


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


# Shifted log-probabilities are clamped here before exp: the vectorized exp takes a ~20x slower
# path for arguments below -88 (measured: 650 ms vs 33 ms for 2048 x 16384), and large beta puts
# most entries there. It raises p from below e^-80 (~1.8e-35) to e^-80: every sum moves by less
# than K * e^-80 per row, far below fp32 resolution of the sums it enters.
LOG_P_FLOOR = -80.0


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


@torch.no_grad()
def soft_assign(x: Tensor, codebook: Tensor, log_weight: Tensor | None, beta: float, rows: int,
                nearest: bool) -> SoftStats:
    """BA E-step over rows of x (N, D): a(x,k) = log_weight_k - beta d(x,k), p = softmax_k a.

    ``log_weight`` is (1 - lambda) log q, or None when it is identically 0 (lambda = 1): then
    a' = -beta (d - ||x||^2) comes straight out of one addmm and argmax a' is the nearest code.
    The -beta ||x||^2 row constant is dropped (softmax is shift invariant). The softmax is done in
    the log domain (max shift), so rows never underflow to NaN at K = 16,384.
    """
    backend = _fused_backend(x, codebook)
    if backend is not None:
        fused = backend.soft_assign(x, codebook, log_weight, beta, rows, nearest)
        if fused is not None:
            return SoftStats(**fused)
    n, dim = x.shape
    num_codes = codebook.shape[0]
    sq_codes = codebook.square().sum(1)
    sq_rows = x.square().sum(1)
    out = {name: x.new_empty(n) for name in ("min_dist", "hard_dist", "entropy", "soft_dist")}
    indices = torch.empty(n, dtype=torch.int64, device=x.device)
    sums_t = x.new_zeros(dim + 1, num_codes)  # rows 0..D-1: M^b transposed; row D: S
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
        a.sub_(a_max[:, None]).clamp_(min=LOG_P_FLOOR)  # b = a' - max a' in [floor, 0]
        torch.exp(a, out=u)  # unnormalized p; the row max contributes exp(0) = 1, so sum >= 1
        norm = u.sum(1)
        # sum_k p_k b_k, multiplying b in place (it is not read again): an in-place mul + sum takes
        # about half the time of the bmm row dot on a 2048 x 16384 chunk (benchmarks/bench_kernel.py)
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
                     **out)


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
