"""Streaming shard readers: sizes.json, seeded/reseeded training stream, exactly-once evaluation, 2 ranks."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
import webdataset as wds
from _builders import eval_loader, train_stream
from _mp import run_distributed
from PIL import Image

from bavq import dist
from bavq.config import ConfigError, load_config
from bavq.data.shard_files import expand_urls, iter_tar_members, limit_plan, read_sizes

SIZES = [5, 3, 7, 1, 4]  # deliberately uneven


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (32, 32), value).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder, sizes=SIZES, corrupt_per_shard: bool = False) -> str:
    """Shards whose images are uniform grey levels 10 + global index (so a batch tells what it holds)."""
    folder.mkdir(parents=True, exist_ok=True)
    index = 0
    for shard, size in enumerate(sizes):
        with wds.TarWriter(str(folder / f"s-{shard:06d}.tar")) as tar:
            for _ in range(size):
                tar.write({"__key__": f"{index:09d}", "png": _png(10 + index), "cls": b"0"})
                index += 1
            if corrupt_per_shard:
                tar.write({"__key__": f"bad{shard:06d}", "jpg": b"\xff\xd8 truncated"})
    extra = int(corrupt_per_shard)  # sizes.json counts samples, readable or not
    (folder / "sizes.json").write_text(json.dumps({f"s-{i:06d}.tar": n + extra for i, n in enumerate(sizes)}))
    return str(folder / f"s-{{000000..{len(sizes) - 1:06d}}}.tar")


def _cfg(pattern: str, *overrides: str):
    return load_config(None, ["train.max_steps=1", "data.source=shards", f"data.train_shards={pattern}",
                              f"data.val_shards={pattern}", "data.num_workers=0", "train.batch_size=4",
                              "data.shuffle_buffer=8", "eval.batch_size=3", *overrides])


def _ids(batch: torch.Tensor) -> list[int]:
    """Global sample indices of a batch of uniform images."""
    return [round((v + 1) * 127.5) - 10 for v in batch.mean(dim=(1, 2, 3)).tolist()]


def test_sizes_json_limits_and_missing_sizes(tmp_path):
    pattern = write_shards(tmp_path / "a")
    urls = expand_urls(pattern)
    sizes = read_sizes(urls)
    assert list(sizes.values()) == SIZES
    assert list(limit_plan(urls, sizes, 7).values()) == [5, 2]
    stream = train_stream(_cfg(pattern), 0, 2)
    assert (stream.num_samples, stream.batches_per_epoch) == (20, 2)
    assert train_stream(_cfg(pattern, "data.train_limit=9"), 0, 1).num_samples == 9
    (tmp_path / "a" / "sizes.json").unlink()
    with pytest.raises(ConfigError, match="train_num_samples"):
        train_stream(_cfg(pattern), 0, 1)
    assert train_stream(_cfg(pattern, "data.train_num_samples=20"), 0, 1).batches_per_epoch == 5
    with pytest.raises(ConfigError, match="do not exist"):
        train_stream(_cfg(str(tmp_path / "a" / "s-{000000..000009}.tar")), 0, 1)


def test_train_stream_is_seeded_and_a_resume_reseeds(tmp_path):
    pattern = write_shards(tmp_path / "a")
    cfg = _cfg(pattern, "data.random_flip=true", "train.seed=5")
    first = [_ids(b) for _, b in zip(range(12), train_stream(cfg, 0, 1).iterate(0))]
    again = [_ids(b) for _, b in zip(range(12), train_stream(cfg, 0, 1).iterate(0))]
    assert first == again and all(0 <= i < 20 for ids in first for i in ids)
    resumed = [_ids(b) for _, b in zip(range(9), train_stream(cfg, 0, 1).iterate(3))]
    assert resumed != first[3:] and resumed != first[:9]  # re-seeded: neither a skip nor a replay
    other_seed = _cfg(pattern, "train.seed=6")
    assert [_ids(b) for _, b in zip(range(12), train_stream(other_seed, 0, 1).iterate(0))] != first


def _draws(batches, sizes) -> list[int]:
    """The shard draws behind a stream without shuffling: a new draw starts when the shard changes or restarts."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    draws, last = [], None
    for i in (i for b in batches for i in _ids(b)):
        shard = max(s for s in range(len(sizes)) if starts[s] <= i)
        if last is None or shard != draws[-1] or i <= last:
            draws.append(shard)
        last = i
    return draws


def test_ranks_split_one_stream_of_shard_draws(tmp_path):
    sizes = [3, 2, 4, 1, 3, 2, 4, 1, 3, 2]
    pattern = write_shards(tmp_path / "a", sizes)
    cfg = _cfg(pattern, "data.shuffle_buffer=0", "train.batch_size=1")
    # within one epoch (each epoch re-seeds the shared draw stream): 25 batches in one process, 12 per rank
    whole = _draws((b for _, b in zip(range(25), train_stream(cfg, 0, 1).iterate())), sizes)
    for r in (0, 1):  # explicit node splitting: rank r reads draws r, r+2, ... of the shared stream
        mine = _draws((b for _, b in zip(range(12), train_stream(cfg, r, 2).iterate())), sizes)
        n = min(len(mine), len(whole[r::2])) - 1  # the last draw may be cut by the end of the epoch
        assert n >= 3 and mine[:n] == whole[r::2][:n]


