"""How efficient is the chunked codebook kernel? BA-VQ's E-step + soft statistics vs torch.mm.

``bavq.quantizers._soft.soft_assign`` (distances, max-shifted softmax, entropy, soft sums) and
``nearest_codes`` (VQ-EMA's hard assignment) are timed on random data and compared with three
references measured on the same machine and at the same sizes and chunking:

* **matmul**: ``torch.mm`` of the distance shape (rows x D times D x K, into a preallocated
  output, chunk after chunk) plus the statistics shape ((D+1) x rows times rows x K, accumulated),
  fp32, TF32 off. FLOPs are counted honestly: 2*N*K*D for the distances and 2*N*K*(D+1) for the
  soft sums and counts. The kernel's "matmul efficiency" is that FLOP count over the kernel's time
  divided by the same count over the plain matmuls' time (= t_mm / t_kernel).
* **memory**: the kernel makes a fixed number of passes over (chunk x K) fp32 intermediates
  (``PASSES``, counted from the ops in ``_soft.py``); bytes = passes * N * K * 4, compared with a
  measured copy bandwidth (read + write bytes per second) of a chunk-sized buffer.
* **exp**: one ``exp`` per (row, code) is unavoidable even for a fully fused kernel; its measured
  throughput gives the floor of any implementation that keeps the math in fp32.

Every kernel is timed twice in the same run: on the eager reference code (``_ops.set_kernels("eager")``)
and on the fused path (``fused ...``: the C++ row sweep between the same GEMMs, in cache-sized chunks,
``bavq/quantizers/_fused.py``; Triton on CUDA). The fused kernels are also compared with ``torch.mm``
in their own (cache-sized) chunks, ``vs mm@chunk``. ``--candidates`` times the alternatives weighed
for the CPU path (eager, ``torch.compile`` of the row sweep, the C++ sweep) at several chunk sizes.

At D = 8 the matmul does 16 FLOPs per 4-byte output element, so both the plain matmul and the kernel
are bound by memory traffic (and on CPU by exp), not by FLOPs; at D = 256 the matmuls dominate.

    python benchmarks/bench_kernel.py --quick            # CPU-sized, about a minute on 2 cores
    python benchmarks/bench_kernel.py --json out.json    # N = 65536, K = 16384, D in 8, 64, 256
    python benchmarks/bench_kernel.py --num-vectors 16384 --dims 8 256 --threads 1 --clock process --candidates
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script from anywhere: make `import bavq` work
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bavq.quantizers import _entropy_loss, _fused, _nearest, _ops, _sinkhorn, _soft  # noqa: E402

# Passes over one (rows x K) fp32 matrix, read or write, per chunk (counted from _soft.py and _nearest.py):
PASSES = {
    # addmm(bias, out=a): bias broadcast into a (1 write) + GEMM with beta=1 (1 read, 1 write);
    # max (1 read); sub_ (2); clamp_ (2); exp a -> u (2); u.sum (1); a.mul_(u) (3) + sum (1);
    # stats addmm_ (1)
    "soft_assign(lambda=1)": 3 + 1 + 2 + 2 + 2 + 1 + 4 + 1,
    # addmm(sq, out=u) (3); u.min (1); add(log_w, u, out=a) (2); max (1); sub_ (2); clamp_ (2);
    # exp (2); sum (1); a.mul_(u) + sum (4); u @ log_w (1); stats addmm_ (1)
    "soft_assign(lambda!=1)": 3 + 1 + 2 + 1 + 2 + 2 + 2 + 1 + 4 + 1 + 1,
    # addmm(sq, out=d) (3); min (1)
    "nearest_codes": 3 + 1,
    # one Sinkhorn iteration of the balanced E-step (_sinkhorn._column_lse_eager): addmm (3); amax (1);
    # row_softmax_: sub_ (2), clamp (2), exp_ (2), sum (1); sub_ log norm (2); amax(0) (1); sub_ (2);
    # clamp_ (2); exp_ (2); sum(0) (1)
    "sinkhorn_iteration": 3 + 1 + 2 + 2 + 2 + 1 + 2 + 1 + 2 + 2 + 2 + 1,
    # fused column_lse: addmm (3); row max (1); row exp-sum (1); w in place + column max (2); column
    # exp-sum (1)
    "fused sinkhorn_iteration": 3 + 1 + 1 + 2 + 1,
    # fused (cache-sized chunks, so most of these passes hit L2/L3): addmm (3); sweep 1 (1);
    # sweep 2 reads and writes u (2); stats addmm_ (1)
    "fused soft_assign(lambda=1)": 3 + 1 + 2 + 1,
    "fused soft_assign(lambda!=1)": 3 + 1 + 2 + 1,
    "fused nearest_codes": 3 + 1,
}
CLOCK = {"fn": time.perf_counter}  # --clock process: CPU time of this process (robust to neighbours)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Best (minimum) wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones.

    The minimum, as ``timeit`` recommends: on a shared machine the other times measure the neighbours.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = CLOCK["fn"]()
        fn()
        sync(device)
        times.append(CLOCK["fn"]() - start)
    return min(times)


def peak_matmul_flops(device: torch.device, size: int, repeats: int = 3) -> float:
    """fp32 (TF32 off) FLOP/s of a square ``size`` matmul: the compute roof of this device."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    with _ops.fp32_math(device.type):
        seconds = timed(lambda: torch.mm(a, b, out=out), device, repeats)
    return 2.0 * size**3 / seconds


