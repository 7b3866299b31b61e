"""Reading saved weights: the generator of a run folder, a checkpoint folder (verified against its
manifest; DeepSpeed ZeRO shards consolidated), an exported tokenizer folder or a weights file.

Writing, pruning and resuming checkpoints belong to the training application (bavq.train.checkpoint);
this module only reads, so the library (``bavq.Tokenizer``) can load what training wrote.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from bavq.config import ConfigError

MANIFEST = "MANIFEST.json"  # a checkpoint folder's file sizes and sha256, written last by the saver
EXPORT_INFO = "tokenizer.json"  # marks an exported tokenizer folder (bavq.Tokenizer.save_pretrained)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(folder: Path) -> str | None:
    """None when ``folder`` is a complete, undamaged checkpoint; otherwise the reason it is not."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{folder} has no {MANIFEST} (incomplete save)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"{manifest} is unreadable ({exc})"
    for rel, meta in files.items():
        p = folder / rel
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != meta["bytes"]:
            return f"{p} has {p.stat().st_size} bytes, expected {meta['bytes']} (truncated?)"
        if file_sha256(p) != meta["sha256"]:
            return f"{p} does not match its checksum (corrupted)"
    return None


def _strip_prefix(state: dict) -> dict:
    """DDP-wrapped state dicts carry a 'module.' prefix; model files must not."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def load_generator_state(path: str | Path) -> tuple[dict, Path]:
    """Generator (encoder, quantizer buffers, decoder) weights from a run folder, a checkpoint folder
    (DDP or DeepSpeed ZeRO shards, consolidated with DeepSpeed's own tool), an exported tokenizer
    folder or a weights file. Returns (state_dict, the folder holding config.yaml)."""
    path = Path(path)
    if path.is_file():
        return _load_weights_file(path), path.parent
    if not path.is_dir():
        raise ConfigError(f"'{path}' is neither a run folder, a checkpoint folder, an exported tokenizer "
                          "folder nor a weights file")
    if (path / EXPORT_INFO).is_file():  # written last by save_pretrained: the folder is complete
        return _load_weights_file(path / "model.safetensors"), path
    if (path / "final_model.safetensors").is_file():
        return _load_weights_file(path / "final_model.safetensors"), path
    reason = verify_checkpoint(path)
    if reason:
        raise ConfigError(f"refusing checkpoint: {reason}")
    if (path / "model.safetensors").is_file():
        return _load_weights_file(path / "model.safetensors"), path
    if (path / "pytorch_model").is_dir():  # DeepSpeed: ZeRO shards of the generator engine
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return _strip_prefix(get_fp32_state_dict_from_zero_checkpoint(str(path), tag="pytorch_model")), path
    raise ConfigError(f"checkpoint '{path}' holds no generator weights (model.safetensors or pytorch_model/)")


def _load_weights_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _strip_prefix(load_file(str(path)))
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    return _strip_prefix(obj.get("state_dict", obj) if isinstance(obj, dict) else obj)
