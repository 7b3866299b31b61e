"""What bavq-prep writes: every split's items, keyed by their global position in the source, and the
reader that loads an item's image inside a worker process.

An item is ``(key "%09d", ref for the reader, label or None, origin shown in bad-image reports)``.
The plan functions take bavq-prep's ``write`` options (source, input, val_fraction, splits, shuffle,
seed, image_key, streaming, download) and fill in the defaults they decide (val_fraction, streaming).
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from bavq.config import ConfigError, DataConfig
from bavq.data import sources

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