def chunked_matmul_seconds(x: torch.Tensor, codebook: torch.Tensor, rows: int, repeats: int) -> dict:
    """Plain torch.mm of the kernel's two shapes, chunk after chunk: (distance, statistics) seconds."""
    n, dim = x.shape
    num_codes = codebook.shape[0]
    out = x.new_empty(min(rows, n), num_codes)
    weights_t = x.new_ones(dim + 1, n)
    acc = x.new_zeros(dim + 1, num_codes)

    def distances():
        for start in range(0, n, rows):
            torch.mm(x[start : start + rows], codebook.t(), out=out[: min(rows, n - start)])

    def statistics_mm():
        for start in range(0, n, rows):
            acc.addmm_(weights_t[:, start : start + rows], out[: min(rows, n - start)])

    with _ops.fp32_math(x.device.type):
        return {"distance": timed(distances, x.device, repeats),
                "statistics": timed(statistics_mm, x.device, repeats)}


def copy_bandwidth(rows: int, num_codes: int, device: torch.device, repeats: int = 3) -> float:
    """Bytes per second (read + write) of copying one chunk-sized fp32 buffer."""
    src = torch.randn(rows, num_codes, device=device)
    dst = torch.empty_like(src)
    return 2.0 * src.numel() * 4 / timed(lambda: dst.copy_(src), device, repeats)


def exp_rate(rows: int, num_codes: int, device: torch.device, repeats: int = 3) -> float:
    """exp evaluations per second on a chunk with values in [-80, 0] (the kernel's range)."""
    src = torch.rand(rows, num_codes, device=device).mul_(_ops.LOG_P_FLOOR)
    dst = torch.empty_like(src)
    return src.numel() / timed(lambda: torch.exp(src, out=dst), device, repeats)


