"""Streaming WebDataset readers: an endless, per-rank training stream and a finite evaluation reader.

Training (see the WebDataset facts in DESIGN.md): shards are *resampled* (drawn with replacement,
forever) and each DataLoader epoch is cut with ``with_epoch``, so every rank yields the same
number of batches and DDP never hangs on an uneven last shard. One shard-draw stream seeded
from (seed, resume step) is split explicitly over ranks and then workers (``islice``), so
ranks and workers read disjoint draws; the sample shuffle buffer and the augmentations are
seeded from (seed, rank, worker, resume step). A resumed job therefore re-seeds instead of
replaying (or skipping through) the stream it already trained on.

Evaluation: the shard list is split over ranks and workers without resampling, so every
held-out sample is read exactly once across ranks; ranks may get different counts.

The dataset size comes from ``sizes.json`` next to the shards (bavq.data.shard_files). Corrupt
samples and unreadable shards are skipped with a warning and counted.
"""

from __future__ import annotations

import logging
import math
import os
import random
from functools import partial
from itertools import islice
from typing import Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info
from webdataset.tariterators import group_by_keys

from bavq.config import ConfigError, DataConfig
from bavq.data.shard_files import (
    IMAGE_FIELDS,
    check_local_shards,
    expand_urls,
    is_meta_member,
    iter_tar_members,
    limit_plan,
    open_url,
    read_sizes,
)
from bavq.data.sources import decode_image
from bavq.data.transforms import ImageTransform, eval_transform, generator_for, mix_seed, train_transform

log = logging.getLogger(__name__)
_MAX_WARNINGS = 20  # per worker; the trainer logs the running count anyway


# ----------------------------------------------------------------------------- pipeline stages
def split_by_rank(src, rank: int, world_size: int):
    """Node splitter with an explicit rank (webdataset's reads RANK from the environment)."""
    yield from islice(src, rank, None, world_size)


def _worker_id() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _same_draws_everywhere() -> int:
    # ResampledShards' worker_seed: identical on all ranks and workers so the explicit splitters
    # hand out disjoint draws of one stream instead of W x workers independent streams
    return 0


class DataStreamError(RuntimeError):
    """Nothing but corrupt data for a long stretch: stop instead of spinning on a resampled stream."""


class ErrorCounter:
    """Counts (and warns about the first few) corrupt samples and unreadable shards in one worker.

    ``max_consecutive`` failures in a row with no good sample in between raise DataStreamError.
    """

    def __init__(self, max_consecutive: int = 1000):
        self.count, self.consecutive, self.max_consecutive = 0, 0, max_consecutive

    def ok(self) -> None:
        self.consecutive = 0

    def __call__(self, exc: BaseException, where: str = "") -> bool:
        if isinstance(exc, DataStreamError):
            raise exc
        self.count += 1
        self.consecutive += 1
        if self.count <= _MAX_WARNINGS:
            log.warning("skipping corrupt data%s: %s%s", f" {where}" if where else "",
                        str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
                        " (further warnings suppressed)" if self.count == _MAX_WARNINGS else "")
        if self.consecutive > self.max_consecutive:
            raise DataStreamError(f"{self.consecutive} corrupt samples or unreadable shards in a row "
                                  f"(last: {where or exc}); check the shards with `bavq-prep verify`")
        return True  # webdataset handler protocol: True = continue


