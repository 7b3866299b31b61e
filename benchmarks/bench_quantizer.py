"""Speed and peak memory of one training step (forward + backward) of our quantizers against
vector-quantize-pytorch's VectorQuantize on the same tensors.

    python benchmarks/bench_quantizer.py            # K in {1024, 16384}, D in {8, 256}, N = 16384
    python benchmarks/bench_quantizer.py --quick    # 2 repeats per case (CPU: about 5 minutes)
    python benchmarks/bench_quantizer.py --device cuda

Times: for each (K, D) one subprocess builds the three implementations and times their steps
interleaved (median over the repeats after one warm-up step each), so that load changes on a
shared machine hit all of them alike. Peak memory: each (implementation, K, D) runs alone in its own
subprocess so earlier cases cannot pollute it; on CPU the growth of ru_maxrss over a baseline taken
after the inputs exist and a tiny warm-up step loaded the kernels, on CUDA
torch.cuda.max_memory_allocated over the memory allocated before the steps.
The library runs as VectorQuantize(dim=D, codebook_size=K, decay=0.99, rotation_trick=False,
commitment_weight=0.25, accept_image_fmap=True): its plain EMA codebook with a straight-through
estimator, the same job as our VQ-EMA (API checked against vector_quantize_pytorch 1.32 source).
``vq_ema`` / ``ba_vq`` run with the fused kernels (``_ops.set_kernels("auto")``: the C++ sweep on
CPU, Triton on CUDA); ``vq_ema_eager`` / ``ba_vq_eager`` are the same modules on the eager reference
kernels, timed in the same process for the before/after ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

IMPLS = ("vq_ema", "ba_vq", "library", "vq_ema_eager", "ba_vq_eager")
# --ba-variants: other BA-VQ E-steps timed in the same run (time only): the softmax E-step and the
# balanced one warm-started with one Sinkhorn iteration per step.
BA_VARIANTS = {"ba_vq_softmax": {"estep": "softmax"},
               "ba_vq_warm1": {"balance_iters": 1, "balance_warm_start": True},
               "ba_vq_online": {"balance_iters": 0, "balance_warm_start": True}}


def _build(impl: str, num_codes: int, dim: int) -> torch.nn.Module:
    if impl == "library":
        from vector_quantize_pytorch import VectorQuantize

        return VectorQuantize(dim=dim, codebook_size=num_codes, decay=0.99, rotation_trick=False,
                              commitment_weight=0.25, accept_image_fmap=True)
    from bavq.quantizers import BAVQ, VQEMA

    extra = BA_VARIANTS.get(impl, {})
    return (VQEMA if impl.startswith("vq_ema") else BAVQ)(num_codes, dim, decay=0.99, commitment=0.25, **extra)


def _step(module: torch.nn.Module, impl: str, z: torch.Tensor) -> None:
    if impl != "library":
        from bavq.quantizers import _ops

        _ops.set_kernels("eager" if impl.endswith("_eager") else "auto")
    if impl == "library":
        quantized, _, loss = module(z)
    else:
        out = module(z)
        quantized, loss = out.quantized, out.loss
    (loss + quantized.square().mean()).backward()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(dim: int, rows: int, device: torch.device) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(rows // 1024, dim, 32, 32, device=device, requires_grad=True)


def _timed_step(module: torch.nn.Module, impl: str, z: torch.Tensor) -> float:
    z.grad = None
    _sync(z.device)
    start = time.perf_counter()
    _step(module, impl, z)
    _sync(z.device)
    return time.perf_counter() - start


def time_case(num_codes: int, dim: int, rows: int, repeats: int, device_name: str, impls=IMPLS) -> dict:
    """Median step time (ms) of every implementation, interleaved in this one process."""
    device = torch.device(device_name)
    z = _inputs(dim, rows, device)
    modules = {impl: _build(impl, num_codes, dim).to(device).train() for impl in impls}
    for impl, module in modules.items():  # warm-up (BA-VQ's first step also measures D_hat)
        _timed_step(module, impl, z)
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(repeats):
        for impl, module in modules.items():
            times[impl].append(_timed_step(module, impl, z))
    return {impl: 1000 * statistics.median(t) for impl, t in times.items()}


def memory_case(impl: str, num_codes: int, dim: int, rows: int, device_name: str) -> float:
    """Peak extra memory (MiB) of two training steps of one implementation, alone in this process."""
    import resource

    device = torch.device(device_name)
    z = _inputs(dim, rows, device)
    module = _build(impl, num_codes, dim).to(device).train()
    # Warm-up on a tiny input: loads BLAS / CUDA kernels so their pages are not counted below.
    _step(_build(impl, num_codes, dim).to(device).train(), impl,
          torch.randn(1, dim, 4, 4, device=device, requires_grad=True))
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(2):  # the second step runs in the steady state (after data-dependent setup)
        _timed_step(module, impl, z)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return peak / 2**20


def _worker(cmd: list[str]):
    proc = subprocess.run([sys.executable, __file__, *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        print(f"    {' '.join(cmd)} failed: {tail[0]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(num_codes: int, dim: int, args) -> dict:
    """{impl: {"ms": ..., "peak_mib": ...}} for one (K, D); NaN where a worker failed."""
    common = ["--rows", str(args.rows), "--repeats", str(args.repeats), "--device", args.device,
              "--threads", str(args.threads)]
    variants = ["--ba-variants"] if args.ba_variants else []
    times = _worker(["--worker", "time", str(num_codes), str(dim), *common, *variants]) or {}
    result = {}
    for impl in IMPLS:
        peak = _worker(["--worker", impl, str(num_codes), str(dim), *common])
        result[impl] = {"ms": times.get(impl, float("nan")), "peak_mib": float("nan") if peak is None else peak}
    for impl in BA_VARIANTS if args.ba_variants else ():
        result[impl] = {"ms": times.get(impl, float("nan")), "peak_mib": float("nan")}
    return result


def _ratio(a: float, b: float) -> str:
    return f"{a / b:5.2f}" if b and b == b and a == a else "  n/a"


def print_table(results: dict, device: str, rows: int) -> None:
    print(f"\nforward+backward, N = {rows} vectors, device = {device}; time in ms, peak extra memory in MiB;"
          " ours with fused kernels, (eager) = the same module on the eager reference kernels")
    header = (f"{'K':>6} {'D':>4} | {'vq_ema ms':>9} {'ba_vq ms':>9} {'lib ms':>9} {'vq eager':>9} {'ba eager':>9} | "
              f"{'vq/lib':>6} {'ba/vq':>6} {'ba/vq eager':>11} | {'vq MiB':>8} {'ba MiB':>8} {'lib MiB':>8} "
              f"{'vq e MiB':>8} {'ba e MiB':>8}")
    print(header)
    print("-" * len(header))
    for (num_codes, dim), res in results.items():
        vq, ba, lib, vqe, bae = (res[i] for i in IMPLS)
        print(f"{num_codes:>6} {dim:>4} | {vq['ms']:9.1f} {ba['ms']:9.1f} {lib['ms']:9.1f} {vqe['ms']:9.1f} "
              f"{bae['ms']:9.1f} | {_ratio(vq['ms'], lib['ms']):>6} {_ratio(ba['ms'], vq['ms']):>6} "
              f"{_ratio(bae['ms'], vqe['ms']):>11} | {vq['peak_mib']:8.1f} {ba['peak_mib']:8.1f} "
              f"{lib['peak_mib']:8.1f} {vqe['peak_mib']:8.1f} {bae['peak_mib']:8.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=16384, help="vectors per step (multiple of 1024)")
    parser.add_argument("--codes", type=int, nargs="+", default=[1024, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[8, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 repeats per case")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads in every worker (0 = torch's default); 1 on a busy shared CPU, "
                             "where OpenMP barriers wait for descheduled threads")
    parser.add_argument("--ba-variants", action="store_true",
                        help=f"also time BA-VQ with other E-steps in the same run: {', '.join(BA_VARIANTS)}")
    parser.add_argument("--worker", nargs=3, metavar=("WHAT", "K", "D"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rows % 1024:
        parser.error("--rows must be a multiple of 1024 (the input is (N / 1024, D, 32, 32))")
    if args.quick:
        args.repeats = 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        what, num_codes, dim = args.worker[0], int(args.worker[1]), int(args.worker[2])
        if what == "time":
            impls = IMPLS + (tuple(BA_VARIANTS) if args.ba_variants else ())
            print(json.dumps(time_case(num_codes, dim, args.rows, args.repeats, args.device, impls)))
        else:
            print(json.dumps(memory_case(what, num_codes, dim, args.rows, args.device)))
        return
    results = {}
    for num_codes in args.codes:
        for dim in args.dims:
            res = results[(num_codes, dim)] = measure(num_codes, dim, args)
            print(f"K={num_codes} D={dim}: " + ", ".join(f"{i} {res[i]['ms']:.0f} ms" for i in IMPLS),
                  flush=True)
    print_table(results, args.device, args.rows)
    for (num_codes, dim), res in results.items():
        for impl in BA_VARIANTS if args.ba_variants else ():
            print(f"K={num_codes} D={dim}: {impl} {res[impl]['ms']:.0f} ms, "
                  f"{_ratio(res[impl]['ms'], res['vq_ema']['ms']).strip()}x our VQ-EMA (same run)")
    print(f"torch threads per worker: {args.threads or 'default'}")


if __name__ == "__main__":
    main()