def test_workers_and_corrupt_samples_are_counted(tmp_path):
    pattern = write_shards(tmp_path / "a", corrupt_per_shard=True)
    cfg = _cfg(pattern, "data.num_workers=2")
    streams = [train_stream(cfg, r, 2) for r in (0, 1)]
    batches = [[b for _, b in zip(range(10), s.iterate())] for s in streams]
    assert all(b.shape == (4, 3, 32, 32) for rank in batches for b in rank)
    assert [_ids(b) for b in batches[0]] != [_ids(b) for b in batches[1]]
    assert all(s.skipped >= 1 for s in streams)  # every shard holds one corrupt sample


def test_eval_reader_exactly_once_with_uneven_shards_ranks_and_workers(tmp_path):
    pattern = write_shards(tmp_path / "a")
    cfg = _cfg(pattern, "data.num_workers=2")
    per_rank = [[k for _, keys in eval_loader(cfg, r, 3) for k in keys] for r in range(3)]
    keys = [k.split("/")[1] for rank in per_rank for k in rank]
    assert sorted(keys) == [f"{i:09d}" for i in range(20)]
    assert list(map(len, per_rank)) == [5 + 1, 3 + 4, 7]  # shards r, r+3: uneven, no padding, no duplicates
    many = [[k for _, keys in eval_loader(_cfg(pattern), r, 6) for k in keys] for r in range(6)]
    assert len(sum(many, [])) == len(set(sum(many, []))) == 20 and many[5] == []  # more ranks than shards
    limited = _cfg(pattern, "data.val_limit=7")
    batches = list(eval_loader(limited, 0, 1))
    assert [k.split("/")[1] for _, keys in batches for k in keys] == [f"{i:09d}" for i in range(7)]
    assert sorted(i for images, _ in batches for i in _ids(images)) == list(range(7))


def test_pipe_urls_stream_with_a_given_size(tmp_path):
    write_shards(tmp_path / "a")
    pattern = f"pipe:cat {tmp_path / 'a'}/s-{{000000..000004}}.tar"
    cfg = _cfg(pattern, "data.train_num_samples=20")
    stream = train_stream(cfg, 0, 1)
    assert stream.batches_per_epoch == 5 and next(stream.iterate()).shape == (4, 3, 32, 32)
    assert sum(len(keys) for _, keys in eval_loader(cfg, 0, 1)) == 20


def test_fsspec_urls_and_their_sizes_json(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    write_shards(tmp_path / "a")
    memory = fsspec.filesystem("memory")
    for path in (tmp_path / "a").iterdir():
        memory.pipe(f"/bavq-test/{path.name}", path.read_bytes())
    cfg = _cfg("memory://bavq-test/s-{000000..000004}.tar")
    stream = train_stream(cfg, 0, 1)
    assert stream.num_samples == 20 and next(stream.iterate()).shape == (4, 3, 32, 32)
    assert sum(len(keys) for _, keys in eval_loader(cfg, 0, 1)) == 20
    memory.rm("/bavq-test", recursive=True)


def _two_rank_reader(rank: int, world_size: int, pattern: str):
    cfg = _cfg(pattern, "data.num_workers=1", "train.batch_size=3")
    stream = train_stream(cfg, rank, world_size)
    counts = dist.all_gather_object(stream.batches_per_epoch)
    steps = 2 * stream.batches_per_epoch + 1
    seen = []
    for _, batch in zip(range(steps), stream.iterate()):
        dist.all_reduce_sum(batch.sum().reshape(1))  # lockstep like DDP: a rank running dry would hang here
        seen.append(_ids(batch))
    keys = [k for _, batch_keys in eval_loader(cfg, rank, world_size) for k in batch_keys]
    return {"counts": counts, "steps": len(seen), "first": seen[0], "keys": keys}


@pytest.mark.slow
def test_two_processes_same_batch_count_and_exactly_once_eval(tmp_path):
    pattern = write_shards(tmp_path / "a")
    results = run_distributed(_two_rank_reader, 2, pattern)
    assert results[0]["counts"] == results[1]["counts"] == [3, 3]
    assert results[0]["steps"] == results[1]["steps"] == 7
    assert results[0]["first"] != results[1]["first"]
    keys = results[0]["keys"] + results[1]["keys"]
    assert sorted(k.split("/")[1] for k in keys) == [f"{i:09d}" for i in range(20)]
    assert len(results[0]["keys"]) != len(results[1]["keys"])  # 5+7+4 vs 3+1: uneven, still no hang


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_member_reader_matches_tarfile(tmp_path, fmt):
    path = tmp_path / "x.tar"
    # a name over 100 characters: ustar prefix field, GNU long-name member, or pax path record
    members = {"a/000000001.png": b"x" * 700, "b" * 90 + "/" + "c" * 80 + ".jpg": b"long name", "e.cls": b""}
    with tarfile.open(path, "w", format=fmt) as tar:
        directory = tarfile.TarInfo("a")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as fh:
        assert dict(iter_tar_members(fh)) == members
    whole = path.read_bytes()
    with pytest.raises(EOFError):
        list(iter_tar_members(io.BytesIO(whole[:1100])))
    with pytest.raises(ValueError):
        list(iter_tar_members(io.BytesIO(whole[:512] + b"garbage" * 100)))
    damaged = bytearray(whole)
    damaged[0] ^= 1  # the first member's name, so only the checksum can tell
    with pytest.raises(ValueError, match="checksum"):
        list(iter_tar_members(io.BytesIO(bytes(damaged))))
