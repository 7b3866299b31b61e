"""What the trainer calls: :func:`build_train_stream` and :func:`build_eval_loader`.

Map-style sources (Fashion-MNIST, CIFAR-10, image folders, HF datasets) follow one exact rule:
epoch ``e`` permutes the n training items with ``torch.randperm(n, seed + e)`` (the remainder that
does not fill a global batch is dropped); global batch ``b`` is ``perm[b*W*B:(b+1)*W*B]`` and rank
``r`` takes its slice ``[r*B:(r+1)*B]``. So the ranks' batches concatenated are exactly the batch
of one process with batch W*B, and ``iterate(s)`` computes (epoch, offset) from ``s`` instead of
loading the skipped images.

A resume continues from the saved *position* (epoch, offset into that epoch's permutation), not
from a batch count, so it also holds when the world size (hence the global batch G) changed: the
new run reads ``perm[offset:offset+G']``, ``perm[offset+G':offset+2G']``, ... and starts the next
epoch when fewer than G' items are left. Within an epoch no item is repeated or lost except that
dropped tail (fewer than G' items, as in any epoch). Random augmentations draw from a generator seeded with
(seed, epoch, index), so they do not depend on ranks or workers either.
Shards (``data.source=shards``) are delegated to :mod:`bavq.data.shards`.
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator, Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from bavq.config import ConfigError, DataConfig
from bavq.data.shards import ShardEvalLoader, ShardTrainStream
from bavq.data.sources import MapSplit, load_map_splits
from bavq.data.transforms import ImageTransform, eval_transform, generator_for, train_transform

log = logging.getLogger(__name__)


class TrainStream(Protocol):
    """The training data of one rank, as the trainer sees it."""

    batches_per_epoch: int  # batches per rank per epoch
    num_samples: int  # training set size
    skipped: int  # corrupt samples skipped so far

    def iterate(self, start_batch: int = 0, position: list[int] | None = None) -> Iterator[torch.Tensor]:
        """Endless (B, C, H, W) float32 batches in [-1, 1] for this rank, from micro-batch start_batch
        (or from ``position`` where the stream supports it; then ``self.position`` tracks it)."""
        ...


# ----------------------------------------------------------------------------- datasets
class _TrainItems(Dataset):
    """Item (epoch, i) -> (image, corrupt items replaced); a corrupt image is replaced by the next one."""

    def __init__(self, split: MapSplit, transform: ImageTransform, seed: int):
        self.split, self.transform, self.seed = split, transform, seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = item
        n = len(self.split)
        for attempt in range(n):
            i = (index + attempt) % n  # deterministic substitute keeps every batch full and rank-exact
            try:
                image = self.split.load(i)
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
                log.warning("skipping unreadable image %s: %s", self.split.key(i), str(exc)[:200])
                continue
            generator = generator_for(self.seed, epoch, i) if self.transform.is_random else None
            return self.transform(image, generator), attempt
        raise RuntimeError(f"no readable image in the {self.split.split} split")


def _collate_train(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, int]:
    return torch.stack([image for image, _ in items]), sum(skipped for _, skipped in items)


class _EvalItems(Dataset):
    """Item i -> (image, key), or None for an unreadable image (dropped from its batch)."""

    def __init__(self, split: MapSplit, transform: ImageTransform):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        try:
            return self.transform(self.split.load(i)), self.split.key(i)
        except Exception as exc:  # noqa: BLE001
            log.warning("skipping unreadable image %s: %s", self.split.key(i), str(exc)[:200])
            return None


def _collate_eval(items):
    good = [item for item in items if item is not None]
    if not good:
        return None, [], len(items)
    return torch.stack([image for image, _ in good]), [key for _, key in good], len(items) - len(good)


# ----------------------------------------------------------------------------- map-style stream
def normalize_position(position: list[int], num_samples: int, global_batch: int) -> list[int]:
    """[epoch, offset] of the next global batch: the next epoch when fewer than G items are left."""
    epoch, offset = position
    return [epoch + 1, 0] if offset + global_batch > num_samples else [epoch, offset]


def advance_position(position: list[int], num_samples: int, global_batch: int) -> list[int]:
    """The position after one global batch read at ``position``."""
    epoch, offset = normalize_position(position, num_samples, global_batch)
    return normalize_position([epoch, offset + global_batch], num_samples, global_batch)


class _BatchIndices:
    """Endless batch sampler: this rank's (epoch, index) lists from ``position`` = [epoch, offset] on."""

    def __init__(self, stream: "MapTrainStream", position: list[int]):
        self.stream, self.position = stream, position

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        s = self.stream
        global_batch = s.world_size * s.batch_size
        epoch, offset = normalize_position(self.position, s.num_samples, global_batch)
        while True:
            perm = s.permutation(epoch)
            while offset + global_batch <= s.num_samples:
                start = offset + s.rank * s.batch_size
                yield [(epoch, i) for i in perm[start:start + s.batch_size].tolist()]
                offset += global_batch
            epoch, offset = epoch + 1, 0


