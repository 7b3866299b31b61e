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
import random
import signal
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from bavq import __version__
from bavq.config import ConfigError, DataConfig
from bavq.data import sources
from bavq.data.transforms import EncodeOptions, encode_image
from bavq.paths import check_resume_plan, completed_record, write_json

MTIME = 946684800  # 2000-01-01T00:00:00Z: fixed member mtime so the same input gives the same tar bytes
STATE_DIR = ".bavq-prep"
MAX_BAD_LISTED = 100
Item = tuple  # (key "%09d", ref for the reader, label or None, origin shown in bad-image reports)


# ----------------------------------------------------------------------------- readers (in workers)
class FileReader:
    def __init__(self, root: Path):
        self.root = root

    def load(self, ref: str) -> bytes:
        return (self.root / ref).read_bytes()


class ArrayReader:
    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def load(self, ref: tuple[str, int]) -> np.ndarray:
        return self.arrays[ref[0]][ref[1]]


class HFReader:
    def __init__(self, datasets: dict[str, Any], image_key: str):
        self.datasets, self.image_key = datasets, image_key

    def load(self, ref) -> bytes:
        if isinstance(ref, tuple):  # (split, index) of a map-style dataset
            ref = self.datasets[ref[0]][ref[1]][self.image_key]
        return sources.hf_image_bytes(ref)  # streamed items carry their image cell


# ----------------------------------------------------------------------------- planning
@dataclass
class SourcePlan:
    """Items of every split, the reader that loads them, and what the manifest records."""

    kind: str
    input: str
    reader: Any
    splits: dict[str, list[Item] | Iterable[Item]]  # a list, or a stream (HF streaming)
    classes: list[str]


def _keyed(refs: list, start: int, origin, label=None) -> list[Item]:
    return [(f"{start + i:09d}", ref, label(ref) if label else None, origin(ref)) for i, ref in enumerate(refs)]


def _holdout(items: list[Item], fraction: float) -> dict[str, list[Item]]:
    if fraction <= 0:
        return {"train": items}
    train, val = sources.holdout_split(len(items), fraction)
    return {"train": [items[i] for i in train], "val": [items[i] for i in val]}


def plan_folder(args) -> SourcePlan:
    listing = sources.list_image_folder(args.input, images_only=False)
    root = listing.root.absolute()
    origin = lambda rel: str(root / rel)  # noqa: E731
    train = _keyed(listing.splits["train"], 0, origin, listing.label)
    if "val" in listing.splits:
        splits = {"train": train, "val": _keyed(listing.splits["val"], len(train), origin, listing.label)}
    else:
        splits = _holdout(train, args.val_fraction)
    return SourcePlan("image_folder", str(root), FileReader(root), splits, listing.classes)


def plan_arrays(args) -> SourcePlan:
    load = sources.load_fashion_mnist if args.source == "fashion_mnist" else sources.load_cifar10
    arrays = load(args.input or "", args.download, root_hint="--input FOLDER")
    if args.source == "fashion_mnist":  # 28 -> 32 with background, exactly as the map-style reader does
        arrays = {k: np.pad(v, ((0, 0), (2, 2), (2, 2))) for k, v in arrays.items()}
    splits, start = {}, 0
    for split, array in arrays.items():
        refs = [(split, i) for i in range(len(array))]
        splits[split] = _keyed(refs, start, lambda ref: f"{args.source}:{ref[0]}[{ref[1]}]")
        start += len(refs)
    return SourcePlan(args.source, args.input or "default", ArrayReader(arrays), splits, [])


def _hf_labels(dataset) -> tuple[str | None, list[str]]:
    for column in ("label", "labels"):
        feature = dataset.features.get(column) if dataset.features else None
        if feature is not None and hasattr(feature, "names"):
            return column, list(feature.names)
    return None, []


def _hf_stream(datasets: dict[str, Any], image_key: str, label_column: str | None) -> dict[str, Iterable[Item]]:
    offset = [0]  # held-out keys continue after the training items, counted while streaming

    def items(split, dataset):
        for i, row in enumerate(dataset):
            if image_key not in row:
                raise ConfigError(f"HF dataset rows have no column '{image_key}' (columns: {sorted(row)}); "
                                  "set --image_key")
            yield (f"{offset[0]:09d}", row[image_key], row.get(label_column) if label_column else None,
                   f"{split}[{i}]")
            offset[0] += 1
    return {split: items(split, ds) for split, ds in datasets.items()}


def plan_hf(args) -> SourcePlan:
    if args.streaming is None:  # hub datasets stream (no full download first) unless a random split is asked
        args.streaming = not Path(args.input).is_dir() and not args.val_fraction
    loaded = sources.load_hf(args.input, args.image_key, streaming=args.streaming)
    datasets = {k: v for k, v in loaded.items() if v is not None}
    label_column, classes = _hf_labels(datasets["train"])
    if args.streaming:
        if args.val_fraction and "val" not in datasets:
            raise ConfigError("--val_fraction needs random access; drop --streaming or use a dataset with a "
                              "validation split")
        if args.val_fraction is None and "val" not in datasets:
            print("bavq-prep: note: a streamed dataset without a validation split gets no held-out shards; "
                  f"--no-streaming --val_fraction {DataConfig.val_fraction} makes one", file=sys.stderr)
        args.val_fraction = args.val_fraction or 0.0
        return SourcePlan("hf", args.input, HFReader({}, args.image_key),
                          _hf_stream(datasets, args.image_key, label_column), classes)
    splits, start = {}, 0
    for split, dataset in datasets.items():
        labels = dataset[label_column] if label_column else None
        refs = [(split, i) for i in range(len(dataset))]
        splits[split] = _keyed(refs, start, lambda ref: f"{args.input}:{ref[0]}[{ref[1]}]",
                               (lambda ref: labels[ref[1]]) if labels is not None else None)
        start += len(refs)
    if "val" not in datasets:
        splits = _holdout(splits["train"], args.val_fraction)
    return SourcePlan("hf", args.input, HFReader(datasets, args.image_key), splits, classes)


