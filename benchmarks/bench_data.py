"""Data throughput: shard writing, and shard reading vs torchvision ImageFolder on the same JPEGs.

    python benchmarks/bench_data.py [--images 2000] [--width 160 --height 120] [--image_size 64]

(a) ``bavq-prep write`` images/s (original bytes kept, and with --resize), with 0/1/2 worker processes.
(b) images/s of reading + decoding + augmenting (random-resized crop + flip to image_size, the
    trainer's transform) from the shards with the streaming reader, against torchvision
    ``ImageFolder`` + ``DataLoader`` over the same JPEG files with the same transform, with 0, 1, 2
    DataLoader workers, and their ratio. Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from bavq.config import load_config
from bavq.data import build_train_stream
from bavq.data.transforms import train_transform
from bavq.prep import main as prep_main


def make_jpegs(root: Path, count: int, width: int, height: int, classes: int = 10) -> None:
    """Smooth random images (photo-like JPEG sizes, unlike white noise) in class sub-folders."""
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        folder = root / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:06d}.jpg", quality=90)


def bench_write(src: Path, out: Path, workers: int, extra: list[str]) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    code = prep_main(["write", "--source", "image_folder", "--input", str(src), "--output", str(out),
                      "--samples_per_shard", "250", "--workers", str(workers), "--no-progress", *extra])
    elapsed = time.perf_counter() - start
    assert code == 0, f"bavq-prep failed with exit code {code}"
    return json.loads((out / "manifest.json").read_text())["count"] / elapsed


def _rate(batches, count: int, batch_size: int) -> float:
    iterator = iter(batches)
    next(iterator)  # start-up (worker spawn, first shard/file open) is not throughput
    start = time.perf_counter()
    for _ in islice(iterator, count):
        pass
    return count * batch_size / (time.perf_counter() - start)


def bench_shards(shards: Path, workers: int, args) -> float:
    cfg = load_config(None, ["train.max_steps=1", "data.source=shards",
                             f"data.train_shards={shards}/train-{{000000..{args.shards - 1:06d}}}.tar",
                             f"data.num_workers={workers}", f"train.batch_size={args.batch_size}",
                             f"data.image_size={args.image_size}", "data.random_flip=true",
                             "data.random_crop_scale=0.35", "data.shuffle_buffer=500"])
    stream = build_train_stream(cfg.data, 0, 1, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
    return _rate(stream.iterate(), args.batches, args.batch_size)


def bench_image_folder(src: Path, workers: int, args) -> float:
    cfg = load_config(None, ["train.max_steps=1", f"data.image_size={args.image_size}", "data.random_flip=true",
                             "data.random_crop_scale=0.35"])
    transform = train_transform(cfg.data)
    dataset = ImageFolder(str(src), transform=transform)  # same transform; global RNG when no generator
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0)

    def endless():
        while True:
            for images, _ in loader:
                yield images
    return _rate(endless(), args.batches, args.batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per reader setting")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--json", default="", help="also write the numbers to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # per-process decoding is what is compared; workers add the parallelism
    workers = [int(w) for w in args.workers.split(",")]
    results: dict[str, dict] = {"config": vars(args).copy(), "write": {}, "read": {}}
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "jpegs", Path(tmp) / "shards"
        make_jpegs(src, args.images, args.width, args.height)
        args.shards = -(-args.images // 250)
        print(f"{args.images} JPEGs {args.width}x{args.height}; reading with random-resized crop + flip "
              f"to {args.image_size}, batch {args.batch_size}, {args.batches} timed batches")
        for w in workers:
            kept = bench_write(src, out, w, [])
            resized = bench_write(src, Path(tmp) / "resized", w, ["--resize", str(args.image_size)])
            results["write"][w] = {"keep_bytes": kept, "resize": resized}
            print(f"write  workers={w}: {kept:8.0f} img/s original bytes, {resized:8.0f} img/s resized")
        for w in workers:
            shards, folder = bench_shards(out, w, args), bench_image_folder(src, w, args)
            results["read"][w] = {"shards": shards, "image_folder": folder, "ratio": shards / folder}
            print(f"read   workers={w}: shards {shards:8.0f} img/s, ImageFolder {folder:8.0f} img/s, "
                  f"ratio {shards / folder:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