class MapTrainStream:
    """TrainStream over a map-style split (see the module docstring for the exact order)."""

    def __init__(self, data: DataConfig, split: MapSplit, rank: int, world_size: int, *, batch_size: int,
                 seed: int):
        self.split, self.rank, self.world_size = split, rank, world_size
        self.batch_size, self.seed = batch_size, seed
        self.num_workers = data.num_workers
        self.transform = train_transform(data)
        self.num_samples = len(split)
        self.batches_per_epoch = self.num_samples // (world_size * self.batch_size)
        if self.batches_per_epoch < 1:
            raise ConfigError(f"config key 'train.batch_size': {self.num_samples} training images are fewer "
                              f"than one global batch ({world_size} x {self.batch_size})")
        self.skipped = 0
        self.position: list[int] | None = None  # [epoch, offset] of the next global batch (set by iterate)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of epoch ``epoch``: the same on every rank."""
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))

    def iterate(self, start_batch: int = 0, position: list[int] | None = None) -> Iterator[torch.Tensor]:
        """Endless (B, C, H, W) batches for this rank, exactly those of iterate(0) after start_batch
        global batches, or from a saved ``position`` (which survives a change of world size)."""
        global_batch = self.world_size * self.batch_size
        if position is None:  # a constant global batch: the position is a function of the batch count
            epoch, batch = divmod(start_batch, self.batches_per_epoch)
            position = [epoch, batch * global_batch]
        position = normalize_position(list(position), self.num_samples, global_batch)
        loader = DataLoader(_TrainItems(self.split, self.transform, self.seed),
                            batch_sampler=_BatchIndices(self, position), num_workers=self.num_workers,
                            collate_fn=_collate_train, pin_memory=torch.cuda.is_available())
        for images, skipped in loader:
            self.skipped += skipped
            # before the yield: once next() returns, ``position`` is that of the batch after this one
            position = advance_position(position, self.num_samples, global_batch)
            self.position = position
            yield images


class MapEvalLoader:
    """Finite held-out reader: rank r reads items r, r+W, ...; yields (images, keys)."""

    def __init__(self, data: DataConfig, split: MapSplit, rank: int, world_size: int, *, batch_size: int):
        self.split, self.transform = split, eval_transform(data)
        self.positions = list(range(rank, len(split), world_size))
        self.batch_size, self.num_workers = batch_size, data.num_workers
        self.skipped = 0

    def __len__(self) -> int:
        """Number of batches of this rank."""
        return -(-len(self.positions) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        batches = [self.positions[i:i + self.batch_size] for i in range(0, len(self.positions), self.batch_size)]
        if not batches:
            return
        loader = DataLoader(_EvalItems(self.split, self.transform), batch_sampler=batches,
                            num_workers=min(self.num_workers, len(batches)), collate_fn=_collate_eval)
        for images, keys, skipped in loader:
            self.skipped += skipped
            if images is not None:
                yield images, keys


# ----------------------------------------------------------------------------- entry points
def build_train_stream(data: DataConfig, rank: int, world_size: int, *, batch_size: int,
                       seed: int) -> TrainStream:
    """The training stream of rank ``rank`` of ``world_size`` for ``data.source``: ``batch_size``
    (train.batch_size) images per rank per batch, in an order fixed by ``seed`` (train.seed)."""
    if data.source == "shards":
        return ShardTrainStream(data, rank, world_size, batch_size=batch_size, seed=seed)
    train, _ = load_map_splits(data)
    return MapTrainStream(data, train, rank, world_size, batch_size=batch_size, seed=seed)


def build_eval_loader(data: DataConfig, rank: int, world_size: int, *,
                      batch_size: int) -> Iterable[tuple[torch.Tensor, list[str]]]:
    """Finite held-out batches (images in [-1, 1], keys) of this rank, at most ``batch_size``
    (eval.batch_size) images each; every sample once across ranks."""
    if data.source == "shards":
        return ShardEvalLoader(data, rank, world_size, batch_size=batch_size)
    _, val = load_map_splits(data)
    return MapEvalLoader(data, val, rank, world_size, batch_size=batch_size)
