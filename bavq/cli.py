"""Command lines. Each entry point is a short story: parse, load config, run, report.

User mistakes (bad flags, config keys, missing data or weight files, a run folder in use) end with
one line on stderr and exit code 2; a preempted run exits with code 75 after saving, so SLURM can
requeue it; a crash exits with 1 after a traceback and one line naming the rank. The code also goes
to ``$BAVQ_EXIT_FILE`` (see bavq.train.exitstatus), because launchers report every failure as 1.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from bavq import dist
from bavq.config import QUANTIZERS, ConfigError, load_config
from bavq.train.exitstatus import EXIT_CRASH, EXIT_USAGE, write_exit_status


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports an error in one line (plus a hint) instead of usage + error."""

    def error(self, message: str):
        if dist.launcher_rank() == 0:
            write_exit_status(EXIT_USAGE, message)
        line = f"{self.prog}: error: {message} (see {self.prog} --help)\n"
        self.exit(EXIT_USAGE, line if dist.prints_user_errors() else None)


def fail(prog: str, message: str) -> int:
    """Report a user mistake in one line and return the exit code (2). Under a launcher every rank
    meets the same mistake: only local rank 0 prints. The launcher then adds its own traceback and
    exits 1 whatever the ranks' code (torchrun and every `accelerate launch` mode, measured); its log
    still names each rank's "exitcode: 2" (README, "Exit codes")."""
    if dist.prints_user_errors():
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def train_parser(prog: str = "bavq-train") -> OneLineParser:
    p = OneLineParser(prog=prog, description="Train a VQ tokenizer (VQ-EMA or BA-VQ). Launch with "
                      "`accelerate launch` or `torchrun` for several processes.")
    p.add_argument("--config", help="experiment YAML (configs/*.yaml); defaults are CIFAR-10 VQ-VAE")
    p.add_argument("--quantizer", choices=QUANTIZERS, help="quantizer.name")
    p.add_argument("--codebook_size", type=int, help="quantizer.num_codes (K)")
    p.add_argument("--epochs", type=float, help="train.epochs (ignored when train.max_steps > 0)")
    p.add_argument("--max_steps", type=int, help="train.max_steps")
    p.add_argument("--name", help="train.name: outputs go to experiments/NAME/")
    p.add_argument("--resume", help="train.resume: auto (default), none, or a checkpoint folder")
    p.add_argument("--no_wandb", action="store_true", help="log.wandb=false")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return p


def _train_overrides(args) -> list[str]:
    out = []
    mapping = {"quantizer": "quantizer.name", "codebook_size": "quantizer.num_codes", "epochs": "train.epochs",
               "max_steps": "train.max_steps", "name": "train.name", "resume": "train.resume"}
    for attr, key in mapping.items():
        value = getattr(args, attr)
        if value is not None:
            out.append(f"{key}={value}")
    if args.no_wandb:
        out.append("log.wandb=false")
    return out + list(args.overrides)


def train_main(argv: list[str] | None = None, prog: str = "bavq-train") -> int:
    args = train_parser(prog).parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, _train_overrides(args))
    except ConfigError as exc:
        return _finish(fail(prog, str(exc)), str(exc), None, agreed=True)
    from bavq.data.shards import DataStreamError
    from bavq.train.backend import LaunchError
    from bavq.train.trainer import EXIT_PREEMPTED, Preempted, Trainer

    trainer = None
    try:
        trainer = Trainer(cfg)
        final = trainer.fit()
    except (ConfigError, LaunchError, FileNotFoundError, DataStreamError) as exc:
        message = _one_line(exc)
        return _finish(fail(prog, message), message, trainer, agreed=False)
    except Preempted as exc:
        print(f"{prog}: {exc}; exiting with code {EXIT_PREEMPTED} so the job can be requeued", file=sys.stderr)
        return _finish(EXIT_PREEMPTED, str(exc), trainer, agreed=True)  # every rank agreed and saved
    except Exception as exc:  # noqa: BLE001 - a crash: keep the traceback, end with one line, tear down
        traceback.print_exc()
        message = _crash_line(exc, trainer)
        print(f"{prog}: error: {message}; exit code {EXIT_CRASH} (the SLURM script requeues it; the next launch "
              "resumes from the last complete checkpoint)", file=sys.stderr, flush=True)
        return _finish(EXIT_CRASH, message, trainer, agreed=False)
    if final is not None and trainer.accelerator.is_main_process:
        print(format_metrics_table(final, trainer.run_dir))
    return _finish(0, "finished" if final is not None else "stopped at train.stop_at_step", trainer, agreed=True)


