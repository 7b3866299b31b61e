"""The prepared GPU check behind ``benchmarks/gpu_check.sh`` (one NVIDIA GPU, no network, < 8 min).

Sections (each one is written to the JSON as soon as it finishes, so a timeout keeps the rest):

1. **quantizer**: our VQ-EMA and BA-VQ at K = 16,384, N = 65,536 vectors, code_dim 8 and 256, under
   bf16 autocast (the codebook math itself stays fp32): forward + backward time and peak memory.
2. **vqgan_step**: a VQ-GAN f16 training step (256x256, taming widths, PatchGAN with the adaptive
   GAN weight, no LPIPS because no weights file is at hand) in bf16 autocast with each quantizer:
   images/s and ``torch.cuda.max_memory_allocated``.
3. **kernel**: ``benchmarks/bench_kernel.py`` at N = 65,536, K = 16,384, D = 8 and 256 against
   this GPU's own fp32 ``torch.mm`` rate (TF32 off) of the same sizes (eager and fused kernels).
0. **fused_check** (runs first): the fused E-step (Triton on CUDA, the C++ sweep on CPU) against the
   eager reference at K = 16,384: share of equal hard codes and the largest statistic error relative
   to the reference's scale, for lambda in {0, 1}, both assignment rules, D = 8 and 256.

Synthetic data only. ``webdataset``, ``wandb`` and ``deepspeed`` are blocked at import (they are not
installed on the GPU machine), so a stray import fails here, on CPU, first. ``--dry-run`` runs the
same code paths on CPU at tiny sizes in seconds; CI runs it through the shell script.

    bash benchmarks/gpu_check.sh [--dry-run] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.abc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

BLOCKED = ("webdataset", "wandb", "deepspeed")


class _BlockImports(importlib.abc.MetaPathFinder):
    """Make ``import webdataset`` (etc.) fail as it does on the GPU machine."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named '{fullname}' (blocked: absent on the GPU machine)")
        return None


sys.meta_path.insert(0, _BlockImports())
if __package__ in (None, ""):  # run as a script: make `import bavq` and `import benchmarks` work
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bavq.config import QuantizerConfig  # noqa: E402
from bavq.quantizers import build_quantizer  # noqa: E402
from benchmarks import bench_kernel, bench_step  # noqa: E402

SIZES = {  # full GPU sizes / CPU dry-run sizes
    "full": {"num_codes": 16384, "num_vectors": 65536, "dims": [8, 256], "latent": 16, "image": 256,
             "base": 128, "res_blocks": 2, "attn": "[16]", "disc": 64, "batch": 8, "warmup": 3, "steps": 10,
             "repeats": 5, "peak": 8192, "sweep": [512, 2048, 8192]},
    "dry": {"num_codes": 256, "num_vectors": 512, "dims": [8, 32], "latent": 4, "image": 32, "base": 8,
            "res_blocks": 1, "attn": "[]", "disc": 8, "batch": 2, "warmup": 0, "steps": 1, "repeats": 1,
            "peak": 128, "sweep": [64, 256]},
}
QUANTIZERS = ("vq_ema", "ba_vq")


def _peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def environment(device: torch.device, dry_run: bool) -> dict:
    """What ran where: versions, the GPU, and the third-party modules bavq pulled in."""
    info = {"dry_run": dry_run, "torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
            "python": sys.version.split()[0], "blocked_imports": list(BLOCKED),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory,
                    capability=f"{props.major}.{props.minor}")
    else:
        info.update(gpu=None, gpu_memory_bytes=None, capability=None)
    return info


