"""``bavq-prep``: write WebDataset shards from an image source, and verify shards.

    bavq-prep [write] --source image_folder --input /data/imagenet --output /shards/imagenet --resize 256
    bavq-prep verify '/shards/imagenet/train-{000000..001281}.tar'

A run plans every split first (sorted listing or dataset order; the training split shuffled with
``--seed``), then cuts the plan into fixed ranges of ``--samples_per_shard`` items, so shard ``i``
always holds the same items whatever happens around it. That is what makes a run resumable
(finished shards are kept, a partial one is rewritten), splittable over SLURM array tasks
(``--part I --num_parts P``) and reproducible (sorted members, fixed mtime/owner: same input,
same bytes). Shards are ``OUTPUT/{split}-%06d.tar`` with samples ``{"__key__": "%09d", "<ext>": image,
"cls": label}`` where the key is the item's global position in the source (training items
first, then held-out). Unreadable images are skipped, counted and listed (first 100) in
``manifest.json``; ``sizes.json`` (open_clip's format) holds the samples of each shard.
Per-shard bookkeeping lives in ``OUTPUT/.bavq-prep/``.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator

from bavq import __version__
from bavq.config import ConfigError, DataConfig
from bavq.data.plans import Item, SourcePlan, plan_source
from bavq.data.shard_files import expand_urls, read_sizes, verify_shard
from bavq.data.transforms import EncodeOptions
from bavq.data.writer import quiet_worker, shard_name, write_shards
from bavq.paths import check_resume_plan, completed_record, write_json
from bavq.progress import progress

STATE_DIR = ".bavq-prep"
MAX_BAD_LISTED = 100


# ----------------------------------------------------------------------------- a whole run
def _record(output: Path, name: str) -> dict | None:
    """The bookkeeping record of a finished shard, or None when the shard must be (re)written."""
    return completed_record(output, STATE_DIR, name)


def _chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _TaskPlan:
    """Enumerates (split, shard, items) tasks, skipping finished shards and other parts' shards."""

    def __init__(self, plan: SourcePlan, args, output: Path):
        self.plan, self.args, self.output = plan, args, output
        self.shards: dict[str, list[str]] = {}  # split -> shard names, complete once iterated
        self.kept_items = 0

    def __iter__(self):
        number = 0
        for split, items in self.plan.splits.items():
            self.shards[split] = []
            for index, chunk in enumerate(_chunks(items, self.args.samples_per_shard)):
                name = shard_name(split, index)
                self.shards[split].append(name)
                number += 1
                if (number - 1) % self.args.num_parts != self.args.part:
                    continue
                if _record(self.output, name) is not None:
                    self.kept_items += len(chunk)
                    continue
                yield split, index, chunk


def _fingerprint(plan: SourcePlan, args) -> dict:
    counts = {s: len(v) if isinstance(v, list) else None for s, v in plan.splits.items()}
    return {"source": plan.kind, "input": plan.input, "counts": counts, "encode": asdict(_encode_options(args)),
            "samples_per_shard": args.samples_per_shard, "shuffle": args.shuffle, "seed": args.seed,
            "val_fraction": args.val_fraction}


def _check_resume(output: Path, fingerprint: dict) -> None:
    check_resume_plan(output, output / STATE_DIR / "plan.json", fingerprint, "shards", "--output")


def _encode_options(args) -> EncodeOptions:
    return EncodeOptions(args.resize, args.center_crop, args.format, args.quality)


def _finish(output: Path, shards: dict[str, list[str]], plan: SourcePlan, args, argv: list[str]) -> dict | None:
    """Write sizes.json and manifest.json once every shard of the plan exists; None if some are missing."""
    records = {name: _record(output, name) for names in shards.values() for name in names}
    if any(r is None for r in records.values()):
        return None
    bad = [dict(b, split=r["split"]) for r in records.values() for b in r["bad"]]
    splits = {}
    for split, names in shards.items():
        rs = [records[n] for n in names]
        pattern = f"{split}-{{000000..{len(names) - 1:06d}}}.tar" if len(names) > 1 else shard_name(split, 0)
        splits[split] = {"pattern": pattern, "shards": len(names), "count": sum(r["count"] for r in rs),
                         "planned": sum(r["planned"] for r in rs), "bad": sum(len(r["bad"]) for r in rs)}
    write_json(output / "sizes.json", {name: r["count"] for name, r in records.items()})
    manifest = {
        "bavq_version": __version__, "command": " ".join(["bavq-prep"] + argv),
        "source": {"kind": plan.kind, "input": plan.input, "streaming": bool(args.streaming)},
        "resize": {"shorter_side": args.resize or None, "center_crop": bool(args.resize and args.center_crop),
                   "policy": "original bytes kept when possible" if not args.resize else "resized",
                   "padding": "28x28 -> 32x32 with background" if plan.kind == "fashion_mnist" else None},
        "format": args.format, "quality": args.quality, "samples_per_shard": args.samples_per_shard,
        "shuffle_seed": args.seed if args.shuffle and not args.streaming else None,
        "key": "%09d global position in the source",
        "classes": plan.classes, "splits": splits,
        "count": sum(s["count"] for s in splits.values()), "bad_count": len(bad), "bad": bad[:MAX_BAD_LISTED],
    }
    write_json(output / "manifest.json", manifest)
    return manifest


