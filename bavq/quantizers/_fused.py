"""Fused CPU path of the BA-VQ E-step: one C++ sweep per row instead of ~12 eager passes.

Why a C++ extension and not ``torch.compile``: both were measured on the build machine
(``benchmarks/bench_kernel.py --candidates``, README "Benchmarks"); Inductor fuses the elementwise
ops but still makes separate max and exp/sum loops over the (chunk x K) matrix, recompiles for the
last chunk's shape, and costs a long first compile, while this sweep reads each row twice while it is
in L1/L2. The GEMMs stay in BLAS (the same ``addmm`` calls as the eager code, so the scores, and with
them the hard codes, are bit-identical to the eager path).

Per chunk of rows (``cache_rows``: the (rows x K) fp32 matrix stays in L2/L3; each parallel worker
has its own, and all of them together stay within the caller's ``rows`` budget):

1. ``g = addmm(...)`` (BLAS, the eager code's call): a = 2 beta x.e - beta ||e||^2 when there is no
   code bias (lambda = 1), else d' = ||e||^2 - 2 x.e (d' = d - ||x||^2);
2. the C++ sweep, per row: sweep 1 finds max a / argmax a / min d' / argmin d'; sweep 2 writes
   u = exp(max(a - max a, LOG_P_FLOOR)) over g and sums norm = sum u, sum u (a - max a), sum u d';
3. ``partial.addmm_([x, 1]^T / norm, u)`` (BLAS): S and M^b, as the eager code.

The whole chunk loop runs in C++ under ONE ``at::parallel_for`` (workers take interleaved chunks,
ATen calls inside run single-threaded): the eager loop opens several parallel regions per chunk, and
on a busy shared CPU each region's barrier waits for a descheduled thread. ``nearest_codes`` uses the
same loop without the soft part (mode 1), and ``code_gaps`` the same with a column max of
min_j d' - d' (mode 2). The soft sweep also keeps a per-worker column max of the floored log-odds, the
``reached`` diagnostic, so no extra pass computes it.

``column_lse`` serves the balanced (Sinkhorn) E-step: per iteration one sweep per chunk, row
log-sum-exp (max, then sum of exp) and the log-posterior w in place, then a per-worker running
column (max, sum of exp) of w, under the same single parallel region. The Triton backend offers the
same function from its row and column passes, so both E-step rules share the kernels.

The extension is compiled on first use with ``torch.utils.cpp_extension.load_inline`` into
``$TORCH_EXTENSIONS_DIR`` (the project's ``.torch_extensions`` when unset and writable). When no
compiler is available or the build fails, :func:`available` returns False (with the reason in
:func:`unavailable_reason`) and ``_soft.soft_assign`` runs its eager code, which stays the reference.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from bavq.quantizers._limits import LOG_P_FLOOR

# Columns of the per-row float output of chunk_loop (mode 0).
_MIN_D, _HARD_D, _NORM, _MEAN_B, _SOFT_D, _A_MAX = range(6)

_CPP = r"""
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <vector>
#include <cstring>

// GCC/Clang generic vectors: explicit 16-lane code that lowers to AVX-512, AVX2 or SSE (or NEON)
// with -march=native, without intrinsics.
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
constexpr int W = 16;

static inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof(v)); return v; }
static inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
static inline vf splat(float x) { return vf{} + x; }
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// Cephes expf for x in [-87, 0] (callers clamp at the floor): about 1 ulp, no slow path.
static inline vf vexp(vf x) {
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf t = x * splat(1.44269504088896341f) + magic;
  vf n = t - magic;
  vi ni = (vi)t - 0x4B400000;
  vf r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vf y = splat(1.9875691500e-4f);
  y = y * r + splat(1.3981999507e-3f);
  y = y * r + splat(8.3334519073e-3f);
  y = y * r + splat(4.1665795894e-2f);
  y = y * r + splat(1.6666665459e-1f);
  y = y * r + splat(5.0000001201e-1f);
  y = y * (r * r) + r + splat(1.0f);
  vi e = (ni + 127) << 23;
  return y * (vf)e;
}

