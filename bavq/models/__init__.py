"""Tokenizer models (the quantizer is injected), the PatchGAN discriminator and LPIPS.

Nothing here imports training code, Accelerate or DeepSpeed.
"""

from __future__ import annotations

from torch import nn

from bavq.config import Config, ConfigError, LossConfig, ModelConfig, QuantizerConfig

from .discriminator import NLayerDiscriminator
from .perceptual import LPIPS, convert_lpips_weights
from .vqgan import VQGAN
from .vqvae import VQVAE

__all__ = ["LPIPS", "NLayerDiscriminator", "VQGAN", "VQVAE", "build_discriminator", "build_model",
           "compile_autoencoder", "convert_lpips_weights", "plain_generator"]


def build_model(cfg: ModelConfig, quantizer_cfg: QuantizerConfig, quantizer: nn.Module, *,
                image_size: int) -> nn.Module:
    """The tokenizer named by ``cfg.arch`` (the ``model`` section, validated here) around ``quantizer``.

    ``quantizer`` must have the ``quantizer_cfg.code_dim`` its config section says; ``image_size``
    (data.image_size) must be a multiple of the down-sampling factor and is the VQ-GAN's ``resolution``.
    """
    cfg.validate()
    if getattr(quantizer, "code_dim", None) != quantizer_cfg.code_dim:
        raise ConfigError(f"config key 'quantizer.code_dim': is {quantizer_cfg.code_dim} but the quantizer "
                          f"has code_dim {getattr(quantizer, 'code_dim', None)}")
    common = dict(in_channels=cfg.in_channels, base_channels=cfg.base_channels,
                  channel_mult=tuple(cfg.channel_mult), num_res_blocks=cfg.num_res_blocks, dropout=cfg.dropout)
    n = len(cfg.channel_mult)
    factor = 2 ** n if cfg.arch == "vqvae" else 2 ** (n - 1)
    if image_size % factor:
        raise ConfigError(f"config key 'data.image_size': {image_size} is not a multiple of the "
                          f"{cfg.arch} down-sampling factor {factor} (model.channel_mult {cfg.channel_mult})")
    if cfg.arch == "vqvae":
        return VQVAE(quantizer, **common)
    return VQGAN(quantizer, attn_resolutions=tuple(cfg.attn_resolutions), resolution=image_size, **common)


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
        model = build_model(cfg.model, cfg.quantizer, build_quantizer(cfg.quantizer), image_size=cfg.data.image_size)
    fp32 = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(fp32, strict=False)
    if missing or unexpected:
        raise ConfigError(f"weights do not fit the config's model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.float().to(device).eval()


def build_discriminator(cfg: ModelConfig, loss: LossConfig) -> nn.Module | None:
    """PatchGAN from the ``model`` section's disc_* fields, or None when the GAN loss is off
    (``loss.disc_weight == 0``)."""
    if loss.disc_weight == 0:
        return None
    return NLayerDiscriminator(cfg.in_channels, cfg.disc_channels, cfg.disc_layers)