class ReadShards:
    """Stage: dict(url=...) -> samples; at most ``limits[url]`` samples per shard when given.

    A shard that cannot be opened or read (deleted, truncated, unreachable mid-run) is skipped with a
    warning and counted. With ``num_shards`` (the resampled training stream), more than
    10·num_shards + 20 shard draws in a row without one readable sample means none is readable (the
    chance that a readable one is never drawn is below e^-10): stop with one line."""

    def __init__(self, errors: ErrorCounter, limits: dict[str, int] | None = None, num_shards: int | None = None):
        self.errors, self.limits = errors, limits
        self.max_bad_in_a_row = 10 * num_shards + 20 if num_shards else None
        self.bad_in_a_row = 0

    def samples(self, url: str) -> Iterator[dict]:
        limit = self.limits.get(url) if self.limits is not None else None
        read = 0
        try:
            with open_url(url) as stream:
                files = (dict(fname=name, data=data, __url__=url)
                         for name, data in iter_tar_members(stream) if not is_meta_member(name))
                for sample in islice(group_by_keys(files, handler=self.errors), limit):
                    read += 1
                    self.bad_in_a_row = 0
                    yield sample
        except DataStreamError:
            raise
        except Exception as exc:  # noqa: BLE001 - truncated tar, vanished file, broken pipe
            self.errors(exc, f"in shard {url} (unreadable shard skipped)")
            if read == 0:
                self._bad_shard(url, exc)

    def _bad_shard(self, url: str, exc: BaseException) -> None:
        self.bad_in_a_row += 1
        if self.max_bad_in_a_row is not None and self.bad_in_a_row > self.max_bad_in_a_row:
            detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise DataStreamError(f"no training shard is readable ({self.bad_in_a_row} unreadable shard draws in a "
                                  f"row, last {url}: {detail}); check data.train_shards with `bavq-prep verify`")

    def __call__(self, src):
        for item in src:
            yield from self.samples(item["url"])


class SeededShuffle:
    """Stage: webdataset's buffer shuffle with a seed from (base seed, rank, worker, call number)."""

    def __init__(self, bufsize: int, seed: int, rank: int):
        self.bufsize, self.seed, self.rank, self.calls = bufsize, seed, rank, 0

    def __call__(self, src):
        self.calls += 1
        if self.bufsize < 2:
            return src
        rng = random.Random(mix_seed(self.seed, self.rank, _worker_id()[0], self.calls))
        return wds.filters._shuffle(src, bufsize=self.bufsize, initial=self.bufsize, rng=rng)


def sample_image_bytes(sample: dict) -> bytes:
    """The encoded image of a webdataset sample (first member with an image extension)."""
    for field in IMAGE_FIELDS:
        if field in sample:
            return sample[field]
    raise ValueError(f"sample {sample.get('__key__')} has no image member (fields: {sorted(sample)})")


def sample_id(sample: dict) -> str:
    """A unique id: shard name (without .tar) / __key__."""
    shard = os.path.basename(str(sample.get("__url__", ""))).removesuffix(".tar")
    return f"{shard}/{sample['__key__']}"


class DecodeBatch:
    """Stage: decode, transform, batch. Yields (images, keys, worker id, errors so far in this worker)."""

    def __init__(self, transform: ImageTransform, batch_size: int, errors: ErrorCounter,
                 seed: int = 0, rank: int = 0, keep_last: bool = False):
        self.transform, self.batch_size, self.errors = transform, batch_size, errors
        self.seed, self.rank, self.keep_last, self.calls = seed, rank, keep_last, 0

    def __call__(self, src):
        self.calls += 1
        worker = _worker_id()[0]
        generator = generator_for(self.seed, self.rank, worker, self.calls) if self.transform.is_random else None
        images, keys = [], []
        for sample in src:
            try:
                image = self.transform(decode_image(sample_image_bytes(sample)), generator)
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data
                self.errors(exc, f"{sample.get('__key__')} in {sample.get('__url__')}")
                continue
            self.errors.ok()
            images.append(image)
            keys.append(sample_id(sample))
            if len(images) == self.batch_size:
                yield torch.stack(images), keys, worker, self.errors.count
                images, keys = [], []
        if images and self.keep_last:
            yield torch.stack(images), keys, worker, self.errors.count


