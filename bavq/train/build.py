"""What the loop trains, built from the config and prepared by the Accelerator: the generator
(encoder, quantizer, decoder), the optional PatchGAN discriminator, one AdamW each, the generator
loss (with LPIPS when on) and the optional weight EMA. Under DeepSpeed each of the two models gets
its own engine (one named plugin each, selected before its ``prepare``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bavq.config import Config
from bavq.losses import GeneratorLoss
from bavq.models import build_discriminator, build_model, compile_autoencoder
from bavq.quantizers import build_quantizer


@dataclass
class TrainingParts:
    model: nn.Module  # the prepared generator (DDP module or DeepSpeed engine)
    opt_g: torch.optim.Optimizer
    disc: nn.Module | None  # the prepared discriminator; None without the GAN loss
    opt_d: torch.optim.Optimizer | None
    gen_loss: GeneratorLoss
    ema: nn.Module | None  # timm ModelEmaV3 of the unwrapped generator (train.ema_decay > 0)
    input_dtype: torch.dtype | None  # bf16 for DeepSpeed bf16 engines; None: batches as loaded


def select_engine(accelerator, cfg: Config, name: str) -> None:
    """Make the generator's ("gen") or the discriminator's ("disc") DeepSpeed plugin the active one."""
    if cfg.train.backend == "deepspeed":
        accelerator.state.select_deepspeed_plugin(name)


def build_parts(cfg: Config, accelerator) -> TrainingParts:
    """Build and prepare everything the loop trains; seeds torch for this rank's own draws afterwards."""
    torch.manual_seed(cfg.train.seed)  # identical initial weights and codebook on every rank
    quantizer = build_quantizer(cfg.quantizer, seed=cfg.train.seed, usage_window=cfg.log.usage_window)
    quantizer.auto_update = cfg.train.grad_accum == 1
    model = build_model(cfg.model, cfg.quantizer, quantizer, image_size=cfg.data.image_size)
    if cfg.train.compile:
        compile_autoencoder(model, cfg.train.compile_backend)
    disc = build_discriminator(cfg.model, cfg.loss)
    perceptual = None
    if cfg.loss.perceptual_weight > 0:
        from bavq.models.perceptual import LPIPS

        perceptual = LPIPS.from_file(cfg.loss.lpips_weights)
    gen_loss = GeneratorLoss(cfg.loss, perceptual).to(accelerator.device)
    betas = tuple(cfg.train.adam_betas)
    opt_g = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=betas, weight_decay=cfg.train.weight_decay)
    select_engine(accelerator, cfg, "gen")
    model, opt_g = accelerator.prepare(model, opt_g)
    opt_d = None
    if disc is not None:
        opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.train.disc_lr, betas=betas,
                                  weight_decay=cfg.train.weight_decay)
        select_engine(accelerator, cfg, "disc")
        disc, opt_d = accelerator.prepare(disc, opt_d)
        select_engine(accelerator, cfg, "gen")
    deepspeed_bf16 = cfg.train.backend == "deepspeed" and cfg.train.mixed_precision == "bf16"
    ema = None
    if cfg.train.ema_decay > 0:
        from timm.utils import ModelEmaV3

        # parameters are averaged; codebook buffers are copied (an averaged codebook would not
        # match the statistics that produced it)
        ema = ModelEmaV3(accelerator.unwrap_model(model), decay=cfg.train.ema_decay, exclude_buffers=True)
    # From here on each rank draws its own model randomness (dropout masks): identical masks on
    # every rank would make R ranks a copy of one. Codebook draws (data init, restarts) use the
    # quantizer's shared generator and stay identical on all ranks. Resumes restore these states.
    torch.manual_seed(cfg.train.seed + 1_000_003 * accelerator.process_index)
    return TrainingParts(model, opt_g, disc, opt_d, gen_loss, ema, torch.bfloat16 if deepspeed_bf16 else None)
