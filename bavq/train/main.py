"""``bavq-train`` (also ``python -m bavq.train`` and ``accelerate launch -m bavq.train``): the entry point
is a short story: parse, load config, train, report, and leave one exit code for the scheduler."""

from __future__ import annotations

import sys
import traceback

from bavq import dist
from bavq.cli import OneLineParser, fail
from bavq.config import QUANTIZERS, ConfigError, load_config
from bavq.exitstatus import EXIT_CRASH, EXIT_PREEMPTED, write_exit_status
from bavq.train.watchdog import Watchdog


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


def main(argv: list[str] | None = None, prog: str = "bavq-train") -> int:
    """``bavq-train``: load the config, train, print the final metrics; returns the exit code."""
    args = train_parser(prog).parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, _train_overrides(args))
    except ConfigError as exc:
        return _finish(fail(prog, str(exc)), str(exc), None, agreed=True)
    # imported after the config is read: a mistake in it is reported before Accelerate and the models load
    from bavq.backend import LaunchError
    from bavq.data.shards import DataStreamError
    from bavq.train.trainer import Preempted, Trainer

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