// One row of the chunk. g holds a (no code bias) or d' (with a code bias c: a = c - beta d').
// Writes u = exp(max(a - max a, floor)) over g; returns the index; out[6] as in _fused.py.
// Column maxima over the rows: colb of the floored log-odds b; with a code bias also colg of
// min_j d' - d' (minus the code gaps).
static int64_t sweep_row(float* g, const float* c, int64_t K, float beta, bool nearest, float floor_,
                         float* out, float* colb, float* colg) {
  const int64_t Kv = K - K % W;
  const float inf = __builtin_inff();
  // sweep 1: per-lane best values and first indices (strict compares keep the first)
  vf amax = splat(-inf), dmin = splat(inf);
  vi aarg = vi{} - 1, darg = vi{} - 1, lane;
  for (int i = 0; i < W; ++i) lane[i] = i;
  for (int64_t k = 0; k < Kv; k += W) {
    vf v = load(g + k);
    vi idx = lane + (int32_t)k;
    if (c) {
      vf a = load(c + k) - splat(beta) * v;
      auto lt = v < dmin; dmin = lt ? v : dmin; darg = lt ? idx : darg;
      auto gt = a > amax; amax = gt ? a : amax; aarg = gt ? idx : aarg;
    } else {
      auto gt = v > amax; amax = gt ? v : amax; aarg = gt ? idx : aarg;
    }
  }
  float best_a = -inf, best_d = inf; int64_t ia = -1, id = -1;
  for (int i = 0; i < W; ++i) {
    if (amax[i] > best_a || (amax[i] == best_a && aarg[i] < ia)) { best_a = amax[i]; ia = aarg[i]; }
    if (dmin[i] < best_d || (dmin[i] == best_d && darg[i] < id)) { best_d = dmin[i]; id = darg[i]; }
  }
  for (int64_t k = Kv; k < K; ++k) {  // tail, scalar (the vector part holds the lower indices)
    float a = c ? c[k] - beta * g[k] : g[k];
    if (a > best_a) { best_a = a; ia = k; }
    if (c && g[k] < best_d) { best_d = g[k]; id = k; }
  }
  const float hard_d = c ? (nearest ? best_d : g[ia]) : best_a / -beta;
  // sweep 2: exp, sums, u written in place
  vf vnorm = vf{}, vsb = vf{}, vsd = vf{};
  const vf fl = splat(floor_), am = splat(best_a);
  const vf dm = splat(best_d);
  auto body = [&](float* p, const float* cp, float* bp, float* gp, bool partial, int64_t count) {
    vf v, cv = vf{};
    if (partial) {
      float tmp[W], ctmp[W];
      for (int i = 0; i < W; ++i) { tmp[i] = i < count ? p[i] : 0.0f; ctmp[i] = (c && i < count) ? cp[i] : 0.0f; }
      v = load(tmp); cv = load(ctmp);
    } else {
      v = load(p);
      if (c) cv = load(cp);
    }
    vf a = c ? cv - splat(beta) * v : v;
    vf b = vmax(a - am, fl);
    vf u = vexp(b);
    if (partial) {
      for (int i = 0; i < count; ++i) bp[i] = std::max(bp[i], b[i]);
      if (c) for (int i = 0; i < count; ++i) gp[i] = std::max(gp[i], best_d - v[i]);
    } else {
      store(bp, vmax(load(bp), b));  // column max of the floored log-odds: "reached" is > floor
      if (c) store(gp, vmax(load(gp), dm - v));  // v = d' here
    }
    if (partial) {
      for (int i = count; i < W; ++i) { u[i] = 0.0f; b[i] = 0.0f; v[i] = 0.0f; }
      float tmp[W]; store(tmp, u);
      for (int i = 0; i < count; ++i) p[i] = tmp[i];
    } else {
      store(p, u);
    }
    vnorm += u; vsb += u * b;
    if (c) vsd += u * v;
  };
  for (int64_t k = 0; k < Kv; k += W) body(g + k, c ? c + k : nullptr, colb + k, c ? colg + k : nullptr, false, W);
  if (Kv < K) body(g + Kv, c ? c + Kv : nullptr, colb + Kv, c ? colg + Kv : nullptr, true, K - Kv);
  float norm = 0.0f, sb = 0.0f, sd = 0.0f;
  for (int i = 0; i < W; ++i) { norm += vnorm[i]; sb += vsb[i]; sd += vsd[i]; }
  const float mean_b = sb / norm;
  out[0] = c ? best_d : best_a / -beta;
  out[1] = hard_d;
  out[2] = norm;
  out[3] = mean_b;
  out[4] = c ? sd / norm : -(mean_b + best_a) / beta;
  out[5] = best_a;
  return (c && nearest) ? id : ia;
}

