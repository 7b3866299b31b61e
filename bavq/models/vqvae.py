"""Small convolutional VQ-VAE for 32x32 images (van den Oord et al. 2017, with GroupNorm ResNet blocks).

Down-sampling rule: **every stage opens with a stride-2 4x4 conv**, so the down-sampling factor is
f = 2 ** len(channel_mult). The default channel_mult=(1, 2) therefore maps 32x32 images to 8x8
codes (two stride-2 convs), like the original CIFAR-10 VQ-VAE. The decoder mirrors it with stride-2
4x4 transposed convs. Image sides must be multiples of f.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import OutputConv, ResnetBlock, VQAutoencoder, check_channel_mult, group_norm, quantizer_code_dim


class VQVAEEncoder(nn.Module):
    """(B, in_channels, H, W) -> (B, code_dim, H / f, W / f) with f = 2 ** len(channel_mult)."""

    def __init__(self, in_channels: int, code_dim: int, widths: Sequence[int], num_res_blocks: int,
                 dropout: float):
        super().__init__()
        stages, prev = [], in_channels
        for width in widths:
            layers = [nn.Conv2d(prev, width, 4, stride=2, padding=1)]
            layers += [ResnetBlock(width, width, dropout) for _ in range(num_res_blocks)]
            stages.append(nn.Sequential(*layers))
            prev = width
        self.stages = nn.Sequential(*stages)
        self.norm_out = group_norm(prev)
        self.conv_out = nn.Conv2d(prev, code_dim, 3, padding=1)  # straight to code_dim: no projection later

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.stages(x))))


class VQVAEDecoder(nn.Module):
    """(B, code_dim, h, w) -> (B, out_channels, h * f, w * f); mirror of :class:`VQVAEEncoder`."""

    def __init__(self, out_channels: int, code_dim: int, widths: Sequence[int], num_res_blocks: int,
                 dropout: float):
        super().__init__()
        widths = list(widths)
        self.conv_in = nn.Conv2d(code_dim, widths[-1], 3, padding=1)
        stages = []
        for i in reversed(range(len(widths))):
            layers = [ResnetBlock(widths[i], widths[i], dropout) for _ in range(num_res_blocks)]
            layers.append(nn.ConvTranspose2d(widths[i], widths[max(i - 1, 0)], 4, stride=2, padding=1))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.norm_out = group_norm(widths[0])
        self.conv_out = OutputConv(widths[0], out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.stages(self.conv_in(z)))))


class VQVAE(VQAutoencoder):
    """Small conv VQ-VAE around an injected quantizer (which owns the codebook).

    Args:
        quantizer: a bavq quantizer (``num_codes``, ``code_dim``, ``forward``, ``decode_indices``);
            the encoder emits exactly ``quantizer.code_dim`` channels.
        in_channels: image channels (1 or 3).
        base_channels: width of the first stage; stage i has ``base_channels * channel_mult[i]``.
        channel_mult: one entry per stage; each stage halves the resolution (f = 2 ** len).
        num_res_blocks: residual blocks per stage, in the encoder and in the decoder.
        dropout: dropout inside the residual blocks.
    """

    def __init__(self, quantizer: nn.Module, in_channels: int = 3, base_channels: int = 64,
                 channel_mult: Sequence[int] = (1, 2), num_res_blocks: int = 2, dropout: float = 0.0):
        super().__init__()
        code_dim = quantizer_code_dim(quantizer)
        mult = check_channel_mult(channel_mult, base_channels)
        widths = [base_channels * m for m in mult]
        self.downsample_factor = 2 ** len(mult)
        self.encoder = VQVAEEncoder(in_channels, code_dim, widths, num_res_blocks, dropout)
        self.quantizer = quantizer
        self.decoder = VQVAEDecoder(in_channels, code_dim, widths, num_res_blocks, dropout)
