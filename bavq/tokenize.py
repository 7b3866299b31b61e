"""``bavq-tokenize``: image shards (or a data split the config knows) -> token shards for a stage-2 model.

    bavq-tokenize experiments/vqgan_ba --shards '/shards/imagenet/train-{000000..001281}.tar' --out /tokens/in1k
    torchrun --standalone --nproc_per_node 8 -m bavq.tokenize experiments/vqgan_ba --split train --out /tokens/train

Every input shard (or, for a map-style source such as CIFAR-10 or an image folder, every fixed range
of ``--samples_per_shard`` items) is one *unit* and becomes one output tar of the same name. Unit j
belongs to rank j mod W, the rank split of bavq.data's evaluation reader, so every sample is written
exactly once whatever the number of ranks. A unit is written to a temporary name, renamed into
place, then recorded in ``OUT/.bavq-tokenize/NAME.json``; a rerun skips recorded units (resume after
preemption, also with another number of ranks) and writes a unit that was cut short again from its
start, so no sample is ever duplicated. Output samples keep the source's ``__key__`` and ``cls`` and
hold the code grid as ``npy`` ((h, w), int16 when K <= 32,767, else int32); images go through the
evaluation transform of the tokenizer's config (shorter side to ``data.image_size``, centre crop).
Rank 0 writes ``sizes.json`` and ``manifest.json`` once every unit is recorded.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bavq import __version__, dist
from bavq.backend import plain_accelerator
from bavq.cli import OneLineParser
from bavq.config import ConfigError
from bavq.data.shard_files import expand_urls, read_sizes, tar_writer
from bavq.data.shards import ErrorCounter, ReadShards, sample_image_bytes, split_by_rank
from bavq.data.sources import decode_image
from bavq.data.transforms import eval_transform
from bavq.exitstatus import EXIT_USAGE
from bavq.paths import check_resume_plan, completed_record, write_json
from bavq.progress import progress as make_progress
from bavq.tokenizer import Tokenizer

PROG = "bavq-tokenize"
STATE_DIR = ".bavq-tokenize"
MAX_BAD_LISTED = 100


@dataclass(frozen=True)
class Unit:
    """One output shard: an input shard URL, or items [start, stop) of a map-style split."""

    name: str  # output file name, e.g. "train-000003.tar"
    url: str = ""
    start: int = 0
    stop: int = 0


# ----------------------------------------------------------------------------- planning the units
def shard_units(spec: str) -> list[Unit]:
    """One unit per shard of a brace pattern (or of a folder's ``*.tar``); local shards must exist."""
    if Path(spec).is_dir():
        urls = sorted(str(p) for p in Path(spec).glob("*.tar"))
        if not urls:
            raise ConfigError(f"--shards: no .tar shards in '{spec}'")
    else:
        urls = expand_urls(spec)
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
    if missing:
        raise ConfigError(f"--shards: {len(missing)} of {len(urls)} shards do not exist (first: {missing[0]})")
    names = [os.path.basename(u.split("::")[0]) for u in urls]
    if len(set(names)) != len(names):
        raise ConfigError("--shards: two input shards share a file name; tokenize them into separate --out folders")
    return [Unit(name if name.endswith(".tar") else f"{name}.tar", url=u) for name, u in zip(names, urls)]


def split_units(cfg, split: str, samples_per_shard: int):
    """(units, the map-style split) of the config's ``split``; shards sources give their shard units."""
    if cfg.data.source == "shards":
        spec = cfg.data.train_shards if split == "train" else cfg.data.val_shards
        if not spec:
            raise ConfigError(f"config key 'data.{split}_shards': empty; set it or pass --shards")
        return shard_units(spec), None
    from bavq.data.sources import load_map_splits

    train, val = load_map_splits(cfg.data)
    items = train if split == "train" else val
    n = len(items)
    return [Unit(f"{split}-{i // samples_per_shard:06d}.tar", start=i, stop=min(i + samples_per_shard, n))
            for i in range(0, n, samples_per_shard)], items


# ----------------------------------------------------------------------------- reading (in DataLoader workers)
def _decode_sample(sample: dict):
    return decode_image(sample_image_bytes(sample))


class UnitReader(IterableDataset):
    """This rank's units, split over DataLoader workers. Yields (unit name, batch, end) where batch is
    (keys, classes, images (B, C, H, W) in [-1, 1]) or None, and ``end`` is None inside a unit and the
    unit's {"bad": [...], "read_errors": n} after its last batch."""

    def __init__(self, units: list[Unit], split, transform, batch_size: int):
        self.units, self.split, self.transform, self.batch_size = units, split, transform, batch_size

    def samples(self, unit: Unit, errors: ErrorCounter) -> Iterator[tuple[str, bytes | None, Callable]]:
        if unit.url:
            for sample in ReadShards(errors).samples(unit.url):
                yield sample["__key__"], sample.get("cls"), partial(_decode_sample, sample)
        else:
            for i in range(unit.start, unit.stop):
                yield f"{self.split.indices[i]:09d}", None, partial(self.split.load, i)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for unit in self.units[worker::workers]:
            errors, bad, batch = ErrorCounter(), [], []
            for key, cls, load in self.samples(unit, errors):
                try:
                    batch.append((key, cls, self.transform(load())))
                except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data
                    bad.append({"key": key, "reason": (str(exc).splitlines() or [type(exc).__name__])[0][:200]})
                    continue
                if len(batch) == self.batch_size:
                    yield unit.name, _collate(batch), None
                    batch = []
            yield unit.name, _collate(batch) if batch else None, {"bad": bad, "read_errors": errors.count}


def _collate(batch: list) -> tuple[list[str], list, torch.Tensor]:
    return [b[0] for b in batch], [b[1] for b in batch], torch.stack([b[2] for b in batch])


# ----------------------------------------------------------------------------- writing
def token_dtype(num_codes: int):
    return np.int16 if num_codes <= np.iinfo(np.int16).max else np.int32


def _npy(grid: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, grid)
    return buffer.getvalue()


class UnitWriter:
    """One output tar, written under a temporary name and renamed into place by :meth:`finish`."""

    def __init__(self, out: Path, name: str):
        self.out, self.name, self.count = out, name, 0
        self.tmp = out / f".{name}.tmp"
        self.tar = tar_writer(self.tmp)

    def write(self, key: str, cls: bytes | None, grid: np.ndarray) -> None:
        sample = {"__key__": key, "npy": _npy(grid)}
        if cls is not None:
            sample["cls"] = cls
        self.tar.write(sample)
        self.count += 1

    def finish(self, end: dict) -> dict:
        self.tar.close()
        os.replace(self.tmp, self.out / self.name)
        record = {"shard": self.name, "count": self.count, **end}
        write_json(self.out / STATE_DIR / f"{self.name}.json", record)  # recorded = complete
        return record


def _record(out: Path, name: str) -> dict | None:
    return completed_record(out, STATE_DIR, name)


def tokenize_units(tokenizer: Tokenizer, reader: UnitReader, out: Path, workers: int, progress) -> int:
    """Encode and write this rank's pending units; returns the samples written."""
    dtype, writers, written = token_dtype(tokenizer.num_codes), {}, 0
    loader = DataLoader(reader, batch_size=None, num_workers=min(workers, len(reader.units)))
    for name, batch, end in loader:
        writer = writers.get(name) or writers.setdefault(name, UnitWriter(out, name))
        if batch is not None:
            keys, classes, images = batch
            grids = tokenizer.encode(images).cpu().numpy().astype(dtype)
            for key, cls, grid in zip(keys, classes, grids):
                writer.write(key, cls, grid)
            written += len(keys)
            progress.update(len(keys))
        if end is not None:
            writers.pop(name).finish(end)
    return written


# ----------------------------------------------------------------------------- a whole run
def weights_digest(tokenizer: Tokenizer) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(tokenizer.model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_resume(out: Path, plan: dict) -> None:
    """Refuse an output folder that holds tokens of another tokenizer, input or image size."""
    check_resume_plan(out, out / STATE_DIR / "plan.json", plan, "tokens", "--out", write=dist.get_rank() == 0)


def finish(out: Path, units: list[Unit], tokenizer: Tokenizer, args, plan: dict) -> dict:
    """sizes.json and manifest.json from the records of every unit (rank 0, after every rank is done)."""
    records = {u.name: _record(out, u.name) for u in units}
    missing = [name for name, r in records.items() if r is None]
    if missing:
        raise RuntimeError(f"{len(missing)} units have no record after every rank finished (first: {missing[0]})")
    bad = [dict(b, shard=name) for name, r in records.items() for b in r["bad"]]
    write_json(out / "sizes.json", {name: r["count"] for name, r in records.items()})
    size = tokenizer.config.data.image_size
    manifest = {
        "bavq_version": __version__, "command": " ".join([PROG] + args.argv),
        "tokenizer": plan["tokenizer"], "weights_sha256": plan["weights_sha256"], "input": plan["input"],
        "num_codes": tokenizer.num_codes, "grid_shape": list(tokenizer.grid_shape(size)), "image_size": size,
        "downsample": tokenizer.downsample, "dtype": np.dtype(token_dtype(tokenizer.num_codes)).name,
        "fields": {"__key__": "the source sample's key", "cls": "the source's class label (when it has one)",
                   "npy": "code grid (h, w)"},
        "shards": len(units), "count": sum(r["count"] for r in records.values()),
        "bad_count": len(bad), "bad": bad[:MAX_BAD_LISTED],
        "read_errors": sum(r["read_errors"] for r in records.values()),
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="Encode images into token shards (WebDataset tars of code grids) "
                      "with a trained tokenizer; launch with torchrun for several processes.")
    p.add_argument("tokenizer", help="run folder, checkpoint folder or exported tokenizer folder")
    p.add_argument("--out", required=True, help="output folder (token tars, sizes.json, manifest.json)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", help="image shards: brace pattern or folder of .tar (e.g. from bavq-prep)")
    source.add_argument("--split", choices=("train", "val"), help="a split of the config's data source")
    p.add_argument("--batch_size", type=int, default=64, help="images per encoder call")
    p.add_argument("--samples_per_shard", type=int, default=1000, help="--split of a map-style source: items "
                   "per output shard")
    p.add_argument("--workers", type=int, default=2, help="decoding DataLoader workers per rank")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress on rank 0 (tqdm on a terminal, a line every 30 s otherwise)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. data.root=...")
    return p


def run(args) -> int:
    """Plan, tokenize this rank's pending units, and (rank 0) write sizes.json and manifest.json."""
    for flag in ("batch_size", "samples_per_shard"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be >= 1")
    if args.workers < 0:
        raise ConfigError("--workers must be >= 0")
    tokenizer = Tokenizer.from_pretrained(args.tokenizer, overrides=list(args.overrides)
                                          + ["log.wandb=false", "log.tensorboard=false"])
    if args.shards:
        units, split = shard_units(args.shards), None
    else:
        units, split = split_units(tokenizer.config, args.split, args.samples_per_shard)
    out = Path(args.out)
    plan = {"tokenizer": str(Path(args.tokenizer).resolve()), "weights_sha256": weights_digest(tokenizer),
            "input": _describe_input(args.shards) if args.shards else f"{tokenizer.config.data.source}:{args.split}",
            "image_size": tokenizer.config.data.image_size, "units": [u.name for u in units]}
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    check_resume(out, plan)

    accelerator = plain_accelerator(tokenizer.config, str(out / STATE_DIR))
    rank, world = accelerator.process_index, accelerator.num_processes
    tokenizer.to(accelerator.device)
    mine = list(split_by_rank(units, rank, world))
    pending = [u for u in mine if _record(out, u.name) is None]
    total = _pending_samples(pending, out)
    progress = make_progress(total=total, desc=f"{PROG} (rank 0)", unit="img", enabled=args.progress and rank == 0,
                             unit_scale=True)
    start = time.time()
    reader = UnitReader(pending, split, eval_transform(tokenizer.config.data), args.batch_size)
    written = tokenize_units(tokenizer, reader, out, args.workers, progress)
    progress.close()
    if rank == 0:
        print(f"{PROG}: rank 0 wrote {written} samples in {len(pending)} shards ({len(mine) - len(pending)} kept "
              f"from earlier runs) at {written / max(time.time() - start, 1e-9):.0f} img/s", file=sys.stderr)
    accelerator.wait_for_everyone()
    if rank == 0:
        manifest = finish(out, units, tokenizer, args, plan)
        print(f"{PROG}: {manifest['count']} samples in {len(units)} shards, grid {manifest['grid_shape']} "
              f"{manifest['dtype']}, {manifest['bad_count']} bad skipped -> {out}", file=sys.stderr)
    dist.shutdown()
    return 0


def _describe_input(spec: str) -> str:
    return str(Path(spec).resolve()) if Path(spec).is_dir() else spec


def _pending_samples(units: list[Unit], out: Path) -> int | None:
    """Samples of ``units`` when known (map ranges; shards listed in a sizes.json beside them)."""
    ranges = sum(u.stop - u.start for u in units if not u.url)
    urls = [u.url for u in units if u.url]
    sizes = read_sizes(urls) if urls else {}
    return None if sizes is None else ranges + sum(sizes.values())


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bavq-tokenize``; user mistakes end with one line on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_intermixed_args(argv)
    except SystemExit as exc:  # the parser already printed its one line (or --help)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    args.argv = argv
    try:
        return run(args)
    except ConfigError as exc:
        if dist.launcher_rank() == 0:  # every rank checks the same inputs and fails alike; say it once
            print(f"{PROG}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