# ----------------------------------------------------------------------------- training stream
class ShardTrainStream:
    """Endless per-rank batches from resampled shards (the TrainStream of ``data.source=shards``).

    ``skipped`` counts corrupt samples reported by the workers with the batches received so far
    (each batch carries its worker's running count), so it lags by the batches still in flight.
    """

    def __init__(self, data: DataConfig, rank: int, world_size: int, *, batch_size: int, seed: int):
        d = data
        self.data, self.rank, self.world_size = data, rank, world_size
        self.batch_size, self.seed = batch_size, seed
        self.urls = expand_urls(d.train_shards)
        check_local_shards(self.urls, "data.train_shards")
        sizes = read_sizes(self.urls)
        self.limits: dict[str, int] | None = None
        if sizes is not None and d.train_limit > 0:
            self.limits = limit_plan(self.urls, sizes, d.train_limit)
            self.urls = list(self.limits)
            self.num_samples = sum(self.limits.values())
        elif sizes is not None:
            self.num_samples = sum(sizes.values())
        elif d.train_limit > 0:
            raise ConfigError("config key 'data.train_limit': needs a sizes.json next to the training shards")
        elif d.train_num_samples > 0:
            self.num_samples = d.train_num_samples
        else:
            raise ConfigError("config key 'data.train_num_samples': no sizes.json next to "
                              f"'{d.train_shards}'; write shards with bavq-prep or set the training set size")
        self.batches_per_epoch = self.num_samples // (world_size * self.batch_size)
        if self.batches_per_epoch < 1:
            raise ConfigError(f"config key 'train.batch_size': {self.num_samples} training samples are fewer "
                              f"than one global batch ({world_size} x {self.batch_size})")
        self.num_workers = d.num_workers
        self.skipped = 0

    def pipeline(self, start_batch: int) -> wds.DataPipeline:
        """The per-rank pipeline of a (re)start at ``start_batch`` (reseeded, not skipped)."""
        seed = mix_seed(self.seed, start_batch)
        errors = ErrorCounter()
        workers = max(1, self.num_workers)
        return wds.DataPipeline(
            wds.ResampledShards(self.urls, seed=seed, worker_seed=_same_draws_everywhere, deterministic=True),
            partial(split_by_rank, rank=self.rank, world_size=self.world_size),
            wds.split_by_worker,
            ReadShards(errors, self.limits, num_shards=len(self.urls)),
            SeededShuffle(self.data.shuffle_buffer, seed, self.rank),
            DecodeBatch(train_transform(self.data), self.batch_size, errors, seed, self.rank),
        ).with_epoch(math.ceil(self.batches_per_epoch / workers))

    def iterate(self, start_batch: int = 0, position: list[int] | None = None) -> Iterator[torch.Tensor]:
        """Endless (B, C, H, W) batches in [-1, 1] for this rank; ``start_batch`` re-seeds the stream
        (a stream has no position to continue from: ``position`` is ignored)."""
        workers = self.num_workers
        loader = DataLoader(self.pipeline(start_batch), batch_size=None, num_workers=workers,
                            persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
        per_worker: dict[int, int] = {}
        base = self.skipped
        while True:
            received = 0
            for images, _keys, worker, errors in loader:
                received += 1
                per_worker[worker] = errors
                self.skipped = base + sum(per_worker.values())
                yield images
            if received == 0:
                raise DataStreamError(f"no readable samples in {self.data.train_shards} "
                                      f"({self.skipped} corrupt samples skipped); check them with `bavq-prep verify`")


# ----------------------------------------------------------------------------- evaluation reader
class ShardEvalLoader:
    """Finite reader of ``data.val_shards``: every sample once across ranks; yields (images, keys)."""

    def __init__(self, data: DataConfig, rank: int, world_size: int, *, batch_size: int):
        d = data
        if not d.val_shards:
            raise ConfigError("config key 'data.val_shards': data.source=shards needs validation shards "
                              "(e.g. /data/val-{000000..000004}.tar)")
        self.data, self.rank, self.world_size, self.batch_size = data, rank, world_size, batch_size
        self.urls = expand_urls(d.val_shards)
        check_local_shards(self.urls, "data.val_shards")
        self.limits = None
        if d.val_limit > 0:
            sizes = read_sizes(self.urls)
            if sizes is None:
                raise ConfigError("config key 'data.val_limit': needs a sizes.json next to the validation shards")
            self.limits = limit_plan(self.urls, sizes, d.val_limit)
            self.urls = list(self.limits)
        own_shards = len(self.urls[rank::world_size])
        self.num_workers = min(d.num_workers, own_shards)  # a worker without shards would idle
        self.skipped = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        if not self.urls[self.rank::self.world_size]:
            return
        errors = ErrorCounter()
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.urls),
            partial(split_by_rank, rank=self.rank, world_size=self.world_size),
            wds.split_by_worker,
            ReadShards(errors, self.limits),
            DecodeBatch(eval_transform(self.data), self.batch_size, errors, keep_last=True),
        )
        loader = DataLoader(pipeline, batch_size=None, num_workers=self.num_workers)
        per_worker: dict[int, int] = {}
        base = self.skipped
        for images, keys, worker, count in loader:
            per_worker[worker] = count
            self.skipped = base + sum(per_worker.values())
            yield images, keys