def plan_source(args) -> SourcePlan:
    """Plan the source; missing or empty sources raise ConfigError (exit code 2)."""
    if args.source in ("image_folder", "hf") and not args.input:
        raise ConfigError(f"--source {args.source} needs --input (a folder or a dataset name)")
    if args.val_fraction is None and args.source != "hf":  # hf decides once it knows whether it streams
        args.val_fraction = DataConfig.val_fraction
    plan = {"image_folder": plan_folder, "hf": plan_hf}.get(args.source, plan_arrays)(args)
    wanted = args.splits.split(",") if args.splits else list(plan.splits)
    unknown = [s for s in wanted if s not in plan.splits]
    if unknown:
        raise ConfigError(f"split(s) {unknown} not in the source (it has {list(plan.splits)})")
    plan.splits = {s: plan.splits[s] for s in wanted}
    if args.shuffle and isinstance(plan.splits.get("train"), list):
        random.Random(args.seed).shuffle(plan.splits["train"])  # shards should not each hold one class
    if all(isinstance(v, list) and not v for v in plan.splits.values()):
        raise ConfigError(f"source '{plan.input}' is empty")
    return plan


# ----------------------------------------------------------------------------- writing one shard
_WORKER: dict[str, Any] = {}


def _quiet_worker() -> None:
    """Workers leave interrupts to the parent: Ctrl-C (sent to the whole process group) is ignored
    here, and SIGTERM kills silently (a forked worker would otherwise inherit the parent's handler)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _init_worker(reader, opts: EncodeOptions, output: str, quiet: bool = False) -> None:
    if quiet:
        _quiet_worker()
    _WORKER.update(reader=reader, opts=opts, output=Path(output))


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def write_shard(task: tuple[str, int, list[Item]]) -> dict:
    """Encode and write one shard (temp file, then rename), then its bookkeeping record."""
    import webdataset as wds

    split, index, items = task
    reader, opts, output = _WORKER["reader"], _WORKER["opts"], _WORKER["output"]
    final = output / shard_name(split, index)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    count, bad = 0, []
    try:
        with open(tmp, "wb") as fh, wds.TarWriter(fh, encoder=False, mtime=MTIME, user="bavq", group="bavq") as tar:
            for key, ref, label, origin in items:
                try:
                    data, ext = encode_image(reader.load(ref), opts)
                except Exception as exc:  # noqa: BLE001 - unreadable, truncated, not an image: skip and count
                    bad.append({"path": origin, "reason": (str(exc).splitlines() or [type(exc).__name__])[0][:200]})
                    continue
                sample = {"__key__": key, ext: data}
                if label is not None:
                    sample["cls"] = str(int(label)).encode()
                tar.write(sample)
                count += 1
    except BaseException:  # interrupted (or failed) mid-shard: no stray temp file; a rerun rewrites it
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)
    record = {"shard": final.name, "split": split, "count": count, "planned": len(items), "bad": bad}
    write_json(output / STATE_DIR / f"{final.name}.json", record)
    return record


def _run_tasks(tasks: Iterator, workers: int, init_args: tuple) -> Iterator[dict]:
    """Results of ``write_shard`` over tasks, with at most 2 x workers shards in flight (streams stay lazy)."""
    if workers <= 0:
        _init_worker(*init_args)
        yield from map(write_shard, tasks)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"  # fork: arrays are not copied
    with mp.get_context(method).Pool(workers, _init_worker, (*init_args, True)) as pool:
        pending: deque = deque()  # (shard name, result)
        try:
            for task in tasks:
                pending.append((shard_name(task[0], task[1]), pool.apply_async(write_shard, (task,))))
                while len(pending) >= 2 * workers:
                    yield _next_done(pending)
            while pending:
                yield _next_done(pending)
        except BaseException:  # interrupted: stop the workers, drop their half-written temp files
            pool.terminate()
            pool.join()
            for name, _ in pending:
                for tmp in Path(init_args[2]).glob(f".{name}.*.tmp"):
                    tmp.unlink(missing_ok=True)
            raise


def _next_done(pending: deque) -> dict:
    record = pending[0][1].get()  # stays pending (its temp file is cleaned up) if interrupted here
    pending.popleft()
    return record


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
    from bavq.progress import progress

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
        for record in _run_tasks(iter(tasks), args.workers, (plan.reader, _encode_options(args), str(output))):
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
    from bavq.data.shards import expand_urls

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
    from bavq.data.shards import read_sizes, verify_shard

    urls = _verify_urls(args.shards)
    sizes = read_sizes(urls)
    with contextlib.ExitStack() as stack, _progress(len(urls), args.progress, "bavq-prep verify", "shard") as bar:
        pool = stack.enter_context(mp.get_context("spawn").Pool(args.workers, _quiet_worker)) \
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
