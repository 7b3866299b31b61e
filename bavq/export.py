"""``bavq-export`` (also ``python -m bavq.export CHECKPOINT --out DIR``): a run's or checkpoint's generator
as a tokenizer folder."""

from __future__ import annotations

import sys
from pathlib import Path

from bavq.cli import OneLineParser, fail
from bavq.config import ConfigError
from bavq.tokenizer import Tokenizer


def main(argv: list[str] | None = None, prog: str = "bavq-export") -> int:
    """A tokenizer folder (model.safetensors, config.yaml, tokenizer.json) from a run or checkpoint,
    loadable by ``bavq.Tokenizer.from_pretrained``; DeepSpeed ZeRO shards are merged by DeepSpeed's own
    zero_to_fp32."""
    p = OneLineParser(prog=prog, description="Write a run's or checkpoint's generator as a tokenizer folder "
                      "(fp32 model.safetensors + config.yaml), loadable by bavq.Tokenizer.from_pretrained.")
    p.add_argument("checkpoint", help="run folder, checkpoint folder (RUN/checkpoints/step_XXXXXXXX) or weights file")
    p.add_argument("--out", help="output folder (default: CHECKPOINT/tokenizer)")
    p.add_argument("--config", help="config YAML (default: config.yaml beside the weights)")
    args = p.parse_args(argv)
    if args.out and args.out.endswith(".safetensors"):
        return fail(prog, f"--out is a folder (model.safetensors and config.yaml go inside), got '{args.out}'")
    try:
        tokenizer = Tokenizer.from_pretrained(args.checkpoint, config=args.config)
        out = tokenizer.save_pretrained(Path(args.out) if args.out else tokenizer.source_dir / "tokenizer")
    except (ConfigError, FileNotFoundError) as exc:
        return fail(prog, str(exc).splitlines()[0])
    print(f"wrote {out} ({tokenizer!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m bavq.export"))
