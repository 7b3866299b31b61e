"""Files written atomically, and folders that a failed start must not leave behind.

A start that fails (a config mistake, missing data, a refused launcher) should leave the disk as it
found it: ``removed_on_failure(path)`` notes the outermost folder of ``path`` that does not exist
yet and, if the block raises, removes it again (with whatever the failed start put inside).
Folders that existed before are never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path


def first_missing(path: str | Path) -> Path | None:
    """The outermost folder on the way to ``path`` that does not exist (None when ``path`` exists)."""
    path = Path(path).absolute()
    if path.exists():
        return None
    missing = path
    for parent in path.parents:
        if parent.exists():
            break
        missing = parent
    return missing


def remove_created(created: Path | None) -> None:
    """Remove a folder that :func:`first_missing` reported and this process then created."""
    if created is not None and created.is_dir():
        shutil.rmtree(created, ignore_errors=True)


@contextlib.contextmanager
def removed_on_failure(path: str | Path):
    """Remove the folders of ``path`` that this block created if the block raises (any exception,
    Ctrl-C included), then re-raise."""
    created = first_missing(path)
    try:
        yield
    except BaseException:
        remove_created(created)
        raise


def atomic_write(path: str | Path, write) -> None:
    """``write(tmp)`` to a temporary file beside ``path`` (same suffix, so writers that infer the
    format from it work), flushed to disk, then renamed over ``path``: a kill mid-write leaves the
    previous complete file or none. The file gets the usual umask permissions."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # some writers (safetensors) create 0600 files
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data) -> None:
    """``data`` as JSON at ``path``, atomically (:func:`atomic_write`; the temporary name carries the
    pid, so parallel writers never share one)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n"))


def check_resume_plan(folder: str | Path, plan_path: str | Path, plan: dict, what: str, option: str,
                      write: bool = True) -> None:
    """Refuse to resume into ``folder`` when the plan recorded at ``plan_path`` by an earlier run
    differs from ``plan`` (one line naming the changed keys); record ``plan`` when there is none
    and ``write`` (the process that owns the folder's bookkeeping)."""
    from bavq.config import ConfigError

    path = Path(plan_path)
    if path.is_file():
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
        if changed:
            raise ConfigError(f"'{folder}' holds {what} written with other settings (changed: {', '.join(changed)}); "
                              f"use another {option} or delete it")
    elif write:
        write_json(path, plan)


def completed_record(folder: str | Path, state_dir: str, name: str) -> dict | None:
    """The bookkeeping record of the finished output file ``folder/name`` (kept as
    ``folder/state_dir/name.json`` by a resumable writer), or None when it must be (re)written."""
    folder = Path(folder)
    path = folder / state_dir / f"{name}.json"
    if not (folder / name).is_file() or not path.is_file():
        return None
    return json.loads(path.read_text())