def _quantizer_case(name: str, dim: int, device: torch.device, size: dict) -> dict:
    """Forward + backward of one quantizer on (B, D, L, L) latents with B*L*L = N, bf16 autocast."""
    latent = size["latent"]
    cfg = QuantizerConfig(name=name, num_codes=size["num_codes"], code_dim=dim)
    quantizer = build_quantizer(cfg).to(device).train()
    gen = torch.Generator().manual_seed(dim)
    # under bf16 autocast the encoder emits bf16: feed the quantizer what it really sees
    z = torch.randn(size["num_vectors"] // latent**2, dim, latent, latent, generator=gen)
    z = z.to(device, torch.bfloat16).requires_grad_(True)

    def fwd_bwd():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = quantizer(z)
            loss = out.loss + out.quantized.float().square().mean()
        loss.backward()

    fwd_bwd()  # first call: adaptive beta's D_hat measurement, allocator warm-up
    base = _reset_peak(device)
    seconds = bench_kernel.timed(fwd_bwd, device, size["repeats"], warmup=1)
    peak = _peak_memory(device)
    return {"quantizer": name, "num_codes": size["num_codes"], "code_dim": dim,
            "num_vectors": z.shape[0] * latent * latent, "autocast": "bf16",
            "chunk_rows": quantizer.rows_per_chunk, "fwd_bwd_ms": 1e3 * seconds, "peak_mem_bytes": peak,
            "peak_mem_above_inputs_bytes": None if peak is None else peak - base}


def quantizer_bench(device: torch.device, size: dict) -> list[dict]:
    """Every quantizer at every code_dim (K and N from ``size``)."""
    return [_quantizer_case(name, dim, device, size) for dim in size["dims"] for name in QUANTIZERS]


def _vqgan_case(name: str, device: torch.device, size: dict) -> dict:
    extra = [f"model.base_channels={size['base']}", "model.channel_mult=[1,1,2,2,4]",
             f"model.num_res_blocks={size['res_blocks']}", f"model.attn_resolutions={size['attn']}",
             f"data.image_size={size['image']}", f"model.disc_channels={size['disc']}",
             "loss.disc_weight=0.5", "loss.disc_start=0", "train.mixed_precision=bf16"]
    cfg = bench_step.make_config("vqgan", name, size["num_codes"], 8, extra)
    parts = bench_step.build_parts(cfg, device, ddp=False)
    gen = torch.Generator().manual_seed(0)
    shape = (size["batch"], 3, size["image"], size["image"])
    batches = [(torch.rand(shape, generator=gen) * 2 - 1).to(device) for _ in range(2)]
    numel = bench_step.stats_numel(name, size["num_codes"], 8)
    _reset_peak(device)
    timing = bench_step.time_steps(parts, batches, size["warmup"], size["steps"], numel, torch.bfloat16)
    step = statistics.median(timing["step_s"])
    return {"quantizer": name, "num_codes": size["num_codes"], "code_dim": 8, "image_size": size["image"],
            "batch": size["batch"], "generator_params": sum(p.numel() for p in parts.plain.parameters()),
            "autocast": "bf16", "perceptual_loss": "off (no LPIPS weights file)", "step_ms": 1e3 * step,
            "images_per_s": size["batch"] / step, "quantizer_stats_bytes": 4 * numel,
            "peak_mem_bytes": _peak_memory(device)}


def vqgan_step_bench(device: torch.device, size: dict) -> list[dict]:
    """Full VQ-GAN f16 training steps (generator + PatchGAN) in bf16 autocast, one per quantizer."""
    return [_vqgan_case(name, device, size) for name in QUANTIZERS]


def kernel_bench(device: torch.device, size: dict) -> dict:
    """bench_kernel's report: soft_assign / nearest_codes vs this device's fp32 torch.mm (TF32 off)."""
    return bench_kernel.run(size["num_vectors"], size["num_codes"], size["dims"], None, device,
                            size["repeats"], size["peak"], size["sweep"])


def fused_check(device: torch.device, size: dict) -> list[dict]:
    """Fused vs eager E-step on this device (the first real run of the Triton kernels)."""
    from bavq.quantizers import _ops, _soft

    out = []
    n, num_codes = min(size["num_vectors"], 8192), size["num_codes"]
    for dim in size["dims"]:
        gen = torch.Generator().manual_seed(dim)
        x = torch.randn(n, dim, generator=gen).to(device)
        codebook = torch.randn(num_codes, dim, generator=gen).to(device)
        log_weight = (torch.rand(num_codes, generator=gen) + 0.05).log().to(device)
        for lam, assign in ((1.0, "nearest"), (0.0, "nearest"), (0.0, "map")):
            args = (x, codebook, None if lam == 1.0 else (1.0 - lam) * log_weight, 16.0 / dim, 2048)
            with _ops.fp32_math(device.type):
                fused = _soft.soft_assign(*args, nearest=assign == "nearest")
                previous = _ops.set_kernels("eager")
                ref = _soft.soft_assign(*args, nearest=assign == "nearest")
                _ops.set_kernels(previous)
            errors = {f: float((getattr(fused, f) - getattr(ref, f)).abs().max()
                               / getattr(ref, f).abs().max().clamp_min(1e-30))
                      for f in ("soft_counts", "soft_sums", "min_dist", "hard_dist", "entropy", "soft_dist")}
            out.append({"D": dim, "lambda": lam, "assign": assign, "max_rel_error": max(errors.values()),
                        "errors": errors,
                        "indices_equal_fraction": float((fused.indices == ref.indices).float().mean())})
    return out


def _mib(num_bytes: int | None) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**20:,.0f} MiB"


