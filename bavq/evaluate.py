"""``bavq-eval`` (also ``torchrun --nproc_per_node N -m bavq.evaluate``): evaluate a run, checkpoint or
weights file on a whole held-out split (every sample once over all ranks) and write eval_metrics.json
and the code histogram. The metric loop itself is the library's (bavq.evaluation)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np

from bavq import dist
from bavq.backend import plain_accelerator
from bavq.cli import OneLineParser, fail
from bavq.config import ConfigError
from bavq.data import build_eval_loader
from bavq.evaluation import evaluate_model
from bavq.progress import track
from bavq.tokenizer import Tokenizer


def build_parser(prog: str = "bavq-eval") -> OneLineParser:
    p = OneLineParser(prog=prog, description="Evaluate a run or checkpoint on a whole held-out split "
                      "(every sample once over all ranks; launch with accelerate/torchrun for several).")
    p.add_argument("checkpoint", help="run folder (final_model.safetensors), checkpoint folder, or weights file")
    p.add_argument("--config", help="config YAML (default: config.yaml beside the weights)")
    p.add_argument("--out", help="output JSON (default: CHECKPOINT/eval_metrics.json)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="e.g. data.source=shards data.val_shards=... eval.inception_weights=...")
    return p


def main(argv: list[str] | None = None, prog: str = "bavq-eval") -> int:
    """``bavq-eval``: metrics of a run's or checkpoint's generator on the whole held-out split."""
    args = build_parser(prog).parse_intermixed_args(argv)
    try:
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
    cfg = tokenizer.config
    accelerator = plain_accelerator(cfg, str(work_dir))
    model = tokenizer.to(accelerator.device).model
    loader = build_eval_loader(cfg.data, accelerator.process_index, accelerator.num_processes,
                               batch_size=cfg.eval.batch_size)
    show = functools.partial(track, desc="bavq-eval", unit="batch", enabled=accelerator.is_main_process)
    result = evaluate_model(model, loader, cfg, accelerator.device, progress=show)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    return {**result.summary(), "world_size": accelerator.num_processes, "quantizer": cfg.quantizer.name,
            "num_codes": cfg.quantizer.num_codes, "_histogram": result.histogram}


if __name__ == "__main__":
    sys.exit(main(prog="python -m bavq.evaluate"))
