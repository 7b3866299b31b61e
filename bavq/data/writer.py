"""Writing planned items into tar shards, in parallel worker processes (bavq-prep).

A shard is encoded under a temporary name and renamed into place, then its bookkeeping record is
written (``{"shard", "split", "count", "planned", "bad"}`` in the state folder): a recorded shard
is complete, so an interrupted run leaves only complete shards and a rerun rewrites the others.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections import deque
from pathlib import Path
from typing import Any, Iterator

from bavq.data.plans import Item
from bavq.data.shard_files import tar_writer
from bavq.data.transforms import EncodeOptions, encode_image
from bavq.paths import write_json

_WORKER: dict[str, Any] = {}


def quiet_worker() -> None:
    """Workers leave interrupts to the parent: Ctrl-C (sent to the whole process group) is ignored
    here, and SIGTERM kills silently (a forked worker would otherwise inherit the parent's handler)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _init_worker(reader, opts: EncodeOptions, output: str, state_dir: str, quiet: bool = False) -> None:
    if quiet:
        quiet_worker()
    _WORKER.update(reader=reader, opts=opts, output=Path(output), state_dir=state_dir)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def write_shard(task: tuple[str, int, list[Item]]) -> dict:
    """Encode and write one shard (temp file, then rename), then its bookkeeping record."""
    split, index, items = task
    reader, opts, output = _WORKER["reader"], _WORKER["opts"], _WORKER["output"]
    final = output / shard_name(split, index)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    count, bad = 0, []
    try:
        with open(tmp, "wb") as fh, tar_writer(fh) as tar:
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
    write_json(output / _WORKER["state_dir"] / f"{final.name}.json", record)
    return record


def write_shards(tasks: Iterator[tuple[str, int, list[Item]]], workers: int, reader, opts: EncodeOptions,
                 output: str, state_dir: str) -> Iterator[dict]:
    """Records of ``(split, index, items)`` tasks written as ``output/{split}-%06d.tar`` by ``workers``
    processes (0: in this one), with at most 2 x workers shards in flight (streams stay lazy).
    Records go to ``output/state_dir/NAME.json``."""
    init_args = (reader, opts, output, state_dir)
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
                for tmp in Path(output).glob(f".{name}.*.tmp"):
                    tmp.unlink(missing_ok=True)
            raise


def _next_done(pending: deque) -> dict:
    record = pending[0][1].get()  # stays pending (its temp file is cleaned up) if interrupted here
    pending.popleft()
    return record
