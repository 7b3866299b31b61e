"""Checkpoints: atomic, verified, resumable ``accelerator.save_state`` folders.

Layout of ``RUN/checkpoints``::

    step_00001000/      a complete checkpoint (save_state files, config.yaml, MANIFEST.json)
    latest              text file naming the newest complete checkpoint (replaced atomically)
    .tmp-step_00002000/ a checkpoint being written (removed at the next start)

A checkpoint folder only gets its final name after every rank has finished writing and rank 0
has written MANIFEST.json (file sizes and sha256), so a job killed while saving leaves ``latest``
pointing at the previous complete checkpoint. On resume the manifest is checked; a damaged
checkpoint is refused with a message and the newest intact older one is used instead.

Accelerate's save_state does the heavy lifting (model, optimizers, schedulers, scaler, per-rank
RNG, registered objects; ZeRO shards under DeepSpeed); this module adds what it lacks (atomic
rename, a completeness check, retention, a ``latest`` pointer, a config guard).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from bavq import dist
from bavq.config import Config, ConfigError, from_dict, save_config, to_dict
from bavq.weights import MANIFEST, file_sha256, verify_checkpoint

CKPT_RE = re.compile(r"^step_(\d{8,})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(folder: Path, step: int) -> None:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[str(p.relative_to(folder))] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
    _write_atomic(folder / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CKPT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


def checkpoint_step(folder: Path) -> int:
    m = CKPT_RE.match(Path(folder).name)
    if m is None:
        raise ConfigError(f"'{folder}' is not a checkpoint folder (expected a name like step_00001000)")
    return int(m.group(1))


def save_checkpoint(accelerator, root: Path, step: int, cfg: Config, keep_last: int, keep_every: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # save_state has no trailing barrier
    if accelerator.is_main_process:
        save_config(cfg, tmp / "config.yaml")
        write_manifest(tmp, step)
        if final.exists():  # a re-save of the same step (e.g. preemption right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / "latest", final.name + "\n")
        prune_checkpoints(root, keep_last, keep_every)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(root: Path, keep_last: int, keep_every: int) -> None:
    ckpts = list_checkpoints(root)
    keep = set(ckpts[-keep_last:])
    if keep_every > 0:
        keep |= {p for p in ckpts if checkpoint_step(p) % keep_every == 0}
    for p in ckpts:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)


def clean_partial(root: Path) -> None:
    """Remove folders left by a save that was killed (main process only)."""
    if Path(root).is_dir():
        for p in Path(root).glob(".tmp-step_*"):
            shutil.rmtree(p, ignore_errors=True)


def _pick_checkpoint(resume: str, root: Path, log) -> Path | None:
    """Rank-0 logic of :func:`find_resume_checkpoint`."""
    if resume == "none":
        if list_checkpoints(root):  # a fresh run here would overwrite and prune them
            raise ConfigError(f"train.resume=none but {root} already holds checkpoints; use a new --name, "
                              "resume them (train.resume=auto), or delete the run folder")
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"train.resume: checkpoint folder '{path}' does not exist")
        reason = verify_checkpoint(path)
        if reason:
            raise ConfigError(f"train.resume: refusing checkpoint: {reason}")
        return path
    candidates = list_checkpoints(root)
    latest = root / "latest"
    named = root / latest.read_text().strip() if latest.is_file() else None
    if named is not None and named.is_dir():  # the pointer wins; older folders are the fall-back
        candidates = [p for p in candidates if checkpoint_step(p) <= checkpoint_step(named)]
    for path in reversed(candidates):
        reason = verify_checkpoint(path)
        if reason is None:
            return path
        log(f"WARNING: skipping damaged checkpoint: {reason}; trying the previous one")
    if candidates:  # starting over would overwrite (and prune) them
        raise ConfigError(f"{root} holds checkpoints but none is intact; move them away or pass --resume PATH")
    return None


def find_resume_checkpoint(resume: str, root: Path, log=print) -> Path | None:
    """Collective: rank 0 chooses (``auto`` = newest intact, ``none``, or a path) and broadcasts."""
    choice, error = None, None
    if dist.is_main_process():
        try:
            choice = _pick_checkpoint(resume, Path(root), log)
        except ConfigError as exc:
            error = str(exc)
    choice, error = dist.broadcast_object((str(choice) if choice else None, error))
    if error:
        raise ConfigError(error)
    return Path(choice) if choice else None


COMPATIBLE_SECTIONS = ("model", "quantizer")


def check_resume_compatible(cfg: Config, ckpt: Path) -> list[str]:
    """Refuse a resume whose model or quantizer config differs; return notes on other changes."""
    path = Path(ckpt) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"checkpoint {ckpt} has no config.yaml; cannot check it matches this run")
    import yaml

    saved = from_dict(yaml.safe_load(path.read_text()))
    old, new = to_dict(saved), to_dict(cfg)
    for section in COMPATIBLE_SECTIONS:
        for key, value in new[section].items():
            if old[section][key] != value:
                raise ConfigError(
                    f"resume refused: {section}.{key} is {value!r} but the checkpoint {ckpt} was trained with "
                    f"{old[section][key]!r}; use the same value or start a new run (train.resume=none, new name)"
                )
    notes = []
    for section in ("train", "data", "loss"):
        for key, value in new[section].items():
            if old[section][key] != value:
                notes.append(f"{section}.{key}: {old[section][key]!r} -> {value!r}")
    return notes
