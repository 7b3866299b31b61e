"""DeepSpeed ZeRO-2 through Accelerate's multi-plugin API: one engine for the generator, one for
the discriminator (one Accelerator holds one engine per plugin; see DESIGN.md).

The DeepSpeed JSON (``train.deepspeed_config``, e.g. launch/deepspeed/zero2.json) supplies ZeRO and
clipping settings; the fields that must agree with our config (micro-batch, accumulation,
precision, clipping) are filled in here so the two never disagree silently.
"""

from __future__ import annotations

import copy
import json
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


def deepspeed_plugins(cfg: Config) -> dict:
    """{'gen': plugin, 'disc': plugin} (disc only when the GAN loss is on)."""
    try:
        import deepspeed  # noqa: F401
        from accelerate.utils import DeepSpeedPlugin
    except ImportError:
        raise ConfigError("train.backend=deepspeed needs DeepSpeed: pip install -e '.[deepspeed]'") from None
    gen = load_deepspeed_json(cfg.train.deepspeed_config)
    plugins = {"gen": DeepSpeedPlugin(hf_ds_config=resolved_deepspeed_dict(cfg, gen))}
    if cfg.loss.disc_weight > 0:
        disc = load_deepspeed_json(cfg.train.deepspeed_disc_config) if cfg.train.deepspeed_disc_config else gen
        plugins["disc"] = DeepSpeedPlugin(hf_ds_config=resolved_deepspeed_dict(cfg, disc))
    return plugins
