"""Fused E-step kernels == the eager reference (issue 15).

The CPU path (C++ sweep, ``_fused.py``) is compared with ``_soft.soft_assign``'s eager code for
lambda in {0, 1, 2}, both hard-assignment rules, chunk boundaries that divide neither N nor K (nor
the 16-lane vector width), and K = 16,384: hard codes equal, statistics within 1e-5 of the
reference's scale. The first run compiles the extension (about 1-2 min on 2 busy cores; cached in
``$TORCH_EXTENSIONS_DIR``, the project's ``.torch_extensions``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bavq.quantizers import _fused, _nearest, _ops, _sinkhorn, _soft

FIELDS = ("soft_counts", "soft_sums", "min_dist", "hard_dist", "entropy", "soft_dist")


def _case(n: int, num_codes: int, dim: int, lam: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    codebook = torch.randn(num_codes, dim, generator=gen)
    prior = torch.rand(num_codes, generator=gen) + 0.05
    log_weight = None if lam == 1.0 else (1.0 - lam) * (prior / prior.sum()).log()
    return x, codebook, log_weight


def _eager(*args, **kwargs) -> _soft.SoftStats:
    previous = _ops.set_kernels("eager")
    try:
        return _soft.soft_assign(*args, **kwargs)
    finally:
        _ops.set_kernels(previous)


def assert_stats_match(got, ref, rtol: float = 1e-5) -> None:
    """Hard codes equal; every statistic within rtol of the reference's largest magnitude."""
    torch.testing.assert_close(got.indices, ref.indices, rtol=0, atol=0)
    for name in FIELDS:
        a, b = getattr(got, name), getattr(ref, name)
        scale = b.abs().max().clamp_min(1e-30)
        err = (a - b).abs().max() / scale
        assert err <= rtol, f"{name}: max error {err:.2e} of the reference's scale"


needs_cpp = pytest.mark.skipif(not _fused.available(), reason=f"no C++ toolchain: {_fused.unavailable_reason()}")


