"""DeepSpeed ZeRO-2 through Accelerate's multi-plugin API: one engine for the generator, one for
the discriminator (one Accelerator holds one engine per plugin; see DESIGN.md).

The DeepSpeed JSON (``train.deepspeed_config``, e.g. launch/deepspeed/zero2.json) supplies ZeRO and
clipping settings; the fields that must agree with our config (micro-batch, accumulation,
precision, clipping) are filled in here so the two never disagree silently.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from bavq import dist
from bavq.config import Config, ConfigError

DEFAULT_ZERO2 = {
    "zero_optimization": {
        "stage": 2,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "allgather_bucket_size": 2e8,
        "reduce_bucket_size": 2e8,
    },
    "gradient_clipping": "auto",
    "steps_per_print": 1000000,
    "wall_clock_breakdown": False,
}


def load_deepspeed_json(path: str) -> dict:
    if not path:
        return copy.deepcopy(DEFAULT_ZERO2)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"train.deepspeed_config: '{p}' does not exist")
    try:
        return json.loads(p.read_text())
    except ValueError as exc:
        raise ConfigError(f"train.deepspeed_config: '{p}' is not valid JSON ({exc})") from None


def resolved_deepspeed_dict(cfg: Config, base: dict) -> dict:
    """Fill batch, accumulation, precision and clipping from our config (ours wins over 'auto')."""
    t = cfg.train
    if t.mixed_precision == "fp16":
        # fp16 needs a loss scaler per engine; bf16 or fp32 are the supported precisions here
        raise ConfigError("train.mixed_precision=fp16 is not supported with train.backend=deepspeed; use bf16 or no")
    d = copy.deepcopy(base)
    d["train_micro_batch_size_per_gpu"] = t.batch_size
    d["gradient_accumulation_steps"] = t.grad_accum
    d["train_batch_size"] = t.batch_size * t.grad_accum * dist.launcher_world_size()
    if d.get("gradient_clipping", "auto") == "auto":
        d["gradient_clipping"] = t.grad_clip
    d["bf16"] = {"enabled": t.mixed_precision == "bf16"}
    d["fp16"] = {"enabled": False}
    stage = d.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"train.deepspeed_config: ZeRO stage {stage} is not supported (use 0, 1 or 2)")
    return d


def pending_cpu_extension_build() -> str | None:
    """The folder where DeepSpeed on CPU will JIT-compile its shared-memory comm op when the process
    group starts (1–2 minutes without a word, once per TORCH_EXTENSIONS_DIR), or None when it is
    already built, not needed or not buildable here."""
    import torch

    if torch.cuda.is_available():
        return None
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from torch.utils.cpp_extension import _get_build_directory  # the folder torch's JIT load uses

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            return None
        folder = Path(_get_build_directory(builder.NAME, verbose=False))
    except Exception:  # noqa: BLE001 - an announcement must never stop a run
        return None
    return None if any(folder.glob(f"{builder.NAME}*.so")) else str(folder)


def announce_extension_build() -> None:
    """One line before the silent first-launch build (local rank 0 of each machine builds it)."""
    folder = pending_cpu_extension_build()
    if folder is not None and dist.launcher_local_rank() == 0:
        print(f"bavq: DeepSpeed is compiling its CPU comm extension into {folder} (first launch only, "
              "about 1-2 minutes; set TORCH_EXTENSIONS_DIR to keep it per project)", file=sys.stderr, flush=True)


def deepspeed_plugins(cfg: Config) -> dict:
    """{'gen': plugin, 'disc': plugin} (disc only when the GAN loss is on)."""
    try:
        import deepspeed  # noqa: F401
        from accelerate.utils import DeepSpeedPlugin
    except ImportError:
        raise ConfigError("train.backend=deepspeed needs DeepSpeed: pip install -e '.[deepspeed]'") from None
    announce_extension_build()  # the Accelerator built with these plugins starts the process group
    gen = load_deepspeed_json(cfg.train.deepspeed_config)
    plugins = {"gen": DeepSpeedPlugin(hf_ds_config=resolved_deepspeed_dict(cfg, gen))}
    if cfg.loss.disc_weight > 0:
        disc = load_deepspeed_json(cfg.train.deepspeed_disc_config) if cfg.train.deepspeed_disc_config else gen
        plugins["disc"] = DeepSpeedPlugin(hf_ds_config=resolved_deepspeed_dict(cfg, disc))
    return plugins
