"""taming-transformers style VQ-GAN encoder / decoder (Esser et al. 2021) around an injected quantizer.

Down-sampling rule: every stage except the last ends with a stride-2 conv (equivalently, each
stage after the first runs at half the previous resolution), so f = 2 ** (len(channel_mult) - 1):
f8 with 4 stages, f16 with 5 (taming's (1, 1, 2, 2, 4)). Self-attention runs at the resolutions
in ``attn_resolutions`` and always at the lowest one (resolution // f); the middle blocks are
ResBlock-Attn-ResBlock.

Differences from taming, on purpose: the encoder's output conv emits ``code_dim`` channels directly
and the decoder's input conv reads them (no quant_conv / post_quant_conv, because the quantizer
contract says the model, not the quantizer, sets the code dimension); GroupNorm groups adapt to
narrow widths (see :func:`bavq.models.blocks.group_norm`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import (
    AttnBlock,
    Downsample,
    OutputConv,
    ResnetBlock,
    Upsample,
    VQAutoencoder,
    check_channel_mult,
    group_norm,
    quantizer_code_dim,
)


def _stage(in_ch: int, out_ch: int, num_blocks: int, attn: bool, dropout: float) -> nn.ModuleList:
    blocks = nn.ModuleList()
    for j in range(num_blocks):
        blocks.append(ResnetBlock(in_ch if j == 0 else out_ch, out_ch, dropout))
        if attn:
            blocks.append(AttnBlock(out_ch))
    return blocks


def _mid(channels: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResnetBlock(channels, channels, dropout), AttnBlock(channels),
                         ResnetBlock(channels, channels, dropout))


class VQGANEncoder(nn.Module):
    """(B, in_channels, R, R) -> (B, code_dim, R / f, R / f)."""

    def __init__(self, in_channels: int, code_dim: int, base_channels: int, mult: Sequence[int],
                 num_res_blocks: int, attn_at: set[int], resolution: int, dropout: float):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        res, prev = resolution, base_channels
        for i, m in enumerate(mult):
            stage = _stage(prev, base_channels * m, num_res_blocks, res in attn_at, dropout)
            prev = base_channels * m
            if i != len(mult) - 1:
                stage.append(Downsample(prev))
                res //= 2
            self.down.append(stage)
        self.mid = _mid(prev, dropout)
        self.norm_out = group_norm(prev)
        self.conv_out = nn.Conv2d(prev, code_dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for layer in stage:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class VQGANDecoder(nn.Module):
    """(B, code_dim, r, r) -> (B, out_channels, r * f, r * f); num_res_blocks + 1 blocks per stage."""

    def __init__(self, out_channels: int, code_dim: int, base_channels: int, mult: Sequence[int],
                 num_res_blocks: int, attn_at: set[int], resolution: int, dropout: float):
        super().__init__()
        prev = base_channels * mult[-1]
        res = resolution // 2 ** (len(mult) - 1)
        self.conv_in = nn.Conv2d(code_dim, prev, 3, padding=1)
        self.mid = _mid(prev, dropout)
        self.up = nn.ModuleList()  # applied from the lowest resolution upwards
        for i in reversed(range(len(mult))):
            stage = _stage(prev, base_channels * mult[i], num_res_blocks + 1, res in attn_at, dropout)
            prev = base_channels * mult[i]
            if i != 0:
                stage.append(Upsample(prev))
                res *= 2
            self.up.append(stage)
        self.norm_out = group_norm(prev)
        self.conv_out = OutputConv(prev, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for stage in self.up:
            for layer in stage:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGAN(VQAutoencoder):
    """taming-style VQ-GAN tokenizer (the discriminator and losses live outside the model).

    Args:
        quantizer: a bavq quantizer; the encoder emits exactly ``quantizer.code_dim`` channels.
        in_channels: image channels.
        base_channels: width of the first stage; stage i has ``base_channels * channel_mult[i]``.
        channel_mult: one entry per stage; f = 2 ** (len(channel_mult) - 1).
        num_res_blocks: residual blocks per encoder stage (the decoder has one more, as in taming).
        attn_resolutions: feature-map sides with self-attention (the lowest side always has it).
        resolution: training image side; only decides where attention goes (other sides that are
            multiples of f also run, with attention placed as for ``resolution``).
        dropout: dropout inside the residual blocks.
    """

    def __init__(self, quantizer: nn.Module, in_channels: int = 3, base_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), resolution: int = 256, dropout: float = 0.0):
        super().__init__()
        code_dim = quantizer_code_dim(quantizer)
        mult = check_channel_mult(channel_mult, base_channels)
        self.downsample_factor = 2 ** (len(mult) - 1)
        if resolution < self.downsample_factor or resolution % self.downsample_factor:
            raise ValueError(f"resolution {resolution} must be a multiple of the down-sampling factor "
                             f"{self.downsample_factor} (2 ** (len(channel_mult) - 1))")
        attn_at = {int(r) for r in attn_resolutions} | {resolution // self.downsample_factor}
        args = (code_dim, base_channels, mult, num_res_blocks, attn_at, resolution, dropout)
        self.encoder = VQGANEncoder(in_channels, *args)
        self.quantizer = quantizer
        self.decoder = VQGANDecoder(in_channels, *args)