def summary_text(result: dict) -> str:
    """A few human lines from the JSON (what the README quotes)."""
    meta = result["meta"]
    lines = [f"bavq gpu_check on {meta['gpu'] or 'CPU (dry run)'}, torch {meta['torch']}, "
             f"CUDA {meta['cuda']}, {meta['started']}"]
    for r in result.get("quantizer") or []:
        lines.append(f"quantizer {r['quantizer']:6s} K={r['num_codes']} D={r['code_dim']:3d} "
                     f"N={r['num_vectors']} bf16: fwd+bwd {r['fwd_bwd_ms']:.2f} ms, "
                     f"peak {_mib(r['peak_mem_bytes'])}")
    for r in result.get("vqgan_step") or []:
        lines.append(f"vqgan f16 {r['image_size']}px batch {r['batch']} {r['quantizer']:6s} "
                     f"K={r['num_codes']}: "
                     f"{r['images_per_s']:.1f} img/s ({r['step_ms']:.1f} ms/step), "
                     f"peak {_mib(r['peak_mem_bytes'])}")
    for r in result.get("fused_check") or []:
        lines.append(f"fused E-step vs eager D={r['D']:3d} lambda={r['lambda']:g} {r['assign']:7s}: "
                     f"{r['indices_equal_fraction']:.4%} equal codes, max error {r['max_rel_error']:.1e}")
    kernel = result.get("kernel")
    if kernel:
        lines.append(f"fp32 matmul peak (TF32 off) {kernel['peak_matmul_flops'] / 1e12:.2f} TFLOP/s")
        for d in kernel["dims"]:
            for name, k in d["kernels"].items():
                lines.append(f"kernel {name:22s} D={d['D']:3d}: {k['efficiency_vs_matmul']:.0%} of torch.mm "
                             f"same sizes, {k['efficiency_vs_peak']:.1%} of peak, "
                             f"{k['fraction_of_copy_bw']:.0%} of copy bandwidth, bound: {k['bound']}")
    for err in result["errors"]:
        lines.append(f"ERROR in {err['section']}: {err['message']}")
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out / "gpu_check.json")
    (out / "gpu_check.txt").write_text(summary_text(result))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="same code paths on CPU at tiny sizes")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "benchmarks/results"),
                   help="output folder ($OUT if set, else benchmarks/results)")
    p.add_argument("--batch", type=int, default=None, help="VQ-GAN images per step (default 8)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --dry-run, torch's default otherwise)")
    args = p.parse_args(argv)
    threads = args.threads or (1 if args.dry_run else 0)
    if threads:  # one thread: several OpenMP threads on a busy shared CPU can run 100x slower
        torch.set_num_threads(threads)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; use --dry-run on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    size = dict(SIZES["dry" if args.dry_run else "full"])
    if args.batch:
        size["batch"] = args.batch
    result = {"meta": environment(device, args.dry_run), "sizes": size, "fused_check": None, "quantizer": None,
              "vqgan_step": None, "kernel": None, "errors": [], "seconds": {}}
    sections = {"fused_check": fused_check, "quantizer": quantizer_bench, "vqgan_step": vqgan_step_bench,
                "kernel": kernel_bench}
    for name, fn in sections.items():
        start = time.perf_counter()
        try:
            result[name] = fn(device, size)
        except Exception as exc:  # noqa: BLE001 - one failed section must not lose the others
            result["errors"].append({"section": name, "message": f"{type(exc).__name__}: {exc}",
                                     "traceback": traceback.format_exc()})
        result["seconds"][name] = round(time.perf_counter() - start, 2)
        std = set(sys.stdlib_module_names)
        result["meta"]["third_party_imports"] = sorted(
            {m.split(".")[0] for m in sys.modules if m.split(".")[0] not in std and not m.startswith("_")})
        write(result, args.out)
        print(f"[gpu_check] {name} done in {result['seconds'][name]:.1f} s", flush=True)
    print(summary_text(result), end="")
    print(f"[gpu_check] wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.txt'}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