@needs_cpp
@pytest.mark.parametrize("lam", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("assign", ["nearest", "map"])
@pytest.mark.parametrize("beta", [1.0, 40.0])
def test_cpu_fused_matches_eager(lam, assign, beta):
    # N = 1000, chunks of 300 rows (1000 = 3 * 300 + 100), K = 1000 = 62 * 16 + 8 (vector tail)
    x, codebook, log_weight = _case(1000, 1000, 8, lam)
    args = (x, codebook, log_weight, beta, 300)
    got = _fused.soft_assign(*args, nearest=assign == "nearest")
    assert got is not None
    ref = _eager(*args, nearest=assign == "nearest")
    assert_stats_match(_soft.SoftStats(**got), ref)
    assert torch.equal(got["reached"], ref.reached)


@needs_cpp
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_cpu_fused_matches_eager_at_k16384(lam):
    # the quantizer's default chunking (2048 rows) for the eager code; the fused path uses 128-row
    # chunks here (cache_rows), 1000 = 7 * 128 + 104
    x, codebook, log_weight = _case(1000, 16384, 8, lam, seed=1)
    rows = _ops.chunk_rows(16384, 8192, 128)
    assert _fused.cache_rows(16384, 8, rows) == 128
    codebook[:50] += 40.0  # codes no row reaches above the fp32 floor: the dispatched path flags them too
    got = _soft.soft_assign(x, codebook, log_weight, 2.0, rows, nearest=True)
    ref = _eager(x, codebook, log_weight, 2.0, rows, nearest=True)
    assert_stats_match(got, ref)
    assert torch.equal(got.reached, ref.reached) and 0 < int(ref.reached.sum()) < 16384
    idx, dist = _nearest.nearest_codes(x, codebook, rows)
    previous = _ops.set_kernels("eager")
    try:
        ref_idx, ref_dist = _nearest.nearest_codes(x, codebook, rows)
    finally:
        _ops.set_kernels(previous)
    torch.testing.assert_close(idx, ref_idx, rtol=0, atol=0)
    torch.testing.assert_close(dist, ref_dist, rtol=1e-6, atol=0)


@needs_cpp
def test_cpu_fused_large_dim():
    x, codebook, log_weight = _case(300, 200, 256, 2.0, seed=2)
    args = (x, codebook, log_weight, 0.05, 128)
    fused = _soft.SoftStats(**_fused.soft_assign(*args, nearest=False))
    assert_stats_match(fused, _eager(*args, nearest=False))


def test_eager_flag_and_fallback(monkeypatch):
    x, codebook, log_weight = _case(50, 40, 4, 0.0)

    def boom(*args, **kwargs):
        raise AssertionError("fused path called")

    monkeypatch.setattr(_fused, "soft_assign", boom)
    ref = _eager(x, codebook, log_weight, 1.0, 16, nearest=True)  # must not reach the fused path
    monkeypatch.undo()  # restore soft_assign; now simulate a failed build
    monkeypatch.setattr(_fused, "_state", {"module": None, "reason": "test: no compiler"})
    got = _soft.soft_assign(x, codebook, log_weight, 1.0, 16, nearest=True)
    assert not _fused.available() and _fused.unavailable_reason() == "test: no compiler"
    assert_stats_match(got, ref, rtol=0)
    with pytest.raises(ValueError, match="auto"):
        _ops.set_kernels("fast")


@pytest.fixture(scope="module")
def triton_results():
    """The Triton kernels under TRITON_INTERPRET=1 (a fresh process: Triton reads the variable when
    the kernels are defined); about 10 s of CPU."""
    pytest.importorskip("triton", reason="triton is not installed")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("_triton_interpret.py"))], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        if "interpret" in tail.lower() and "not supported" in tail.lower():
            pytest.skip(f"the Triton interpreter cannot run here: {tail}")
        raise AssertionError(f"Triton interpreter run failed:\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_triton_soft_assign_matches_eager(triton_results):
    cases = triton_results["soft_assign"]
    assert len(cases) == 21  # 3 sizes x (nearest_codes + 3 lambdas x 2 rules)
    for key, res in cases.items():
        assert res.pop("indices_equal"), f"{key}: hard codes differ from the eager reference"
        for name, err in res.items():
            assert err <= 1e-5, f"{key} {name}: max error {err:.2e} of the reference's scale"


def test_triton_biases_give_row_and_column_lse(triton_results):
    # the balanced (Sinkhorn) E-step's row LSE with a per-code bias and column LSE with a per-row
    # bias come from the same two kernels
    for name, err in triton_results["sinkhorn"].items():
        assert err <= 1e-5, f"{name}: max error {err:.2e}"


@needs_cpp
@pytest.mark.parametrize("lam", [0.0, 1.0, 2.0])
def test_cpu_column_lse_matches_dense_and_eager(lam):
    # one Sinkhorn iteration's column log-sum-exp of w = a - logsumexp_k a, with the potentials v in
    # the code bias; 45 rows in chunks of 16 (not dividing), K = 90 (a vector tail), float64 reference
    x, codebook, log_weight = _case(45, 90, 12, lam, seed=9)
    v = torch.randn(90, generator=torch.Generator().manual_seed(10)) * 3
    code_bias = v if log_weight is None else log_weight + v
    a = code_bias.double() - 0.7 * torch.cdist(x.double(), codebook.double()).square()
    ref = torch.logsumexp(a - torch.logsumexp(a, 1, keepdim=True), 0)
    m, s = _fused.column_lse(x, codebook, code_bias, 0.7, 16)
    em, es = _sinkhorn._column_lse_eager(x, codebook, code_bias, 0.7, 16)
    torch.testing.assert_close((m + s.log()).double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m + s.log(), em + es.log(), rtol=1e-5, atol=1e-5)
    empty_m, empty_s = _fused.column_lse(x[:0], codebook, code_bias, 0.7, 16)  # a rank without rows
    assert torch.isneginf(empty_m).all() and not empty_s.any()


@needs_cpp
def test_cpu_code_gaps_and_balanced_estep_match_eager():
    # K = 16,384 with 50 far codes: the gaps (anneal mode's reach measure) and the whole balanced
    # E-step (3 Sinkhorn iterations, then the soft statistics) equal the eager reference
    x, codebook, _ = _case(1000, 16384, 8, 1.0, seed=3)
    codebook[:50] += 40.0
    rows = _ops.chunk_rows(16384, 8192, 128)
    log_ratio = torch.full((16384,), -math.log(16384))
    gaps, min_d = _nearest.code_gaps(x, codebook, rows)
    v = _sinkhorn.balance_potentials(x, codebook, None, 2.0, rows, log_ratio, 3)
    got = _soft.soft_assign(x, codebook, v, 2.0, rows, nearest=True)
    previous = _ops.set_kernels("eager")
    try:
        ref_gaps, ref_min = _nearest.code_gaps(x, codebook, rows)
        ref_v = _sinkhorn.balance_potentials(x, codebook, None, 2.0, rows, log_ratio, 3)
        ref = _soft.soft_assign(x, codebook, ref_v, 2.0, rows, nearest=True)
    finally:
        _ops.set_kernels(previous)
    torch.testing.assert_close(gaps, ref_gaps, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(min_d, ref_min, rtol=1e-6, atol=0)
    assert float(gaps[:50].min()) > 100.0 and float(gaps[50:].max()) < float(gaps[:50].min())
    torch.testing.assert_close(v, ref_v, rtol=1e-4, atol=1e-4)
    assert_stats_match(got, ref, rtol=1e-4)
    assert torch.equal(got.reached, ref.reached)
    # the E-step pass with a code bias returns the same gaps, so anneal mode needs no extra pass
    torch.testing.assert_close(got.gaps, gaps, rtol=0, atol=0)
    torch.testing.assert_close(ref.gaps, ref_gaps, rtol=1e-5, atol=1e-4)
    assert _soft.soft_assign(x, codebook, None, 2.0, rows, nearest=True).gaps is None