def kernel_seconds(x: torch.Tensor, codebook: torch.Tensor, rows: int, repeats: int) -> dict:
    """Wall time of the library's kernels on x (N, D): BA-VQ's E-step (lambda = 1 and != 1), one
    Sinkhorn iteration of its balanced E-step and VQ-EMA's hard assignment, on the eager reference
    code and on the fused path."""
    log_weight = torch.full((codebook.shape[0],), -0.5, device=x.device)  # (1 - lambda) log q, any values
    log_ratio = torch.full_like(log_weight, -math.log(codebook.shape[0]))  # the uniform target
    calls = {
        "soft_assign(lambda=1)": lambda: _soft.soft_assign(x, codebook, None, 1.0, rows, nearest=True),
        "soft_assign(lambda!=1)": lambda: _soft.soft_assign(x, codebook, log_weight, 1.0, rows, nearest=True),
        "nearest_codes": lambda: _nearest.nearest_codes(x, codebook, rows),
        "sinkhorn_iteration": lambda: _sinkhorn.balance_potentials(x, codebook, None, 1.0, rows, log_ratio, 1),
    }
    out = {}
    with _ops.fp32_math(x.device.type):
        for name, fn in calls.items():
            for mode, prefix in (("eager", ""), ("auto", "fused ")):
                previous = _ops.set_kernels(mode)
                try:
                    out[prefix + name] = timed(fn, x.device, repeats)
                finally:
                    _ops.set_kernels(previous)
    return out


def fused_chunk_rows(num_codes: int, dim: int, rows: int, device: torch.device) -> int:
    """Rows per chunk the fused path uses (CUDA: no chunks; the matmul reference keeps ``rows``)."""
    return _fused.cache_rows(num_codes, dim, rows) if device.type == "cpu" else rows


def measure_dim(n: int, num_codes: int, dim: int, rows: int, device: torch.device, repeats: int,
                peak: float) -> dict:
    """Every number for one (N, K, D, chunk rows): kernel times, references, ratios and the bound."""
    gen = torch.Generator(device="cpu").manual_seed(dim)
    x = torch.randn(n, dim, generator=gen).to(device)
    codebook = torch.randn(num_codes, dim, generator=gen).to(device)
    mm = chunked_matmul_seconds(x, codebook, rows, repeats)
    fused_rows = fused_chunk_rows(num_codes, dim, rows, device)
    mm_fused = chunked_matmul_seconds(x, codebook, fused_rows, repeats)
    kernels = kernel_seconds(x, codebook, rows, repeats)
    bandwidth = copy_bandwidth(min(rows, n), num_codes, device, repeats)
    exps = exp_rate(min(rows, n), num_codes, device, repeats)
    elements = n * num_codes
    flops = {"distance": 2.0 * elements * dim, "statistics": 2.0 * elements * (dim + 1)}
    result = {"N": n, "K": num_codes, "D": dim, "chunk_rows": rows, "fused_chunk_rows": fused_rows,
              "peak_matmul_flops": peak, "copy_bandwidth_bytes_per_s": bandwidth, "exp_per_s": exps,
              "matmul_seconds": mm, "matmul_seconds_fused_chunks": mm_fused,
              "matmul_flops_per_s": {k: flops[k] / mm[k] for k in mm}, "kernels": {}}
    for name, seconds in kernels.items():
        soft = "soft" in name
        mm_flops = flops["distance"] + (flops["statistics"] if soft else 0.0)
        mm_seconds = mm["distance"] + (mm["statistics"] if soft else 0.0)
        mm_chunk = mm_fused if name.startswith("fused") else mm
        mm_chunk_seconds = mm_chunk["distance"] + (mm_chunk["statistics"] if soft else 0.0)
        traffic = PASSES[name] * elements * 4.0
        exp_count = elements * (2 if "sinkhorn" in name else 1 if soft else 0)  # row and column exps
        floors = {"compute_at_peak": mm_flops / peak, "memory_at_copy_bw": traffic / bandwidth,
                  "exp": exp_count / exps}
        result["kernels"][name] = {
            "seconds": seconds,
            "matmul_flops": mm_flops,
            "achieved_flops_per_s": mm_flops / seconds,
            "matmul_same_size_seconds": mm_seconds,
            "efficiency_vs_matmul": mm_seconds / seconds,  # target >= 0.6 (soft_assign, D = 8)
            # the same, against torch.mm in the kernel's own chunk size (cache-sized for fused kernels)
            "efficiency_vs_matmul_own_chunks": mm_chunk_seconds / seconds,
            "efficiency_vs_peak": mm_flops / seconds / peak,
            "elementwise_exp": exp_count,
            "intermediate_passes": PASSES[name],
            "intermediate_bytes_per_s": traffic / seconds,
            "fraction_of_copy_bw": traffic / seconds / bandwidth,
            "floors_seconds": floors,
            "bound": max(floors, key=floors.get),
        }
    return result


