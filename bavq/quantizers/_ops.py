"""Codebook math shared by every E-step: fp32 precision, rows and chunks, kernel selection.

Nothing in the codebook math materializes an N x K matrix for the whole batch: rows are processed
in chunks of ``chunk_rows(K, chunk_size, budget)`` rows and at most two (chunk x K) fp32 work
buffers are alive at a time. The buffers are allocated once per call and reused (``out=``): on CPU
a fresh 128 MiB allocation per chunk costs page faults that tripled the time of the distance matmul.
Squared distances use ``||x||^2 - 2 x e^T + ||e||^2`` through ``addmm``; since ``||x||^2`` is a
row constant it is left out of the (chunk x K) matrix and added to the per-row results only.

The math itself, by responsibility: :mod:`._nearest` (distances, hard codes), :mod:`._soft` (the
BA E-step), :mod:`._sinkhorn` (the balanced E-step's column potentials), :mod:`._entropy_loss`
(the entropy loss with its chunked backward), :mod:`._sampling` (rank-identical random draws).

Fused kernels (issue 15): ``_soft.soft_assign`` and ``_nearest.nearest_codes`` first try a fused
path (``_fused.py``: a C++ sweep on CPU; ``_triton.py``: a two-pass Triton kernel on CUDA, both
chosen by :func:`fused_backend`) and run their eager code, the reference, when none applies.
``BAVQ_KERNELS=eager`` in the environment or ``set_kernels("eager")`` forces the eager code;
``set_kernels("auto")`` is the default.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

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


def fused_backend(x: Tensor, codebook: Tensor):
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


def row_softmax_(a: Tensor, a_max: Tensor, u: Tensor) -> Tensor:
    """The row piece shared by every E-step: a (n, K) logits, a_max their row maxima.

    In place: a <- b = a - a_max (unclamped, in (-inf, 0]); u <- exp(max(b, LOG_P_FLOOR)), the
    unnormalized p whose row max is exp(0) = 1. Returns norm = sum_k u (>= 1), so the row
    log-sum-exp is a_max + log(norm) and p = u / norm.
    """
    a.sub_(a_max[:, None])
    torch.clamp(a, min=LOG_P_FLOOR, out=u)
    return u.exp_().sum(1)


def column_max_(col_max: Tensor, w: Tensor) -> None:
    """The column piece: running max over row chunks of w (n, K), into col_max (K,)."""
    torch.maximum(col_max, w.amax(0), out=col_max)
