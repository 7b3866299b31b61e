"""Training-step speed in 1 and 2 processes, and what the global codebook statistics cost.

For the VQ-VAE (32x32) and a small VQ-GAN (64x64, base 32, f8, with its PatchGAN), with VQ-EMA
and BA-VQ at K in {1024, 16384} and code_dim 8, this times one full training step (generator
forward/backward/AdamW step, and the discriminator step for the VQ-GAN, as in
``bavq.train.trainer``) on synthetic images: no data loading is timed. Two processes run over
gloo on CPU with ``DistributedDataParallel(broadcast_buffers=False)``, the same per-rank batch as
one process (weak scaling) and the same number of threads per rank (``--threads``, default 1, so
each rank owns a core like each GPU owns its device). Before the 2-rank run the same processes
run every case as independent single processes at the same time: on a shared machine that, not
the lone process, is the baseline that isolates what communication adds.

The statistics all-reduce is measured twice: **in step**, by wrapping ``bavq.dist.all_reduce_sum``
for the flat buffer the quantizer reduces (this includes waiting for the slower rank), and
**isolated**, a barrier then ``all_reduce`` of a buffer of the same size (the pure cost).

    python benchmarks/bench_step.py --quick --json step.json    # CPU-sized, 1-2 minutes on 2 cores
    python benchmarks/bench_step.py --json step.json            # bigger batches, more steps
    python benchmarks/bench_step.py --scaling                   # the bytes-per-step table (Markdown)
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script from anywhere: make `import bavq` work
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bavq import dist  # noqa: E402
from bavq.config import Config, load_config  # noqa: E402

# Model shapes; batch sizes are per rank: (quick, full).
MODELS = {
    "vqvae": {"overrides": ["model.arch=vqvae", "model.base_channels=64", "model.channel_mult=[1,2]",
                            "model.num_res_blocks=2", "data.image_size=32"], "batch": (16, 64)},
    "vqgan": {"overrides": ["model.arch=vqgan", "model.base_channels=32", "model.channel_mult=[1,1,2,2]",
                            "model.num_res_blocks=1", "model.attn_resolutions=[]", "data.image_size=64",
                            "model.disc_channels=32", "loss.disc_weight=0.5", "loss.disc_start=0"],
              "batch": (4, 16)},
}
# Floats in the flat statistics buffer (bavq/quantizers: vq_ema.py and ba_vq.py docstrings).
SCALARS = {"vq_ema": 2, "ba_vq": 5}


def stats_numel(quantizer: str, num_codes: int, code_dim: int) -> int:
    """Length of the flat fp32 buffer the quantizer all-reduces once per step.

    VQ-EMA: [n_k (K) | s_k (K*D) | 2 scalars]; BA-VQ (default anneal beta): [S (K) | M^b (K*D) |
    hard counts (K) | reached (K) | n, sum x (D), sum x x^T (D*D) | 5 scalars].
    """
    if quantizer != "ba_vq":
        return num_codes * (code_dim + 1) + SCALARS[quantizer]
    moments = 1 + code_dim + code_dim * code_dim
    return num_codes * (code_dim + 3) + moments + SCALARS[quantizer]


def make_config(model: str, quantizer: str, num_codes: int, code_dim: int, extra: list[str] = ()) -> Config:
    """A validated Config for one benchmark case (no data is read: the source is irrelevant)."""
    overrides = MODELS[model]["overrides"] if model in MODELS else []
    return load_config(None, [*overrides, f"quantizer.name={quantizer}", f"quantizer.num_codes={num_codes}",
                              f"quantizer.code_dim={code_dim}", "train.max_steps=1", *extra])


@dataclass
class StepParts:
    """Everything one training step touches; ``model``/``disc`` may be DDP wrappers of ``plain``."""

    cfg: Config
    model: torch.nn.Module
    plain: torch.nn.Module
    disc: torch.nn.Module | None
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer | None
    gen_loss: torch.nn.Module


def build_parts(cfg: Config, device: torch.device, ddp: bool) -> StepParts:
    """Model + quantizer + (discriminator) + AdamW as the trainer builds them; DDP when ``ddp``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from bavq.losses import GeneratorLoss
    from bavq.models import build_discriminator, build_model
    from bavq.quantizers import build_quantizer

    torch.manual_seed(cfg.train.seed)  # identical weights and codebook on every rank
    quantizer = build_quantizer(cfg.quantizer, seed=cfg.train.seed)
    plain = build_model(cfg.model, cfg.quantizer, quantizer, image_size=cfg.data.image_size).to(device)
    disc = build_discriminator(cfg.model, cfg.loss)
    betas = tuple(cfg.train.adam_betas)
    opt_g = torch.optim.AdamW(plain.parameters(), lr=cfg.train.lr, betas=betas)
    opt_d = None
    if disc is not None:
        disc = disc.to(device)
        opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.train.disc_lr, betas=betas)
    model = plain
    if ddp:  # broadcast_buffers=False: DDP must not overwrite the reduced codebook buffers
        with warnings.catch_warnings():  # torch >= 2.14 calls it deprecated; the trainer uses it too
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            model = DDP(plain, broadcast_buffers=False)
            disc = DDP(disc, broadcast_buffers=False) if disc is not None else None
    return StepParts(cfg, model, plain, disc, opt_g, opt_d, GeneratorLoss(cfg.loss).to(device))


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