def chunk_sweep(n: int, num_codes: int, dim: int, rows_list: list[int], device: torch.device,
                repeats: int) -> list[dict]:
    """soft_assign (lambda = 1) time at several chunk sizes (quantizer.chunk_budget_mib sets the rows)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(n, dim, generator=gen).to(device)
    codebook = torch.randn(num_codes, dim, generator=gen).to(device)
    out = []
    with _ops.fp32_math(device.type):
        for rows in rows_list:
            seconds = timed(lambda: _soft.soft_assign(x, codebook, None, 1.0, rows, nearest=True),
                            device, repeats)
            out.append({"chunk_rows": rows, "chunk_mib": rows * num_codes * 4 / 2**20, "seconds": seconds})
    return out


def rowdot_candidates(rows: int, num_codes: int, device: torch.device, repeats: int) -> dict:
    """Seconds of the entropy's per-row sum_k p_k b_k on one chunk: a bmm row dot (``_entropy_loss._row_dot``,
    which soft_assign used first) vs the in-place multiply + sum that soft_assign uses now (b is not
    read again). Kept so the choice can be re-checked on other hardware."""
    gen = torch.Generator(device="cpu").manual_seed(2)
    b = torch.rand(rows, num_codes, generator=gen).mul_(_ops.LOG_P_FLOOR).to(device)
    u = b.exp()
    scratch = torch.empty_like(b)

    def in_place():  # copy first so every repetition starts from the same b (copy timed separately)
        scratch.copy_(b)
        return scratch.mul_(u).sum(1)

    with _ops.fp32_math(device.type):
        out = {"bmm (_entropy_loss._row_dot)": timed(lambda: _entropy_loss._row_dot(u, b), device, repeats),
               "copy (subtract from the next)": timed(lambda: scratch.copy_(b), device, repeats),
               "copy + mul_ + sum": timed(in_place, device, repeats)}
    out["mul_ + sum (net)"] = out["copy + mul_ + sum"] - out["copy (subtract from the next)"]
    return out


_FLOOR = _ops.LOG_P_FLOOR


def _compiled_sweep():
    """torch.compile of the eager row sweep (lambda = 1): Inductor fuses max/argmax into one loop and
    clamp/exp/sum/sum(u b) into another; the GEMMs stay outside (extern BLAS calls either way)."""

    def sweep(a):
        a_max, a_arg = a.max(1)
        b = (a - a_max[:, None]).clamp(min=_FLOOR)
        u = b.exp()
        norm = u.sum(1)
        return a_max, a_arg, u, norm, (u * b).sum(1) / norm

    return torch.compile(sweep, dynamic=False)


def _compiled_soft_assign(sweep, x: torch.Tensor, codebook: torch.Tensor, beta: float, rows: int):
    n, dim = x.shape
    bias = -beta * codebook.square().sum(1)
    sums_t = x.new_zeros(dim + 1, codebook.shape[0])
    work = x.new_empty(rows, codebook.shape[0])
    for start in range(0, n, rows):
        xc = x[start : start + rows]
        count = xc.shape[0]
        if count < rows:  # pad the last chunk: a new shape would recompile
            xc = torch.cat([xc, xc.new_zeros(rows - count, dim)])
        torch.addmm(bias, xc, codebook.t(), alpha=2.0 * beta, out=work)
        _, _, u, norm, _ = sweep(work)
        weights = torch.cat([xc, torch.ones_like(xc[:, :1])], 1).div_(norm[:, None])
        sums_t.addmm_(weights[:count].t(), u[:count])
    return sums_t


def candidates(n: int, num_codes: int, dims: list[int], rows_list: list[int], device: torch.device,
               repeats: int) -> list[dict]:
    """The CPU-path decision: BA-VQ E-step (lambda = 1) seconds, eager vs torch.compile vs the C++
    sweep, at several chunk sizes, all interleaved in this run."""
    out = []
    for dim in dims:
        gen = torch.Generator(device="cpu").manual_seed(3)
        x = torch.randn(n, dim, generator=gen).to(device)
        codebook = torch.randn(num_codes, dim, generator=gen).to(device)
        default_rows = _ops.chunk_rows(num_codes, 8192, 128)
        sweep = _compiled_sweep()
        with _ops.fp32_math(device.type):
            start = time.perf_counter()
            _compiled_soft_assign(sweep, x[:rows_list[0]], codebook, 1.0, rows_list[0])
            first_call = time.perf_counter() - start
            previous = _ops.set_kernels("eager")
            rec = {"D": dim, "compile_first_call_s": first_call,
                   "eager": timed(lambda: _soft.soft_assign(x, codebook, None, 1.0, default_rows, True),
                                  device, repeats)}
            _ops.set_kernels(previous)
            rec["mm"] = sum(chunked_matmul_seconds(x, codebook, default_rows, repeats).values())
            for rows in rows_list:
                rec[f"compile@{rows}"] = timed(lambda: _compiled_soft_assign(sweep, x, codebook, 1.0, rows),
                                               device, repeats)
                rec[f"c++@{rows}"] = timed(lambda: _fused.soft_assign(x, codebook, None, 1.0, rows, True,
                                                                      exact_rows=True), device, repeats)
        out.append(rec)
    return out


def print_report(report: dict) -> None:
    print(f"device {report['device']}, threads {report['threads']}, clock {report.get('clock', 'wall')}, "
          f"peak fp32 matmul {report['peak_matmul_flops'] / 1e9:.1f} GFLOP/s")
    head = (f"{'kernel':30s} {'D':>4s} {'rows':>5s} {'time s':>8s} {'GFLOP/s':>8s} {'vs mm':>6s} "
            f"{'vs mm@chunk':>11s} {'vs peak':>7s} {'GB/s':>6s} {'of bw':>6s}  "
            "bound (floors s: compute / memory / exp)")
    print(head)
    for r in report["dims"]:
        for name, k in r["kernels"].items():
            f = k["floors_seconds"]
            rows = r["fused_chunk_rows"] if name.startswith("fused") else r["chunk_rows"]
            print(f"{name:30s} {r['D']:4d} {rows:5d} {k['seconds']:8.3f} "
                  f"{k['achieved_flops_per_s'] / 1e9:8.1f} {k['efficiency_vs_matmul']:6.1%} "
                  f"{k['efficiency_vs_matmul_own_chunks']:11.1%} "
                  f"{k['efficiency_vs_peak']:7.1%} {k['intermediate_bytes_per_s'] / 1e9:6.1f} "
                  f"{k['fraction_of_copy_bw']:6.1%}  {k['bound']} ({f['compute_at_peak']:.3f} / "
                  f"{f['memory_at_copy_bw']:.3f} / {f['exp']:.3f})")
        print(f"{'  torch.mm same sizes':30s} {r['D']:4d}  distance {r['matmul_seconds']['distance']:.3f} s "
              f"({r['matmul_flops_per_s']['distance'] / 1e9:.1f} GFLOP/s), statistics "
              f"{r['matmul_seconds']['statistics']:.3f} s ({r['matmul_flops_per_s']['statistics'] / 1e9:.1f} "
              f"GFLOP/s); in {r['fused_chunk_rows']}-row chunks "
              f"{sum(r['matmul_seconds_fused_chunks'].values()):.3f} s; copy "
              f"{r['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, exp {r['exp_per_s'] / 1e9:.2f} G/s")
    for name, seconds in report.get("rowdot_candidates", {}).items():
        print(f"row dot on one chunk: {name:30s} {1e3 * seconds:8.2f} ms")
    for s in report.get("chunk_sweep", []):
        print(f"chunk sweep D={report['sweep_dim']}: rows {s['chunk_rows']:6d} ({s['chunk_mib']:6.1f} MiB) "
              f"{s['seconds']:.3f} s")
    for c in report.get("candidates", []):
        times = {k: v for k, v in c.items() if k not in ("D", "compile_first_call_s")}
        print(f"CPU-path candidates D={c['D']} (seconds; share of torch.mm): "
              + ", ".join(f"{k} {v:.3f} ({c['mm'] / v:.0%})" for k, v in times.items())
              + f"; torch.compile first call {c['compile_first_call_s']:.1f} s")


def run(n: int, num_codes: int, dims: list[int], rows: int | None, device: torch.device, repeats: int,
        peak_size: int, sweep_rows: list[int], candidate_rows: list[int] | None = None) -> dict:
    """The whole report as a dict (also used by gpu_check.py)."""
    rows = rows or _ops.chunk_rows(num_codes, 8192, 128)  # the quantizer's default chunking
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "peak_matmul_flops": peak_matmul_flops(device, peak_size),
              "dims": [], "chunk_sweep": [], "sweep_dim": min(dims)}
    for dim in dims:
        report["dims"].append(measure_dim(n, num_codes, dim, rows, device, repeats,
                                          report["peak_matmul_flops"]))
    if sweep_rows:
        report["chunk_sweep"] = chunk_sweep(n, num_codes, min(dims), sweep_rows, device, repeats)
    report["rowdot_candidates"] = rowdot_candidates(min(rows, n), num_codes, device, repeats)
    if candidate_rows and device.type == "cpu":
        report["candidates"] = candidates(n, num_codes, dims, candidate_rows, device, repeats)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU-sized: N=8192, K=16384, D in 8, 64")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes (seconds), for tests")
    p.add_argument("--num-vectors", type=int, default=65536, help="N (rows) of the full run")
    p.add_argument("--num-codes", type=int, default=16384, help="K")
    p.add_argument("--dims", type=int, nargs="+", default=None, help="code dims D (default 8 64 256)")
    p.add_argument("--chunk-rows", type=int, default=None, help="rows per chunk (default: quantizer default)")
    p.add_argument("--sweep-rows", type=int, nargs="*", default=None,
                   help="chunk sizes (rows) to sweep at the smallest D")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="process: CPU time of this process (use with --threads 1 on a shared machine)")
    p.add_argument("--candidates", action="store_true",
                   help="also time eager vs torch.compile vs the C++ sweep at several chunk sizes (CPU)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n, k, peak, sweep = args.num_vectors, args.num_codes, 2048, [512, 1024, 2048]
    dims = args.dims or [8, 64, 256]
    if args.quick:
        n, dims, peak, sweep = 8192, args.dims or [8, 64], 1024, [256, 512, 1024, 2048]
    if args.dry_run:
        n, k, dims, peak, sweep = 256, 512, args.dims or [8], 128, [64, 256]
    if args.sweep_rows is not None:
        sweep = args.sweep_rows
    if args.clock == "process":
        CLOCK["fn"] = time.process_time
    cand = ([64, 128, 256, 2048] if not args.dry_run else [64, 256]) if args.candidates else None
    report = run(n, k, dims, args.chunk_rows, torch.device(args.device), args.repeats, peak, sweep, cand)
    report["clock"] = args.clock
    argv = sys.argv[1:] if argv is None else argv
    report["command"] = " ".join(["python", "benchmarks/bench_kernel.py", *argv])
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
