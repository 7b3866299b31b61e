"""GPU smoke run of the REAL trainer (one NVIDIA GPU, no network, a few minutes); the sibling of
``gpu_check.py``, which times the quantizer and a bare VQ-GAN step.

Stages, each a subprocess of the real entry points on synthetic images (an image folder written
here), each timed and logged, all recorded in ``gpu_smoke.json`` / ``gpu_smoke.txt``:

1. ``ddp``: ``torchrun --nproc_per_node 1 -m bavq.train`` with BA-VQ (entropy loss on, so its extra
   all-reduce runs), bf16 autocast, periodic and final evaluation. A one-rank NCCL group already
   rejects a CPU tensor in any collective, so this stage is the device-correctness check.
2. ``deepspeed_bf16``: DeepSpeed ZeRO-2 in bf16 with the GAN on (two engines), stopped half-way.
3. ``deepspeed_resume``: the same command again: resumes from the checkpoint and finishes, with the
   final evaluation on a plain fp32 model.
4. ``eval_ddp`` / ``eval_deepspeed``: ``bavq-eval`` (``-m bavq.evaluate`` under torchrun, NCCL) of
   the DDP run folder and of the DeepSpeed checkpoint (ZeRO shards, read without an engine).
5. ``export``: ``bavq-export`` of the DeepSpeed checkpoint.

``--dry-run`` runs the same stages on CPU (gloo, tiny sizes) so CI keeps the script honest.

    bash benchmarks/gpu_smoke.sh [--dry-run] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_images(root: Path, per_class: int, size: int) -> Path:
    """Two classes of smooth synthetic RGB images (no dataset is reachable from the GPU machine)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        yy, xx = np.mgrid[0:size, 0:size] / size
        for i in range(per_class):
            base = np.stack([xx * (c + 1), yy, (xx + yy) / 2], axis=-1)
            img = np.clip(base + 0.2 * rng.standard_normal((size, size, 3)), 0, 1)
            Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root


def train_args(data: Path, out: Path, size: dict) -> list[str]:
    return ["--quantizer=ba_vq", f"--codebook_size={size['codes']}", f"--max_steps={size['steps']}", "--no_wandb",
            "quantizer.code_dim=8", "quantizer.entropy_loss_weight=0.01", "model.base_channels=32",
            "model.num_res_blocks=1", "data.source=image_folder", f"data.root={data}", "data.image_size=32",
            "data.num_workers=2", "data.val_fraction=0.2", f"train.batch_size={size['batch']}",
            f"train.output_dir={out}", f"train.log_every={max(1, size['steps'] // 4)}",
            f"train.eval_every={size['steps'] // 2}", "log.tensorboard=false", "log.progress=false",
            "eval.batch_size=64"]


def stages(work: Path, size: dict, dry_run: bool) -> list[tuple[str, list[str]]]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    data = work / "images"
    base = train_args(data, work / "runs", size)
    ds = base + ["--name=ds", "train.backend=deepspeed", "train.mixed_precision=bf16", "loss.disc_weight=0.5",
                 "model.disc_layers=2"]
    ddp_precision = "no" if dry_run else "bf16"  # bf16 autocast on CPU is slow and not what this checks
    ckpt = work / "runs" / "ds" / "checkpoints" / f"step_{size['steps']:08d}"
    return [
        ("ddp", [*launcher, "-m", "bavq.train", *base, "--name=ddp", f"train.mixed_precision={ddp_precision}"]),
        ("deepspeed_bf16", [*launcher, "-m", "bavq.train", *ds, f"train.stop_at_step={size['steps'] // 2}"]),
        ("deepspeed_resume", [*launcher, "-m", "bavq.train", *ds]),
        ("eval_ddp", [*launcher, "-m", "bavq.evaluate", str(work / "runs" / "ddp"), "--out",
                      str(work / "eval_ddp.json")]),
        ("eval_deepspeed", [*launcher, "-m", "bavq.evaluate", str(ckpt), "--out", str(work / "eval_ds.json")]),
        ("export", [sys.executable, "-c", "import sys; from bavq.export import main; "
                    "sys.exit(main(sys.argv[1:]))", str(ckpt), "--out", str(work / "export")]),
    ]


def run_stage(name: str, cmd: list[str], log: Path, timeout: float) -> dict:
    t0 = time.time()
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    tail = log.read_text(errors="replace").splitlines()[-15:]
    result = {"stage": name, "rc": rc, "seconds": round(time.time() - t0, 1), "log": str(log)}
    if rc != 0:
        result["tail"] = tail
    print(f"[gpu_smoke] {name}: rc {rc} in {result['seconds']} s", flush=True)
    return result


def environment(dry_run: bool) -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"dry_run": dry_run, "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0]}


def final_metrics(work: Path) -> dict:
    out = {}
    for name, path in (("ddp", work / "runs" / "ddp" / "final_metrics.json"),
                       ("deepspeed", work / "runs" / "ds" / "final_metrics.json"),
                       ("eval_ddp", work / "eval_ddp.json"), ("eval_deepspeed", work / "eval_ds.json")):
        if path.is_file():
            m = json.loads(path.read_text())
            out[name] = {k: m.get(k) for k in ("codebook_usage", "perplexity", "psnr", "ssim", "images",
                                               "world_size", "steps", "wall_seconds")}
    return out


def summary_text(result: dict) -> str:
    meta = result["meta"]
    lines = [f"bavq gpu_smoke on {meta['gpu'] or 'CPU (dry run)'}, torch {meta['torch']}, CUDA {meta['cuda']}, "
             f"Python {meta['python']}"]
    lines += [f"  {s['stage']:<18} rc {s['rc']!s:<8} {s['seconds']:>7.1f} s" for s in result["stages"]]
    for name, m in result["metrics"].items():
        lines.append(f"  {name:<18} usage {m['codebook_usage']} perplexity {m['perplexity']} psnr {m['psnr']}")
    lines.append("PASSED" if result["passed"] else "FAILED")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_smoke", description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the same stages on CPU at tiny sizes")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "benchmarks/results"))
    p.add_argument("--stage-timeout", type=float, default=150.0, help="seconds per stage")
    args = p.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device visible; use --dry-run on CPU", file=sys.stderr)
        return 2
    size = {"codes": 64, "steps": 4, "batch": 4, "images": 24} if args.dry_run else \
        {"codes": 1024, "steps": 60, "batch": 32, "images": 400}
    work = args.out / "gpu_smoke_work"
    write_images(work / "images", size["images"], 32)
    result = {"meta": environment(args.dry_run), "sizes": size, "stages": []}
    for name, cmd in stages(work, size, args.dry_run):
        result["stages"].append(run_stage(name, cmd, work / f"{name}.log", args.stage_timeout))
    result["metrics"] = final_metrics(work)
    result["passed"] = all(s["rc"] == 0 for s in result["stages"])
    (args.out / "gpu_smoke.json").write_text(json.dumps(result, indent=2))
    (args.out / "gpu_smoke.txt").write_text(summary_text(result))
    print(summary_text(result), end="")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
