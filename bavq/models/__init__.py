"""Tokenizer models (the quantizer is injected), the PatchGAN discriminator and LPIPS.

Nothing here imports training code, Accelerate or DeepSpeed.
"""

from __future__ import annotations

from torch import nn

from bavq.config import Config, ConfigError

from .discriminator import NLayerDiscriminator
from .perceptual import LPIPS, convert_lpips_weights
from .vqgan import VQGAN
from .vqvae import VQVAE

__all__ = ["LPIPS", "NLayerDiscriminator", "VQGAN", "VQVAE", "build_discriminator", "build_lpips",
           "build_model", "compile_autoencoder", "convert_lpips_weights", "plain_generator"]


def build_model(cfg: Config, quantizer: nn.Module) -> nn.Module:
    """The tokenizer named by ``cfg.model.arch`` around ``quantizer``.

    Widths and depths come from ``cfg.model``; the VQ-GAN's ``resolution`` is ``cfg.data.image_size``.
    """
    m = cfg.model
    if getattr(quantizer, "code_dim", None) != cfg.quantizer.code_dim:
        raise ConfigError(f"config key 'quantizer.code_dim': is {cfg.quantizer.code_dim} but the quantizer "
                          f"has code_dim {getattr(quantizer, 'code_dim', None)}")
    common = dict(in_channels=m.in_channels, base_channels=m.base_channels,
                  channel_mult=tuple(m.channel_mult), num_res_blocks=m.num_res_blocks, dropout=m.dropout)
    n = len(m.channel_mult)
    factor = 2 ** n if m.arch == "vqvae" else 2 ** (n - 1)
    if cfg.data.image_size % factor:
        raise ConfigError(f"config key 'data.image_size': {cfg.data.image_size} is not a multiple of the "
                          f"{m.arch} down-sampling factor {factor} (model.channel_mult {m.channel_mult})")
    if m.arch == "vqvae":
        return VQVAE(quantizer, **common)
    if m.arch == "vqgan":
        return VQGAN(quantizer, attn_resolutions=tuple(m.attn_resolutions), resolution=cfg.data.image_size,
                     **common)
    raise ConfigError(f"config key 'model.arch': '{m.arch}' is not one of vqvae, vqgan")


def compile_autoencoder(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """``torch.compile`` the encoder and the decoder of ``model`` in place and return it.

    ``nn.Module.compile`` keeps parameter names (no ``_orig_mod.`` prefix), so checkpoints, exports and
    ``plain_generator`` are unchanged. The quantizer stays eager: its distances and statistics must run
    in fp32 with autocast off, and its data-dependent steps (data init, restarts, all-reduces) would
    only break graphs.
    """
    model.encoder.compile(backend=backend)
    model.decoder.compile(backend=backend)
    return model


def plain_generator(cfg: Config, state: dict, device="cpu") -> nn.Module:
    """A plain fp32 tokenizer (no DDP / DeepSpeed wrapper) holding ``state`` in eval mode on ``device``.

    ``state`` may come from any backend (DDP, DeepSpeed bf16 or ZeRO shards consolidated, an export):
    floating tensors are loaded as fp32, so evaluation never depends on how the weights were trained.
    A state that does not fit the config's model is a user error (wrong config or checkpoint).
    """
    import torch

    from bavq.quantizers import build_quantizer

    with torch.device("cpu"):  # built on the host (the codebook's generator is a CPU one), then moved
        model = build_model(cfg, build_quantizer(cfg.quantizer))
    fp32 = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(fp32, strict=False)
    if missing or unexpected:
        raise ConfigError(f"weights do not fit the config's model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.float().to(device).eval()


def build_discriminator(cfg: Config) -> nn.Module | None:
    """PatchGAN from cfg.model.disc_*, or None when the GAN loss is off (loss.disc_weight == 0)."""
    if cfg.loss.disc_weight == 0:
        return None
    return NLayerDiscriminator(cfg.model.in_channels, cfg.model.disc_channels, cfg.model.disc_layers)


def build_lpips(cfg: Config) -> LPIPS | None:
    """LPIPS from the local file loss.lpips_weights, or None when loss.perceptual_weight == 0."""
    if cfg.loss.perceptual_weight == 0:
        return None
    return LPIPS.from_file(cfg.loss.lpips_weights)