// MKL (torch's BLAS on x86) would otherwise start nested thread teams for the GEMMs that each
// worker calls inside the parallel region (measured: 3-7x the CPU time on 2 cores). Weak: absent
// (null) with another BLAS, which then runs as it is configured.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

static int64_t argmin_row(const float* g, int64_t K, float* best_out) {
  const int64_t Kv = K - K % W;
  const float inf = __builtin_inff();
  vf dmin = splat(inf);
  vi darg = vi{} - 1, lane;
  for (int i = 0; i < W; ++i) lane[i] = i;
  for (int64_t k = 0; k < Kv; k += W) {
    vf v = load(g + k);
    auto lt = v < dmin; dmin = lt ? v : dmin; darg = lt ? lane + (int32_t)k : darg;
  }
  float best = inf; int64_t id = -1;
  for (int i = 0; i < W; ++i)
    if (dmin[i] < best || (dmin[i] == best && darg[i] < id)) { best = dmin[i]; id = darg[i]; }
  for (int64_t k = Kv; k < K; ++k) if (g[k] < best) { best = g[k]; id = k; }
  *best_out = best;
  return id;
}

// The chunk loop of one E-step, under ONE parallel region: worker w takes chunks w, w + workers, ...
// with its own (rows x K) buffer and (D+1) x K partial sums; ATen calls inside run single-threaded.
// Few, long parallel regions: on a busy shared CPU every region's barrier waits for a descheduled
// thread, and the eager loop has several per chunk. Partial sums are added in worker order, so the
// result is deterministic for a given number of workers.
// mode 0: soft E-step (g = addmm(bias, x, E^T, alpha)), with the per-worker column max of the floored
// log-odds b (``reached``) and, with a code bias, of min_j d' - d' (minus the gaps); mode 1: nearest
// codes only; mode 2: nearest codes and the per-worker column max of min_j d'(x, j) - d'(x, k) (minus
// the code gaps of _nearest.code_gaps).
std::vector<at::Tensor> chunk_loop(at::Tensor x, at::Tensor codebook, at::Tensor bias, at::Tensor code_bias,
                                   double alpha, double beta, bool nearest, double floor_, int64_t rows,
                                   int64_t workers, int64_t mode) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && codebook.scalar_type() == at::kFloat, "fp32");
  const int64_t N = x.size(0), D = x.size(1), K = codebook.size(0);
  const int64_t chunks = (N + rows - 1) / rows;
  workers = std::max<int64_t>(1, std::min<int64_t>(workers, chunks));
  const float* c = nullptr;
  if (code_bias.numel() > 0) {
    TORCH_CHECK(code_bias.is_contiguous() && code_bias.numel() == K, "code_bias: contiguous (K,)");
    c = code_bias.data_ptr<float>();
  }
  auto et = codebook.t();
  auto indices = at::empty({N}, x.options().dtype(at::kLong));
  auto per_row = at::empty({N, mode == 0 ? 6 : 1}, x.options());
  auto partial = at::zeros({mode == 0 ? workers : 0, D + 1, K}, x.options());
  auto colmax = at::full({mode == 1 ? 0 : workers, K}, -__builtin_inff(), x.options());
  auto colgap = at::full({mode == 0 && c ? workers : 0, K}, -__builtin_inff(), x.options());
  int64_t* ip = indices.data_ptr<int64_t>();
  float* op = per_row.data_ptr<float>();
  at::parallel_for(0, workers, 1, [&](int64_t wb, int64_t we) {
    const int previous_mkl = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
    for (int64_t w = wb; w < we; ++w) {
      auto buf = at::empty({std::min(rows, N), K}, x.options());
      auto wts = at::empty({std::min(rows, N), D + 1}, x.options());
      float* cm = mode == 1 ? nullptr : colmax[w].data_ptr<float>();
      float* cg = (mode == 0 && c) ? colgap[w].data_ptr<float>() : nullptr;
      for (int64_t ci = w; ci < chunks; ci += workers) {
        const int64_t s = ci * rows, m = std::min(rows, N - s);
        auto xc = x.narrow(0, s, m);
        auto g = buf.narrow(0, 0, m);
        at::addmm_out(g, bias, xc, et, 1.0, alpha);
        float* gp = g.data_ptr<float>();
        if (mode != 0) {
          for (int64_t r = 0; r < m; ++r) {
            const float* row = gp + r * K;
            ip[s + r] = argmin_row(row, K, op + s + r);
            if (mode == 2) {
              const float best = op[s + r];
              for (int64_t k = 0; k < K; ++k) cm[k] = std::max(cm[k], best - row[k]);
            }
          }
          continue;
        }
        for (int64_t r = 0; r < m; ++r)
          ip[s + r] = sweep_row(gp + r * K, c, K, (float)beta, nearest, (float)floor_, op + (s + r) * 6, cm, cg);
        auto wc = wts.narrow(0, 0, m);
        wc.narrow(1, 0, D).copy_(xc);
        wc.select(1, D).fill_(1.0);
        wc.div_(per_row.narrow(0, s, m).narrow(1, 2, 1));  // column 2: norm = sum u
        partial[w].addmm_(wc.t(), g);
      }
    }
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_mkl);
  });
  if (mode == 1) return {indices, per_row.select(1, 0)};
  if (mode == 2) return {indices, per_row.select(1, 0), std::get<0>(colmax.max(0))};
  return {indices, per_row, partial.sum(0), std::get<0>(colmax.max(0)),
          c ? std::get<0>(colgap.max(0)) : colgap};
}

