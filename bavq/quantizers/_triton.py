"""Triton kernels of the soft E-step on CUDA: two streaming passes, never an N x K matrix.

The E-step has the shape of attention (rows x against codes e, a row-wise log-sum-exp over K,
then per-code sums), so it is done like flash attention, in fp32 with an online log-sum-exp:

* :func:`row_pass` (row-parallel: one program per block of rows, streaming over code tiles):
  scores a(x,k) = c_k - beta d'(x,k) with d' = ||e_k||^2 - 2 x.e_k (= d - ||x||^2) and an optional
  per-code bias c (BA-VQ: (1 - lambda) log q; Sinkhorn: l_k + v_k). Returns per row the running
  max, lse = log sum_k exp a, argmax a, min d' and argmin d', d' at argmax a, E_p[a], E_p[d'].
* :func:`col_pass` (code-parallel: one program per block of codes [and of dimensions], streaming over
  row tiles, so each code's sums are accumulated by one program in a fixed order: deterministic,
  no atomics): z(x,k) = c_k - beta d'(x,k) + r_x with an optional per-row bias r. Returns per code
  col_max_k and col_sum_k = sum_x exp(z - col_max_k) (so log sum_x exp z = col_max + log col_sum,
  and ranks can all-reduce max, rescale, then sum) and sums_k = sum_x exp(z - col_max_k) x.

One kernel serves both E-step rules:

* BA-VQ (``soft_assign``): ``row_pass(x, E, beta, c)`` then ``col_pass(x, E, beta, c, -lse)``; the
  column pass then sums p(k|x) = exp(a - lse): S = col_sum * exp(col_max), M^b = sums * exp(col_max).
* Balanced / Sinkhorn: u_x = -logsumexp_k(a + v) is ``-row_pass(x, E, beta, l + v)["lse"]``;
  logsumexp_x(a + u) is ``col_max + log(col_sum)`` of ``col_pass(x, E, beta, l, u)`` (all-reduce
  max of col_max, rescale col_sum by exp(col_max - global max), all-reduce sum: the global column
  LSE), and v_k = log(n r_k) - that. The final sums come from ``col_pass(x, E, beta, l + v, u)``.
  All biases are relative to d' (the -beta ||x||^2 row constant is dropped everywhere), so u and v
  computed from these passes are consistent with each other.

``bavq/quantizers/_fused.py`` has CPU twins with the same arguments and results (``row_pass``,
``col_pass``; chunked torch code), so the balanced E-step can call ``_triton`` or ``_fused`` by device.

Distances are computed with ``tl.dot(..., input_precision="ieee")`` (TF32 off, DESIGN.md Numerics)
unless ``allow_tf32=True`` (``BAVQ_TRITON_TF32=1`` for the quantizer's calls). On this project's
CPU-only build machine the kernels are checked with ``TRITON_INTERPRET=1`` against the eager
reference (tests/test_fused_kernels.py); they have not run on a GPU yet (``BAVQ_KERNELS=eager``
switches them off).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # optional dependency: the CPU build machine has it, a CUDA wheel of torch ships it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None


# TF32 for the distance dot products only when asked (it changes ~40% of nearest codes at K >= 4096).
ALLOW_TF32 = os.environ.get("BAVQ_TRITON_TF32", "0") == "1"


def available() -> bool:
    """True when Triton is importable (kernels for CUDA tensors, or any tensor when interpreting)."""
    return triton is not None


def _blocks(dim: int) -> int:
    return max(16, min(64, triton.next_power_of_2(dim)))


if triton is not None:

    @triton.jit
    def _scores(x_ptr, e_ptr, rows, cols, n, k, dim, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
        """x[rows] . e[cols]^T as a (BLOCK_M, BLOCK_N) fp32 tile, looping over D."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            xt = tl.load(x_ptr + rows[:, None] * dim + ds[None, :],
                         mask=(rows[:, None] < n) & (ds[None, :] < dim), other=0.0)
            et = tl.load(e_ptr + cols[None, :] * dim + ds[:, None],
                         mask=(cols[None, :] < k) & (ds[:, None] < dim), other=0.0)
            acc += tl.dot(xt, et, input_precision=PRECISION)
        return acc

    @triton.jit
    def _row_kernel(x_ptr, e_ptr, sq_ptr, c_ptr, out_ptr, idx_ptr, n, k, dim, beta,
                    HAS_BIAS: tl.constexpr, SOFT: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        inf = float("inf")
        m = tl.full((BLOCK_M,), -inf, tl.float32)  # running max of a
        s = tl.zeros((BLOCK_M,), tl.float32)  # sum exp(a - m)
        ta = tl.zeros((BLOCK_M,), tl.float32)  # sum exp(a - m) a
        td = tl.zeros((BLOCK_M,), tl.float32)  # sum exp(a - m) d'
        arg_a = tl.zeros((BLOCK_M,), tl.int32)
        dmin = tl.full((BLOCK_M,), inf, tl.float32)
        arg_d = tl.zeros((BLOCK_M,), tl.int32)
        d_at_a = tl.zeros((BLOCK_M,), tl.float32)
        for k0 in range(0, k, BLOCK_N):
            cols = k0 + tl.arange(0, BLOCK_N)
            valid = cols < k
            dot = _scores(x_ptr, e_ptr, rows, cols, n, k, dim, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
            sq = tl.load(sq_ptr + cols, mask=valid, other=0.0)
            d = sq[None, :] - 2.0 * dot  # d' = d - ||x||^2
            d = tl.where(valid[None, :], d, inf)
            tile_dmin = tl.min(d, axis=1)
            tile_darg = tl.argmin(d, axis=1) + k0
            better_d = tile_dmin < dmin
            arg_d = tl.where(better_d, tile_darg, arg_d)
            dmin = tl.where(better_d, tile_dmin, dmin)
            if SOFT:
                a = -beta * d
                if HAS_BIAS:
                    a += tl.load(c_ptr + cols, mask=valid, other=0.0)[None, :]
                a = tl.where(valid[None, :], a, -inf)
                tile_amax = tl.max(a, axis=1)
                tile_aarg = tl.argmax(a, axis=1)
                tile_d_at = tl.sum(tl.where(tl.arange(0, BLOCK_N)[None, :] == tile_aarg[:, None], d, 0.0), axis=1)
                better_a = tile_amax > m
                arg_a = tl.where(better_a, tile_aarg + k0, arg_a)
                d_at_a = tl.where(better_a, tile_d_at, d_at_a)
                m_new = tl.maximum(m, tile_amax)
                alpha = tl.exp(m - m_new)
                p = tl.where(valid[None, :], tl.exp(a - m_new[:, None]), 0.0)
                s = s * alpha + tl.sum(p, axis=1)
                ta = ta * alpha + tl.sum(p * tl.where(valid[None, :], a, 0.0), axis=1)
                td = td * alpha + tl.sum(p * tl.where(valid[None, :], d, 0.0), axis=1)
                m = m_new
        ok = rows < n
        tl.store(out_ptr + rows * 8 + 0, dmin, mask=ok)
        tl.store(idx_ptr + rows * 2 + 0, arg_d, mask=ok)
        if SOFT:
            tl.store(out_ptr + rows * 8 + 1, m, mask=ok)
            tl.store(out_ptr + rows * 8 + 2, m + tl.log(s), mask=ok)
            tl.store(out_ptr + rows * 8 + 3, ta / s, mask=ok)
            tl.store(out_ptr + rows * 8 + 4, td / s, mask=ok)
            tl.store(out_ptr + rows * 8 + 5, d_at_a, mask=ok)
            tl.store(idx_ptr + rows * 2 + 1, arg_a, mask=ok)

    @triton.jit
    def _col_kernel(x_ptr, e_ptr, sq_ptr, c_ptr, r_ptr, max_ptr, sum_ptr, sums_ptr, n, k, dim, beta,
                    HAS_BIAS: tl.constexpr, HAS_ROW_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                    PRECISION: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ds = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)  # this program's slice of M's D
        valid = cols < k
        inf = float("inf")
        sq = tl.load(sq_ptr + cols, mask=valid, other=0.0)
        c = tl.zeros((BLOCK_N,), tl.float32)
        if HAS_BIAS:
            c = tl.load(c_ptr + cols, mask=valid, other=0.0)
        m = tl.full((BLOCK_N,), -inf, tl.float32)
        s = tl.zeros((BLOCK_N,), tl.float32)
        acc = tl.zeros((BLOCK_N, BLOCK_S), tl.float32)
        for n0 in range(0, n, BLOCK_M):
            rows = n0 + tl.arange(0, BLOCK_M)
            rvalid = rows < n
            dot = _scores(x_ptr, e_ptr, rows, cols, n, k, dim, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
            z = c[None, :] - beta * (sq[None, :] - 2.0 * dot)
            if HAS_ROW_BIAS:
                z += tl.load(r_ptr + rows, mask=rvalid, other=0.0)[:, None]
            z = tl.where(rvalid[:, None], z, -inf)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.where(rvalid[:, None], tl.exp(z - m_new[None, :]), 0.0)  # (BLOCK_M, BLOCK_N)
            s = s * alpha + tl.sum(p, axis=0)
            xs = tl.load(x_ptr + rows[:, None] * dim + ds[None, :], mask=rvalid[:, None] & (ds[None, :] < dim),
                         other=0.0)
            acc = acc * alpha[:, None] + tl.dot(tl.trans(p), xs, input_precision=PRECISION)
            m = m_new
        tl.store(sums_ptr + cols[:, None] * dim + ds[None, :], acc, mask=valid[:, None] & (ds[None, :] < dim))
        if tl.program_id(1) == 0:
            tl.store(max_ptr + cols, m, mask=valid)
            tl.store(sum_ptr + cols, s, mask=valid)


def _prep(x: Tensor, codebook: Tensor, bias: Tensor | None):
    x, codebook = x.float().contiguous(), codebook.float().contiguous()
    sq = codebook.square().sum(1).contiguous()
    bias = None if bias is None else bias.float().contiguous()
    return x, codebook, sq, bias


@torch.no_grad()
def row_pass(x: Tensor, codebook: Tensor, beta: float, code_bias: Tensor | None = None, *, soft: bool = True,
             allow_tf32: bool = False, block_m: int = 64, block_n: int = 64) -> dict[str, Tensor]:
    """Row statistics of a(x,k) = code_bias_k - beta d'(x,k) (see the module docstring).

    Returns a dict of (N,) tensors: ``min_d`` (min_k d'), ``argmin_d``; with ``soft``: ``a_max``,
    ``lse`` (log sum_k exp a), ``argmax_a``, ``d_at_argmax``, ``mean_a`` (E_p[a]) and ``mean_d``
    (E_p[d']). Add ||x||^2 to d' quantities for squared distances; entropy H = lse - mean_a.
    """
    x, codebook, sq, bias = _prep(x, codebook, code_bias)
    n, dim = x.shape
    out = x.new_empty(n, 8)
    idx = torch.empty(n, 2, dtype=torch.int32, device=x.device)
    grid = (triton.cdiv(n, block_m),)
    _row_kernel[grid](x, codebook, sq, sq if bias is None else bias, out, idx, n, codebook.shape[0], dim,
                      float(beta), HAS_BIAS=bias is not None, SOFT=soft, BLOCK_M=block_m, BLOCK_N=block_n,
                      BLOCK_D=_blocks(dim), PRECISION="tf32" if allow_tf32 else "ieee")
    result = {"min_d": out[:, 0], "argmin_d": idx[:, 0].long()}
    if soft:
        result.update(a_max=out[:, 1], lse=out[:, 2], mean_a=out[:, 3], mean_d=out[:, 4], d_at_argmax=out[:, 5],
                      argmax_a=idx[:, 1].long())
    return result


@torch.no_grad()
def col_pass(x: Tensor, codebook: Tensor, beta: float, code_bias: Tensor | None = None,
             row_bias: Tensor | None = None, *, allow_tf32: bool = False, block_m: int = 64,
             block_n: int = 64) -> dict[str, Tensor]:
    """Column statistics of z(x,k) = code_bias_k - beta d'(x,k) + row_bias_x (module docstring).

    Returns ``col_max`` (K,), ``col_sum`` (K,) = sum_x exp(z - col_max) and ``sums`` (K, D) =
    sum_x exp(z - col_max) x; log sum_x exp z = col_max + log col_sum.
    """
    x, codebook, sq, bias = _prep(x, codebook, code_bias)
    row_bias = None if row_bias is None else row_bias.float().contiguous()
    n, dim = x.shape
    num_codes = codebook.shape[0]
    col_max, col_sum = x.new_empty(num_codes), x.new_empty(num_codes)
    sums = x.new_empty(num_codes, dim)
    block_s = _blocks(dim)
    grid = (triton.cdiv(num_codes, block_n), triton.cdiv(dim, block_s))
    _col_kernel[grid](x, codebook, sq, sq if bias is None else bias, sq if row_bias is None else row_bias,
                      col_max, col_sum, sums, n, num_codes, dim, float(beta), HAS_BIAS=bias is not None,
                      HAS_ROW_BIAS=row_bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                      BLOCK_D=_blocks(dim), BLOCK_S=block_s, PRECISION="tf32" if allow_tf32 else "ieee")
    return {"col_max": col_max, "col_sum": col_sum, "sums": sums}


def nearest_codes(x: Tensor, codebook: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """``_nearest.nearest_codes`` as one row pass without the soft part (``rows`` is not needed)."""
    r = row_pass(x, codebook, 0.0, soft=False, allow_tf32=ALLOW_TF32)
    return r["argmin_d"], (r["min_d"] + x.float().square().sum(1)).clamp_(min=0.0)


def soft_assign(x: Tensor, codebook: Tensor, log_weight: Tensor | None, beta: float, rows: int,
                nearest: bool) -> dict[str, Tensor]:
    """``_soft.soft_assign`` (same inputs, SoftStats fields as a dict) in two passes, no N x K."""
    r = row_pass(x, codebook, beta, log_weight, allow_tf32=ALLOW_TF32)
    cols = col_pass(x, codebook, beta, log_weight, -r["lse"], allow_tf32=ALLOW_TF32)
    scale = cols["col_max"].exp()
    sq_rows = x.float().square().sum(1)
    hard = r["min_d"] if nearest else r["d_at_argmax"]
    return {
        "indices": r["argmin_d"] if nearest else r["argmax_a"],
        "soft_counts": cols["col_sum"] * scale,
        "soft_sums": cols["sums"] * scale[:, None],
        "min_dist": (r["min_d"] + sq_rows).clamp_(min=0.0),
        "hard_dist": (hard + sq_rows).clamp_(min=0.0),
        "entropy": r["lse"] - r["mean_a"],
        "soft_dist": r["mean_d"] + sq_rows,
    }


def code_gaps(x: Tensor, codebook: Tensor, rows: int) -> None:
    """No Triton kernel for the code gaps (anneal mode's reach measure): the eager code runs."""
    return None


def column_lse(x: Tensor, codebook: Tensor, code_bias: Tensor, beta: float, rows: int) -> tuple[Tensor, Tensor]:
    """One Sinkhorn iteration's column statistics (``_fused.column_lse``'s contract): the row pass
    gives each row's log-sum-exp, the column pass the column (max, sum) of a - lse."""
    r = row_pass(x, codebook, beta, code_bias, allow_tf32=ALLOW_TF32)
    cols = col_pass(x, codebook, beta, code_bias, -r["lse"], allow_tf32=ALLOW_TF32)
    return cols["col_max"], cols["col_sum"]