def train_step(parts: StepParts, x: torch.Tensor, step: int, amp_dtype: torch.dtype | None = None) -> None:
    """One optimizer step as ``bavq.train.trainer.Trainer`` does it with grad_accum = 1.

    Generator: forward (the quantizer reduces its statistics inside), loss with the frozen,
    unwrapped discriminator, backward (DDP reduces gradients), clip, AdamW. Then the
    discriminator step on real and detached reconstructed images.
    """
    cfg = parts.cfg
    autocast = torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    disc_plain = _unwrap(parts.disc) if parts.disc is not None else None
    parts.model.train()
    if disc_plain is not None:
        disc_plain.requires_grad_(False)
    with autocast:
        recon, q = parts.model(x)
        logits_fake = disc_plain(recon) if disc_plain is not None else None
        last = parts.plain.last_layer() if disc_plain is not None else None
        loss, _ = parts.gen_loss(x, recon, q.loss, logits_fake, last, step)
    loss.backward()
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(parts.model.parameters(), cfg.train.grad_clip)
    parts.opt_g.step()
    parts.opt_g.zero_grad(set_to_none=True)
    if disc_plain is None:
        return
    from bavq.losses import discriminator_loss

    disc_plain.requires_grad_(True)
    with autocast:
        d_loss, _ = discriminator_loss(parts.disc(x), parts.disc(recon.detach()), step, cfg.loss)
    d_loss.backward()
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(parts.disc.parameters(), cfg.train.grad_clip)
    parts.opt_d.step()
    parts.opt_d.zero_grad(set_to_none=True)