def _one_line(exc: BaseException) -> str:
    """The first line; for an error re-raised from a DataLoader worker, the original message."""
    text = str(exc).strip()
    if "Original Traceback" in text:  # torch's ExceptionWrapper: the real message is the last line
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text.splitlines()[0] if text else type(exc).__name__


def _crash_line(exc: BaseException, trainer) -> str:
    """Name the rank that died when this one's collective failed because of it (heartbeats tell)."""
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    rank = dist.get_rank()
    from bavq.train.watchdog import Watchdog

    watchdog = getattr(trainer, "watchdog", None) or Watchdog.active
    dead = watchdog.silent_ranks() if watchdog is not None and isinstance(exc, RuntimeError) else []
    if dead:
        return (f"rank {', '.join(map(str, dead))} died (no heartbeat); rank {rank} stopped because a collective "
                f"failed: {type(exc).__name__}: {first}")
    return f"rank {rank} crashed: {type(exc).__name__}: {first}"


def _finish(code: int, reason: str, trainer, agreed: bool) -> int:
    """Every exit of a training process: stop the watchdog (a clean exit is not a death: only a
    crash leaves the heartbeat silent for the peers to notice), record the exit status for the
    scheduler (rank 0; any rank on a crash) and tear the process group down (after a barrier only
    when every rank takes the same exit; otherwise a rank would wait for peers that never come)."""
    from bavq.train.watchdog import Watchdog

    watchdog = getattr(trainer, "watchdog", None) or Watchdog.active  # also when Trainer() itself failed
    if watchdog is not None and code != EXIT_CRASH:
        watchdog.stop()
    if dist.launcher_rank() == 0 or code == EXIT_CRASH:
        write_exit_status(code, reason)
    dist.shutdown(wait=agreed)
    return code


def format_metrics_table(final: dict, run_dir) -> str:
    rows = [("quantizer", final["quantizer"]), ("K", final["num_codes"]),
            ("codebook usage", f"{final['codebook_usage']:.4f}"), ("perplexity", f"{final['perplexity']:.2f}"),
            ("normalized entropy", f"{final['normalized_entropy']:.4f}"), ("dead codes", final["dead_codes"]),
            ("PSNR (dB)", f"{final['psnr']:.2f}"), ("SSIM", f"{final['ssim']:.4f}"),
            ("rFID", _optional(final.get("rfid"), "{:.2f}", "no local Inception weights")),
            ("LPIPS", _optional(final.get("lpips"), "{:.4f}", "no local LPIPS weights")),
            ("steps", final["steps"]), ("samples seen", final["samples_seen"]),
            ("world size", final["world_size"]), ("wall seconds", final["wall_seconds"])]
    width = max(len(r[0]) for r in rows)
    lines = [f"final metrics ({run_dir}/final_metrics.json)"]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def _optional(value, fmt: str, missing: str) -> str:
    return fmt.format(value) if value is not None else f"null ({missing})"


def train_entry() -> None:
    sys.exit(train_main())