// One Sinkhorn iteration's column log-sum-exp (the balanced E-step, _sinkhorn.py), under one parallel
// region like chunk_loop. Per chunk: a = addmm(bias, x, E^T, alpha) (bias = log_weight + v - beta ||e||^2,
// alpha = 2 beta); per row the log-posterior w = a - max a - log sum_k exp(max(a - max a, floor))
// (row_softmax_'s normaliser); per worker a running column max M_k and sum S_k of exp(max(w - M_k,
// floor)) over its chunks. Returns (workers, K) M and S: log sum_x exp w = M + log S per worker.
std::vector<at::Tensor> column_lse(at::Tensor x, at::Tensor codebook, at::Tensor bias, double alpha,
                                   double floor_, int64_t rows, int64_t workers) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && codebook.scalar_type() == at::kFloat, "fp32");
  const int64_t N = x.size(0), K = codebook.size(0), Kv = K - K % W;
  const int64_t chunks = (N + rows - 1) / rows;
  workers = std::max<int64_t>(1, std::min<int64_t>(workers, chunks));
  auto et = codebook.t();
  auto col_max = at::full({workers, K}, -__builtin_inff(), x.options());
  auto col_sum = at::zeros({workers, K}, x.options());
  const float inf = __builtin_inff(), fl_s = (float)floor_;
  at::parallel_for(0, workers, 1, [&](int64_t wb, int64_t we) {
    const int previous_mkl = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
    const vf fl = splat(fl_s);
    for (int64_t w = wb; w < we; ++w) {
      auto buf = at::empty({std::min(rows, N), K}, x.options());
      std::vector<float> chunk_max(K);
      float* M = col_max[w].data_ptr<float>();
      float* S = col_sum[w].data_ptr<float>();
      for (int64_t ci = w; ci < chunks; ci += workers) {
        const int64_t s = ci * rows, m = std::min(rows, N - s);
        auto g = buf.narrow(0, 0, m);
        at::addmm_out(g, bias, x.narrow(0, s, m), et, 1.0, alpha);
        float* gp = g.data_ptr<float>();
        std::fill(chunk_max.begin(), chunk_max.end(), -inf);
        for (int64_t r = 0; r < m; ++r) {  // rows: w = a - logsumexp_k a, in place; chunk column max
          float* row = gp + r * K;
          vf vm = splat(-inf);
          for (int64_t k = 0; k < Kv; k += W) vm = vmax(vm, load(row + k));
          float am = -inf;
          for (int i = 0; i < W; ++i) am = std::max(am, vm[i]);
          for (int64_t k = Kv; k < K; ++k) am = std::max(am, row[k]);
          vf vs = vf{};
          const vf va = splat(am);
          for (int64_t k = 0; k < Kv; k += W) vs += vexp(vmax(load(row + k) - va, fl));
          float norm = 0.0f;
          for (int i = 0; i < W; ++i) norm += vs[i];
          for (int64_t k = Kv; k < K; ++k) norm += std::exp(std::max(row[k] - am, fl_s));
          const float shift = am + std::log(norm);
          for (int64_t k = 0; k < K; ++k) {
            row[k] -= shift;
            chunk_max[k] = std::max(chunk_max[k], row[k]);
          }
        }
        for (int64_t k = 0; k < K; ++k) {  // rescale the running sums to the new column max
          const float nm = std::max(M[k], chunk_max[k]);
          S[k] *= std::exp(M[k] - nm);  // M = -inf before the first chunk: S = 0 * 0
          M[k] = nm;
        }
        for (int64_t r = 0; r < m; ++r) {
          const float* row = gp + r * K;
          for (int64_t k = 0; k < Kv; k += W) store(S + k, load(S + k) + vexp(vmax(load(row + k) - load(M + k), fl)));
          for (int64_t k = Kv; k < K; ++k) S[k] += std::exp(std::max(row[k] - M[k], fl_s));
        }
      }
    }
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_mkl);
  });
  return {col_max, col_sum};
}
"""

_lock = threading.Lock()
_state: dict = {}


def _build_dir() -> Path:
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / ".torch_extensions"
    path = root / "bavq_fused"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _load():
    """The compiled module, or None (reason in ``_state['reason']``); built once per process."""
    with _lock:
        if "module" in _state:
            return _state["module"]
        module = None
        try:
            from torch.utils.cpp_extension import load_inline

            module = load_inline(name="bavq_fused", cpp_sources=_CPP, functions=["chunk_loop", "column_lse"],
                                 build_directory=str(_build_dir()),
                                 extra_cflags=["-O3", "-march=native", "-ffp-contract=fast"], verbose=False)
        except Exception as exc:  # no compiler, no headers, read-only disk: the eager path still works
            _state["reason"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:] or ''}"
            warnings.warn(f"bavq: fused CPU E-step unavailable, using the eager path ({_state['reason']})",
                          RuntimeWarning, stacklevel=3)
        _state["module"] = module
        return module


def available() -> bool:
    """True when the C++ extension is (or can be) built; builds it on the first call."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True or was never asked)."""
    return _state.get("reason")


