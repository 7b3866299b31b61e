"""Runs the Triton E-step kernels under TRITON_INTERPRET=1 on CPU tensors against the eager
reference and prints one JSON line of results (used by tests/test_fused_kernels.py, which starts
this in a fresh process because Triton reads TRITON_INTERPRET when the kernels are defined)."""

from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from bavq.quantizers import _nearest, _ops, _soft, _triton  # noqa: E402

FIELDS = ("soft_counts", "soft_sums", "min_dist", "hard_dist", "entropy", "soft_dist")
# (N, K, D, block): sizes that divide neither the row nor the code tiles; D = 70 spans two D blocks
SIZES = [(37, 50, 5, 64), (70, 130, 20, 16), (40, 70, 70, 16)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _data(n, k, d, lam, seed):
    gen = torch.Generator().manual_seed(seed)
    x, e = torch.randn(n, d, generator=gen), torch.randn(k, d, generator=gen)
    prior = torch.rand(k, generator=gen) + 0.05
    return x, e, None if lam == 1.0 else (1.0 - lam) * (prior / prior.sum()).log()


def soft_assign_cases() -> dict:
    """One row pass + one column pass per (size, lambda) serve both hard-assignment rules."""
    out = {}
    for i, (n, k, d, block) in enumerate(SIZES):
        beta = 16.0 / d  # about 8 nats of spread over the data's distances at every D
        x, e, _ = _data(n, k, d, 1.0, i)
        previous = _ops.set_kernels("eager")
        ref_idx, ref_min = _nearest.nearest_codes(x, e, 16)
        _ops.set_kernels(previous)
        near_idx, near_min = _triton.nearest_codes(x, e, 16)
        out[f"N{n}_K{k}_D{d}_nearest_codes"] = {"indices_equal": bool(torch.equal(near_idx, ref_idx)),
                                                "min_dist": _rel(near_min, ref_min)}
        for lam in (0.0, 1.0, 2.0):
            x, e, lw = _data(n, k, d, lam, i)
            r = _triton.row_pass(x, e, beta, lw, block_m=block, block_n=block)
            c = _triton.col_pass(x, e, beta, lw, -r["lse"], block_m=block, block_n=block)
            scale = c["col_max"].exp()
            sq_rows = x.square().sum(1)
            got = {"soft_counts": c["col_sum"] * scale, "soft_sums": c["sums"] * scale[:, None],
                   "min_dist": (r["min_d"] + sq_rows).clamp(min=0.0), "entropy": r["lse"] - r["mean_a"],
                   "soft_dist": r["mean_d"] + sq_rows}
            for nearest in (True, False):
                previous = _ops.set_kernels("eager")
                ref = _soft.soft_assign(x, e, lw, beta, 16, nearest)
                _ops.set_kernels(previous)
                got["indices"] = r["argmin_d"] if nearest else r["argmax_a"]
                got["hard_dist"] = ((r["min_d"] if nearest else r["d_at_argmax"]) + sq_rows).clamp(min=0.0)
                key = f"N{n}_K{k}_D{d}_lam{lam:g}_{'nearest' if nearest else 'map'}"
                out[key] = {"indices_equal": bool(torch.equal(got["indices"], ref.indices)),
                            **{f: _rel(got[f], getattr(ref, f)) for f in FIELDS}}
    return out


def sinkhorn_case() -> dict:
    """Row LSE with a per-code bias and column LSE with a per-row bias, against torch.logsumexp."""
    x, e, _ = _data(45, 90, 12, 1.0, 9)
    gen = torch.Generator().manual_seed(10)
    v, u = torch.randn(90, generator=gen) * 3, torch.randn(45, generator=gen) * 3
    beta = 0.7
    a = -beta * (e.square().sum(1)[None, :] - 2.0 * x @ e.t())  # d' = d - ||x||^2
    r = _triton.row_pass(x, e, beta, v, block_m=16, block_n=16)
    c = _triton.col_pass(x, e, beta, v, u, block_m=16, block_n=16)
    z = a + v[None, :] + u[:, None]
    p = (z - z.amax(0)).exp()
    w = a + v - torch.logsumexp(a + v, 1, keepdim=True)  # the balanced E-step's log-posterior
    col_max, col_sum = _triton.column_lse(x, e, v, beta, 16)
    return {"row_lse": _rel(r["lse"], torch.logsumexp(a + v, 1)),
            "column_lse": _rel(col_max + col_sum.log(), torch.logsumexp(w, 0)),
            "col_lse": _rel(c["col_max"] + c["col_sum"].log(), torch.logsumexp(z, 0)),
            "col_sums": _rel(c["sums"] * (c["col_max"] - z.amax(0)).exp()[:, None], p.t() @ x)}


if __name__ == "__main__":
    torch.manual_seed(0)
    print(json.dumps({"soft_assign": soft_assign_cases(), "sinkhorn": sinkhorn_case()}))
    sys.exit(0)