def _progress(total: int | None, enabled: bool, desc: str = "bavq-prep", unit: str = "img"):
    return progress(total=total, desc=desc, unit=unit, enabled=enabled, unit_scale=True, smoothing=0.1)


def write_main(args, argv: list[str]) -> int:
    """The ``write`` subcommand. Returns the exit code."""
    plan = plan_source(args)
    output = Path(args.output)
    (output / STATE_DIR).mkdir(parents=True, exist_ok=True)
    _check_resume(output, _fingerprint(plan, args))
    tasks = _TaskPlan(plan, args, output)
    listed = [v for v in plan.splits.values() if isinstance(v, list)]
    known = len(listed) == len(plan.splits) and args.num_parts == 1
    total = sum(map(len, listed)) if known else None
    written, bad, start = 0, 0, time.time()
    with _progress(total, args.progress) as bar:
        for record in write_shards(iter(tasks), args.workers, plan.reader, _encode_options(args), str(output),
                                   STATE_DIR):
            written += record["count"]
            bad += len(record["bad"])
            if total is not None:
                bar.total = total - tasks.kept_items  # shards kept from an earlier run are not work
            bar.update(record["planned"])
            bar.set_postfix(bad=bad, kept=tasks.kept_items, refresh=False)
    rate = (written + bad) / max(time.time() - start, 1e-9)
    print(f"bavq-prep: wrote {written} images ({bad} bad skipped, {tasks.kept_items} kept from earlier runs) "
          f"at {rate:.0f} img/s to {output}", file=sys.stderr)
    manifest = _finish(output, tasks.shards, plan, args, argv)
    if manifest is None:
        print(f"bavq-prep: part {args.part}/{args.num_parts} done; sizes.json and manifest.json are written "
              "by the run that completes the last shard", file=sys.stderr)
        return 0
    if manifest["count"] == 0:
        print(f"bavq-prep: error: no readable image in '{plan.input}' ({manifest['bad_count']} bad)", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- verify
def _verify_urls(spec: str) -> list[str]:
    if Path(spec).is_dir():
        urls = sorted(str(p) for p in Path(spec).glob("*.tar"))
        if not urls:
            raise ConfigError(f"no .tar shards in '{spec}'")
        return urls
    urls = expand_urls(spec)
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
    if missing:
        raise ConfigError(f"{len(missing)} of {len(urls)} shards do not exist (first: {missing[0]})")
    return urls


def verify_main(args) -> int:
    """The ``verify`` subcommand: counts, corrupt members, mismatches with sizes.json. Exit 1 on problems."""
    urls = _verify_urls(args.shards)
    sizes = read_sizes(urls)
    with contextlib.ExitStack() as stack, _progress(len(urls), args.progress, "bavq-prep verify", "shard") as bar:
        pool = stack.enter_context(mp.get_context("spawn").Pool(args.workers, quiet_worker)) \
            if args.workers > 0 else None
        reports = []
        for report in (pool.imap(verify_shard, urls) if pool else map(verify_shard, urls)):
            reports.append(report)
            bar.update(1)
    problems = 0
    for report in reports:
        expected = sizes.get(report["url"]) if sizes else None
        notes = [f"{len(report['corrupt'])} corrupt"] if report["corrupt"] else []
        notes += [f"read error: {report['error']}"] if report["error"] else []
        notes += [f"sizes.json says {expected}"] if expected is not None and expected != report["samples"] else []
        if notes or args.verbose:
            print(f"{report['url']}: {report['samples']} samples" + (f"; {'; '.join(notes)}" if notes else ""))
            for line in report["corrupt"][:5]:
                print(f"  {line}")
        problems += bool(notes)
    total = sum(r["samples"] for r in reports)
    corrupt = sum(len(r["corrupt"]) for r in reports)
    size_note = "no sizes.json found" if sizes is None else f"sizes.json total {sum(sizes.values())}"
    print(f"{len(urls)} shards, {total} samples, {corrupt} corrupt members, {problems} shards with problems "
          f"({size_note})")
    return 1 if problems else 0


# ----------------------------------------------------------------------------- command line
class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after each option's help, except where the default is None or empty (the
    help then says what happens)."""

    def _get_help_string(self, action):
        if action.default is None or action.default == "":
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bavq-prep", description="Write or verify WebDataset shards.",
                                     formatter_class=_DefaultsFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write shards from a source (the default subcommand)",
                       formatter_class=_DefaultsFormatter)
    w.add_argument("--source", required=True, choices=("image_folder", "hf", "cifar10", "fashion_mnist"),
                   help="where the images come from")
    w.add_argument("--input", default="", help="image folder, HF load_from_disk folder or hub name, "
                   "or the CIFAR-10 / Fashion-MNIST folder (default for those: $BAVQ_DATA/SOURCE, "
                   "BAVQ_DATA defaulting to ~/.cache/bavq; Fashion-MNIST first tries Debian's files)")
    w.add_argument("--output", required=True, help="folder for {split}-%%06d.tar, sizes.json, manifest.json")
    w.add_argument("--samples_per_shard", type=int, default=1000, help="images per tar shard")
    w.add_argument("--resize", type=int, default=0, help="shorter side in pixels; 0 keeps originals")
    w.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True,
                   help="crop the centre square after --resize")
    w.add_argument("--format", default="keep", choices=("keep", "jpg", "png", "webp"),
                   help="image format in the shards; keep passes original bytes through when not resized")
    w.add_argument("--quality", type=int, default=95, help="jpg/webp quality")
    w.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="encoding processes (default: min(8, CPUs), here %(default)s)")
    w.add_argument("--val_fraction", type=float, default=None,
                   help=f"held-out fraction for sources without their own validation split (default: "
                   f"{DataConfig.val_fraction}, the trainer's data.val_fraction, giving the same split; "
                   "0 for a streamed HF dataset; 0 = no held-out shards)")
    w.add_argument("--splits", default="", help="comma-separated subset of the splits, e.g. train")
    w.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                   help="shuffle the training split before cutting shards (not for streamed datasets)")
    w.add_argument("--seed", type=int, default=0, help="seed of the training-split shuffle")
    w.add_argument("--image_key", default="image", help="HF: the image column")
    w.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                   help="HF: stream rows instead of loading the dataset (default: stream hub datasets)")
    w.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="CIFAR-10 / Fashion-MNIST: download when missing and online")
    w.add_argument("--part", type=int, default=0, help="this part (SLURM_ARRAY_TASK_ID) of --num_parts")
    w.add_argument("--num_parts", type=int, default=1, help="split the shards over this many runs")
    w.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress on stderr (a bar on a terminal, a line every 30 s in logs)")
    v = sub.add_parser("verify", help="re-read shards; report counts, corrupt members, sizes.json mismatches",
                       formatter_class=_DefaultsFormatter)
    v.add_argument("shards", help="a folder of .tar files or a brace pattern")
    v.add_argument("--workers", type=int, default=0, help="reading processes (0 = in this process)")
    v.add_argument("--verbose", action="store_true", help="one line per shard, not only problems")
    v.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress on stderr (a bar on a terminal, a line every 30 s in logs)")
    return parser


def _check_args(args) -> None:
    if args.command != "write":
        return
    checks = [(args.samples_per_shard >= 1, "--samples_per_shard must be >= 1"),
              (args.resize >= 0, "--resize must be >= 0"), (1 <= args.quality <= 100, "--quality must be in 1..100"),
              (args.workers >= 0, "--workers must be >= 0"),
              (args.val_fraction is None or 0 <= args.val_fraction < 1, "--val_fraction in [0, 1)"),
              (args.num_parts >= 1 and 0 <= args.part < args.num_parts, "--part must be in 0..num_parts-1")]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bavq-prep``; returns the exit code (2 for user errors, one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("write", "verify", "-h", "--help"):
        argv = ["write"] + argv
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage and the message
        return exc.code if isinstance(exc.code, int) else 2
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)  # SIGTERM ends like Ctrl-C
    try:
        _check_args(args)
        return write_main(args, argv) if args.command == "write" else verify_main(args)
    except ConfigError as exc:
        print(f"bavq-prep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        name = getattr(exc, "signal_name", "SIGINT")
        kept = "finished shards are kept; rerun the same command to continue" if args.command == "write" else ""
        print(f"bavq-prep: interrupted ({name}){'; ' + kept if kept else ''}", file=sys.stderr, flush=True)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)


class Interrupted(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (SLURM's scancel and `kill` send it)."""

    signum, signal_name = signal.SIGTERM, "SIGTERM"


def _raise_interrupted(signum, frame):
    raise Interrupted()