def cache_rows(num_codes: int, dim: int, rows: int) -> int:
    """Rows per chunk of the fused path (at most ``rows``, the caller's memory budget).

    Small enough that the (rows x K) matrix (8 MiB) stays in L2/L3 between the GEMM, the sweep and
    the statistics GEMM, and at least D so that the statistics GEMM amortizes reading and writing
    its (D+1) x K output (measured, README "Benchmarks": 128 rows at K = 16,384, D = 8 took
    0.6 of the time of 2,048; at D = 256, 256-512 rows were best).
    """
    return max(1, min(rows, max(64, 2**21 // max(num_codes, 1), dim)))


def _workers(rows_budget: int, rows: int) -> int:
    """Parallel workers: every thread of torch's pool, as long as their buffers fit the budget."""
    return max(1, min(torch.get_num_threads(), rows_budget // max(rows, 1)))


def _hard_sweep(x: Tensor, codebook: Tensor, rows: int, mode: int) -> list[Tensor] | None:
    """chunk_loop's hard modes (1: nearest codes; 2: also the column max behind the code gaps) in
    cache-sized chunks, with ||x||^2 added back to the min distances (output 1); None when the
    extension is unavailable or D > 64."""
    if x.shape[1] > 64:  # GEMM-bound: measured no faster than the eager loop at D = 256 (README)
        return None
    module = _load()
    if module is None:
        return None
    small = cache_rows(codebook.shape[0], x.shape[1], rows)
    out = module.chunk_loop(x, codebook, codebook.square().sum(1), x.new_empty(0), -2.0, 0.0, True, LOG_P_FLOOR,
                            small, _workers(rows, small), mode)
    out[1] = out[1].add_(x.square().sum(1)).clamp_(min=0.0)
    return out


@torch.no_grad()
def nearest_codes(x: Tensor, codebook: Tensor, rows: int) -> tuple[Tensor, Tensor] | None:
    """``_nearest.nearest_codes`` (same addmm, so the same codes) in cache-sized chunks under one parallel
    region (5x faster at K = 16,384, D = 8); None when the extension is unavailable or D > 64."""
    out = _hard_sweep(x, codebook, rows, 1)
    return None if out is None else (out[0], out[1])


@torch.no_grad()
def soft_assign(x: Tensor, codebook: Tensor, log_weight: Tensor | None, beta: float, rows: int,
                nearest: bool, exact_rows: bool = False) -> dict[str, Tensor] | None:
    """The fused E-step: same inputs and outputs (as a dict of SoftStats fields) as
    ``_soft.soft_assign``; None when the extension is unavailable. Chunks of
    ``cache_rows(K, D, rows)`` rows, or exactly ``rows`` with ``exact_rows`` (benchmarks); at most
    ``rows`` rows of buffers in all (the caller's memory budget) over the parallel workers."""
    module = _load()
    if module is None:
        return None
    dim = x.shape[1]
    small = rows if exact_rows else cache_rows(codebook.shape[0], dim, rows)
    sq_codes = codebook.square().sum(1)
    bias = (-beta * sq_codes) if log_weight is None else sq_codes
    code_bias = x.new_empty(0) if log_weight is None else log_weight.contiguous()
    alpha = 2.0 * beta if log_weight is None else -2.0
    indices, per_row, sums_t, best_b, neg_gap = module.chunk_loop(x, codebook, bias, code_bias, alpha, float(beta),
                                                         bool(nearest), LOG_P_FLOOR, small,
                                                         _workers(max(rows, small), small), 0)
    sq_rows = x.square().sum(1)
    return {
        "indices": indices,
        "soft_counts": sums_t[dim].clone(),
        "soft_sums": sums_t[:dim].t().clone(),
        "min_dist": (per_row[:, _MIN_D] + sq_rows).clamp_(min=0.0),
        "hard_dist": (per_row[:, _HARD_D] + sq_rows).clamp_(min=0.0),
        "entropy": per_row[:, _NORM].log() - per_row[:, _MEAN_B],
        "soft_dist": per_row[:, _SOFT_D] + sq_rows,
        "reached": (best_b > LOG_P_FLOOR).to(x.dtype),
        "gaps": neg_gap.neg_().clamp_(min=0.0) if log_weight is not None else None,
    }


@torch.no_grad()
def code_gaps(x: Tensor, codebook: Tensor, rows: int) -> tuple[Tensor, Tensor] | None:
    """``_nearest.code_gaps`` (gaps (K,), min distance (N,)) from the nearest-code sweep plus a
    per-worker column max; None when the extension is unavailable or D > 64 (GEMM-bound)."""
    out = _hard_sweep(x, codebook, rows, 2)
    return None if out is None else (out[2].neg_().clamp_(min=0.0), out[1])


@torch.no_grad()
def column_lse(x: Tensor, codebook: Tensor, code_bias: Tensor, beta: float, rows: int) -> tuple[Tensor, Tensor] | None:
    """One Sinkhorn iteration's column statistics over these rows (the balanced E-step): with
    a(x,k) = code_bias_k - beta d(x,k) and w = a - logsumexp_k a, returns (M, S) (K,) such that
    logsumexp_x w = M + log S (M = -inf, S = 0 without rows); None when the extension is unavailable.
    Row normalisers are floored at LOG_P_FLOOR below the row max like ``_ops.row_softmax_``."""
    module = _load()
    if module is None:
        return None
    if x.shape[0] == 0:
        return x.new_full((codebook.shape[0],), float("-inf")), x.new_zeros(codebook.shape[0])
    small = cache_rows(codebook.shape[0], x.shape[1], rows)
    bias = code_bias - beta * codebook.square().sum(1)
    col_max, col_sum = module.column_lse(x, codebook, bias.contiguous(), 2.0 * beta, LOG_P_FLOOR, small,
                                         _workers(rows, small))
    top = col_max.amax(0)  # combine the workers' running (max, sum): finite, every column saw rows
    return top, (col_sum * (col_max - top).exp_()).sum(0)