def eval_parser(prog: str = "bavq-eval") -> OneLineParser:
    p = OneLineParser(prog=prog, description="Evaluate a run or checkpoint on a whole held-out split "
                      "(every sample once over all ranks; launch with accelerate/torchrun for several).")
    p.add_argument("checkpoint", help="run folder (final_model.safetensors), checkpoint folder, or weights file")
    p.add_argument("--config", help="config YAML (default: config.yaml beside the weights)")
    p.add_argument("--out", help="output JSON (default: CHECKPOINT/eval_metrics.json)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="e.g. data.source=shards data.val_shards=... eval.inception_weights=...")
    return p


def eval_main(argv: list[str] | None = None, prog: str = "bavq-eval") -> int:
    args = eval_parser(prog).parse_intermixed_args(argv)
    import json
    from pathlib import Path

    import numpy as np

    try:
        from bavq.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(args.checkpoint, config=args.config, overrides=list(args.overrides)
                                              + ["log.wandb=false", "log.tensorboard=false"])
        out = Path(args.out) if args.out else tokenizer.source_dir / "eval_metrics.json"
        summary = _run_eval(tokenizer, out.parent)
    except (ConfigError, FileNotFoundError) as exc:
        code = fail(prog, str(exc).splitlines()[0])
        dist.shutdown(wait=False)  # never exit with a live process group (see dist.shutdown)
        return code
    if summary is not None:  # main process
        hist = summary.pop("_histogram")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2))
        np.save(out.with_suffix(".histogram.npy"), hist)
        print(json.dumps(summary, indent=2))
        print(f"wrote {out} and {out.with_suffix('.histogram.npy')}")
    dist.shutdown()
    return 0


def _run_eval(tokenizer, work_dir):
    """Evaluate the tokenizer's plain fp32 model on every rank; main gets the summary. Evaluation needs
    no DeepSpeed engine and no mixed-precision wrapper whatever trained the weights: the Accelerator
    here only joins the launcher's process group and picks the device."""
    import dataclasses
    import functools

    from bavq.data import build_eval_loader
    from bavq.evaluate import evaluate_model
    from bavq.train.backend import make_accelerator

    cfg = tokenizer.config
    plain = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, backend="ddp", mixed_precision="no"))
    accelerator = make_accelerator(plain, str(work_dir), None)
    model = tokenizer.to(accelerator.device).model
    loader = build_eval_loader(cfg.data, accelerator.process_index, accelerator.num_processes,
                               batch_size=cfg.eval.batch_size)
    from bavq.progress import track

    show = functools.partial(track, desc="bavq-eval", unit="batch", enabled=accelerator.is_main_process)
    result = evaluate_model(model, loader, cfg, accelerator.device, progress=show)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    return {**result.summary(), "world_size": accelerator.num_processes, "quantizer": cfg.quantizer.name,
            "num_codes": cfg.quantizer.num_codes, "_histogram": result.histogram}


def eval_entry() -> None:
    sys.exit(eval_main())


def export_main(argv: list[str] | None = None, prog: str = "bavq-export") -> int:
    """A tokenizer folder (model.safetensors, config.yaml, tokenizer.json) from a run or checkpoint,
    loadable by ``bavq.Tokenizer.from_pretrained``; DeepSpeed ZeRO shards are merged by DeepSpeed's own
    zero_to_fp32."""
    p = OneLineParser(prog=prog, description="Write a run's or checkpoint's generator as a tokenizer folder "
                      "(fp32 model.safetensors + config.yaml), loadable by bavq.Tokenizer.from_pretrained.")
    p.add_argument("checkpoint", help="run folder, checkpoint folder (RUN/checkpoints/step_XXXXXXXX) or weights file")
    p.add_argument("--out", help="output folder (default: CHECKPOINT/tokenizer)")
    p.add_argument("--config", help="config YAML (default: config.yaml beside the weights)")
    args = p.parse_args(argv)
    from pathlib import Path

    from bavq.tokenizer import Tokenizer

    if args.out and args.out.endswith(".safetensors"):
        return fail(prog, f"--out is a folder (model.safetensors and config.yaml go inside), got '{args.out}'")
    try:
        tokenizer = Tokenizer.from_pretrained(args.checkpoint, config=args.config)
        out = tokenizer.save_pretrained(Path(args.out) if args.out else tokenizer.source_dir / "tokenizer")
    except (ConfigError, FileNotFoundError) as exc:
        return fail(prog, str(exc).splitlines()[0])
    print(f"wrote {out} ({tokenizer!r})")
    return 0


def export_entry() -> None:
    sys.exit(export_main())