class ReduceTimer:
    """Times ``bavq.dist.all_reduce_sum`` on the statistics buffer (by its length) while active."""

    def __init__(self, numel: int, device: torch.device):
        self.numel, self.device = numel, device
        self.seconds: list[float] = []
        self._original = None

    def _wrapped(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.numel() != self.numel:
            return self._original(tensor)
        _sync(self.device)
        start = time.perf_counter()
        out = self._original(tensor)
        _sync(self.device)
        self.seconds.append(time.perf_counter() - start)
        return out

    def __enter__(self) -> ReduceTimer:
        self._original, dist.all_reduce_sum = dist.all_reduce_sum, self._wrapped
        return self

    def __exit__(self, *exc) -> None:
        dist.all_reduce_sum = self._original


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(parts: StepParts, batches: list[torch.Tensor], warmup: int, steps: int,
               reduce_numel: int, amp_dtype: torch.dtype | None = None) -> dict:
    """Per-step wall times (s) and in-step statistics all-reduce times after ``warmup`` steps."""
    device = batches[0].device
    for i in range(warmup):
        train_step(parts, batches[i % len(batches)], i, amp_dtype)
    step_times = []
    with ReduceTimer(reduce_numel, device) as timer:
        for i in range(steps):
            dist.barrier()  # ranks start each timed step together
            _sync(device)
            start = time.perf_counter()
            train_step(parts, batches[(warmup + i) % len(batches)], warmup + i, amp_dtype)
            _sync(device)
            step_times.append(time.perf_counter() - start)
    if len(timer.seconds) != steps:
        raise RuntimeError(f"expected one statistics all-reduce of {reduce_numel} floats per step, saw "
                           f"{len(timer.seconds)} in {steps} steps: check the buffer layout in stats_numel()")
    return {"step_s": step_times, "stats_reduce_s": timer.seconds}


def isolated_allreduce_seconds(numel: int, repeats: int) -> float:
    """Median time of all_reduce(sum) of ``numel`` fp32 after a barrier; 0 in one process."""
    if dist.get_world_size() == 1:
        return 0.0
    buf = torch.ones(numel)
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce_sum(buf)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def run_case(case: dict, opts: dict) -> dict:
    """Build, time and measure one case in this process (any rank); returns the rank's record."""
    cfg = make_config(case["model"], case["quantizer"], case["num_codes"], case["code_dim"])
    world = dist.get_world_size()
    parts = build_parts(cfg, torch.device("cpu"), ddp=world > 1)
    gen = torch.Generator().manual_seed(1000 + dist.get_rank())  # different images on each rank
    size = cfg.data.image_size
    batches = [torch.rand(case["batch"], 3, size, size, generator=gen) * 2 - 1 for _ in range(2)]
    numel = stats_numel(case["quantizer"], case["num_codes"], case["code_dim"])
    timing = time_steps(parts, batches, opts["warmup"], opts["steps"], numel)
    grad_numel = sum(p.numel() for p in parts.plain.parameters())
    if parts.disc is not None:
        grad_numel += sum(p.numel() for p in parts.disc.parameters())
    step = statistics.median(timing["step_s"])
    reduce_in_step = statistics.median(timing["stats_reduce_s"])
    reduce_isolated = isolated_allreduce_seconds(numel, opts["reduce_repeats"])
    return {**case, "world_size": world, "rank": dist.get_rank(), "threads_per_rank": torch.get_num_threads(),
            "step_s_median": step, "step_s_all": timing["step_s"],
            "samples_per_s": world * case["batch"] / step,
            "stats_bytes": 4 * numel, "stats_reduce_s_in_step": reduce_in_step,
            "stats_reduce_s_isolated": reduce_isolated,
            "stats_share_in_step": reduce_in_step / step, "stats_share_isolated": reduce_isolated / step,
            "grad_params": grad_numel, "grad_bytes": 4 * grad_numel,
            "grad_reduce_s_isolated": isolated_allreduce_seconds(grad_numel, 2)}


def _rank_cases(rank: int, world: int, cases: list[dict], opts: dict) -> list[dict]:
    """One spawned rank: every case, either as an independent process running at the same time as
    the others (no process group: what sharing the machine costs without communication) or inside
    the gloo group; returns this rank's records."""
    torch.set_num_threads(opts["threads"])
    return [{**run_case(case, opts), "concurrent_processes": world} for case in cases]


def _spawned_rank(rank: int, world: int, tmp: str, init_group: bool, cases: list[dict], opts: dict) -> None:
    """One process of :func:`spawn_ranks`; rank 0 leaves its records in TMP/records.pkl.

    On success the rank waits for the others, tears the group down and leaves with ``os._exit(0)``
    once its records are on disk: a gloo rank that runs interpreter finalization can still abort in
    C++ teardown ("terminate called without an active exception", seen in about 1 of 3 runs of the
    two-rank dry run on a busy 2-core machine, with an empty Python stack), and the spawner then
    kills the other rank and reports a failed benchmark that had finished."""
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
    if init_group:
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        records = _rank_cases(rank, world, cases, opts)
    except BaseException:
        dist.shutdown(wait=False)  # the other ranks may never reach a barrier
        raise
    dist.shutdown(wait=True)
    if rank == 0:
        with open(os.path.join(tmp, "records.pkl"), "wb") as fh:
            pickle.dump(records, fh)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(cases: list[dict], opts: dict, world: int, init_group: bool, timeout: float) -> list[dict]:
    """Rank 0's records of ``cases`` run by ``world`` spawned processes, in one gloo group or (without
    ``init_group``) as independent processes; a failing rank raises with its traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        context = torch.multiprocessing.spawn(_spawned_rank, (world, tmp, init_group, cases, opts), nprocs=world,
                                              join=False)
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{world} benchmark processes still running after {timeout:.0f} s")
        with open(os.path.join(tmp, "records.pkl"), "rb") as fh:
            return pickle.load(fh)


def run_distributed(cases: list[dict], opts: dict, world: int, timeout: float = 1800.0) -> list[dict]:
    """Rank 0's records of ``cases`` in ``world`` spawned processes: first (optionally) as independent
    concurrent processes, then as one gloo group."""
    records = []
    if opts["concurrent_baseline"]:
        records += spawn_ranks(cases, opts, world, init_group=False, timeout=timeout)
    records += spawn_ranks(cases, opts, world, init_group=True, timeout=timeout)
    return records


def weak_scaling(records: list[dict]) -> list[dict]:
    """R-rank / 1-rank step time at the same per-rank batch, per (model, quantizer, K).

    ``ratio_vs_concurrent`` divides by the step of R independent single processes running at the
    same time instead (when measured): what is left is communication and synchronization.
    """
    def key(r):
        return r["model"], r["quantizer"], r["num_codes"]

    alone = {key(r): r for r in records if r["world_size"] == 1 and r["concurrent_processes"] == 1}
    concurrent = {(*key(r), r["concurrent_processes"]): r for r in records
                  if r["world_size"] == 1 and r["concurrent_processes"] > 1}
    out = []
    for r in records:
        base = alone.get(key(r))
        if r["world_size"] > 1 and base is not None:
            busy = concurrent.get((*key(r), r["world_size"]))
            vs_busy = None if busy is None else r["step_s_median"] / busy["step_s_median"]
            out.append({"model": r["model"], "quantizer": r["quantizer"], "num_codes": r["num_codes"],
                        "world_size": r["world_size"], "ratio": r["step_s_median"] / base["step_s_median"],
                        "ratio_vs_concurrent": vs_busy,
                        "stats_share_isolated": r["stats_share_isolated"],
                        "stats_share_in_step": r["stats_share_in_step"]})
    return out


def print_table(records: list[dict], scaling: list[dict]) -> None:
    print(f"{'model':6s} {'quantizer':9s} {'K':>6s} {'R':>2s} {'P':>2s} {'B/rank':>6s} {'step ms':>8s} "
          f"{'img/s':>7s} "
          f"{'stats KiB':>9s} {'red ms (step)':>13s} {'red ms (iso)':>12s} {'share':>6s} {'grad MiB':>8s} "
          f"{'grad red ms':>11s}")
    for r in records:
        print(f"{r['model']:6s} {r['quantizer']:9s} {r['num_codes']:6d} {r['world_size']:2d} "
              f"{r['concurrent_processes']:2d} {r['batch']:6d} "
              f"{1e3 * r['step_s_median']:8.1f} {r['samples_per_s']:7.1f} {r['stats_bytes'] / 1024:9.1f} "
              f"{1e3 * r['stats_reduce_s_in_step']:13.2f} {1e3 * r['stats_reduce_s_isolated']:12.2f} "
              f"{r['stats_share_isolated']:6.2%} {r['grad_bytes'] / 2**20:8.1f} "
              f"{1e3 * r['grad_reduce_s_isolated']:11.1f}")
    for s in scaling:
        vs_busy = "" if s["ratio_vs_concurrent"] is None else \
            f" ({s['ratio_vs_concurrent']:.2f} vs {s['world_size']} independent processes at once)"
        print(f"weak scaling {s['model']} {s['quantizer']} K={s['num_codes']}: {s['world_size']}-rank / "
              f"1-rank step time = {s['ratio']:.2f}{vs_busy}; statistics reduction "
              f"{s['stats_share_isolated']:.2%} of the step (isolated), {s['stats_share_in_step']:.2%} "
              f"(in step, with waiting)")


def scaling_rows(num_codes_list=(1024, 16384, 65536), dims=(8, 256), ranks=(8, 64, 512)) -> dict:
    """Bytes all-reduced per step: codebook statistics vs gradients (ring all-reduce), real models."""
    stats = [{"K": k, "D": d, "vq_ema_bytes": 4 * stats_numel("vq_ema", k, d),
              "ba_vq_bytes": 4 * stats_numel("ba_vq", k, d)} for k in num_codes_list for d in dims]
    from bavq.models import build_discriminator, build_model
    from bavq.quantizers import build_quantizer

    models = {"vqvae (CIFAR, base 64, [1,2], D=8)": ("vqvae", []),
              "vqgan f16 (taming widths, D=8) + PatchGAN": ("vqgan", [
                  "model.base_channels=128", "model.channel_mult=[1,1,2,2,4]", "model.num_res_blocks=2",
                  "model.attn_resolutions=[16]", "data.image_size=256", "model.disc_channels=64",
                  "loss.disc_weight=0.5"])}
    grads = []
    for label, (arch, extra) in models.items():
        cfg = make_config(arch, "ba_vq", 16384, 8, extra)
        model = build_model(cfg.model, cfg.quantizer, build_quantizer(cfg.quantizer), image_size=cfg.data.image_size)
        disc = build_discriminator(cfg.model, cfg.loss)
        params = sum(p.numel() for p in model.parameters())
        disc_params = sum(p.numel() for p in disc.parameters()) if disc is not None else 0
        grads.append({"model": label, "params": params, "disc_params": disc_params,
                      "grad_bytes": 4 * (params + disc_params)})
    ring = {r: 2 * (r - 1) / r for r in ranks}
    return {"stats": stats, "grads": grads, "ring_factor": ring}


def print_scaling_markdown(table: dict) -> None:
    """The bytes-per-step comparison as Markdown (pasted into .notes/perf_results.md)."""
    print("| K | D | VQ-EMA statistics, bytes | BA-VQ statistics, bytes |\n|---:|---:|---:|---:|")
    for s in table["stats"]:
        print(f"| {s['K']} | {s['D']} | {s['vq_ema_bytes']:,} ({s['vq_ema_bytes'] / 2**10:,.1f} KiB) | "
              f"{s['ba_vq_bytes']:,} ({s['ba_vq_bytes'] / 2**10:,.1f} KiB) |")
    ranks = list(table["ring_factor"])
    print("\n| model | parameters (gen + disc) | gradient buffer | "
          + " | ".join(f"ring traffic / rank, R={r}" for r in ranks) + " |")
    print("|---|---:|---:|" + "---:|" * len(ranks))
    for g in table["grads"]:
        mib = g["grad_bytes"] / 2**20
        cells = " | ".join(f"{mib * table['ring_factor'][r]:,.1f} MiB" for r in ranks)
        print(f"| {g['model']} | {g['params']:,} + {g['disc_params']:,} | {mib:,.1f} MiB | {cells} |")
    k16 = next(s for s in table["stats"] if s["K"] == 16384 and s["D"] == 8)
    cells = " | ".join(f"{k16['ba_vq_bytes'] / 2**10 * table['ring_factor'][r]:,.1f} KiB" for r in ranks)
    print(f"| BA-VQ statistics, K=16384, D=8 | - | {k16['ba_vq_bytes'] / 2**10:,.1f} KiB | {cells} |")


def plan(quick: bool, dry_run: bool, models: list[str], quantizers: list[str], codes: list[int],
         code_dim: int) -> list[dict]:
    """The cases to run (per-rank batch from MODELS; a dry run uses tiny codebooks and batches)."""
    cases = []
    for model in models:
        batch = 2 if dry_run else MODELS[model]["batch"][0 if quick else 1]
        for quantizer in quantizers:
            for num_codes in ([64] if dry_run else codes):
                cases.append({"model": model, "quantizer": quantizer, "num_codes": num_codes,
                              "code_dim": code_dim, "batch": batch})
    return cases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI-sized batches and few steps")
    p.add_argument("--dry-run", action="store_true", help="tiny codebooks, 1 step: checks the code paths")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--quantizers", nargs="+", default=["vq_ema", "ba_vq"], choices=["vq_ema", "ba_vq"])
    p.add_argument("--num-codes", type=int, nargs="+", default=[1024, 16384], help="codebook sizes K")
    p.add_argument("--code-dim", type=int, default=8, help="code dimension D")
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2], help="process counts (gloo, CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (same for every R)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2, quick 1, dry run 0)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10, quick 4)")
    p.add_argument("--no-concurrent-baseline", dest="concurrent_baseline", action="store_false",
                   help="skip timing R independent single processes at once (the machine-sharing baseline)")
    p.add_argument("--json", type=Path, default=None, help="write the records here")
    p.add_argument("--scaling", action="store_true", help="only print the bytes-per-step table (Markdown)")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.scaling:
        table = scaling_rows()
        print_scaling_markdown(table)
        if args.json:
            args.json.write_text(json.dumps(table, indent=2))
        return 0
    warmup = args.warmup if args.warmup is not None else (0 if args.dry_run else 1 if args.quick else 2)
    steps = args.steps if args.steps is not None else (1 if args.dry_run else 4 if args.quick else 10)
    opts = {"warmup": warmup, "steps": steps, "threads": args.threads,
            "reduce_repeats": 3 if args.dry_run else 10}
    cases = plan(args.quick, args.dry_run, args.models, args.quantizers, args.num_codes, args.code_dim)
    records = []
    for world in args.world_sizes:
        if world == 1:  # the trainer's single-process mode: no process group, no DDP
            previous = torch.get_num_threads()
            torch.set_num_threads(args.threads)
            try:
                records += [{**run_case(case, opts), "concurrent_processes": 1} for case in cases]
            finally:
                torch.set_num_threads(previous)
            continue
        records += run_distributed(cases, {**opts, "concurrent_baseline": args.concurrent_baseline}, world)
    scaling = weak_scaling(records)
    print_table(records, scaling)
    report = {"command": " ".join(["python", "benchmarks/bench_step.py", *argv]), "torch": torch.__version__,
              "cpu_count": os.cpu_count(), "options": opts, "records": records, "weak_scaling": scaling}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
