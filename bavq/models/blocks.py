"""Layers shared by the VQ-VAE and the VQ-GAN, and the common autoencoder API.

Every normalization here is a GroupNorm, which normalizes each sample on its own: the models
contain no batch-dependent layer, so R ranks with a batch of B each compute exactly what one
process computes on the concatenated batch of R*B (the distributed exactness tests rely on it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """taming's GroupNorm(32, eps=1e-6), with fewer groups when ``channels`` is not a multiple of 32.

    The group count is gcd(max_groups, channels), so tiny test widths (16 channels -> 16 groups)
    and odd widths (48 -> 16) build instead of failing.
    """
    return nn.GroupNorm(math.gcd(max_groups, channels), channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice with dropout in between, plus a 1x1 shortcut when widths differ."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
                         else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions (taming's AttnBlock)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # (B, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C), as in taming
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv with taming's asymmetric (0, 1, 0, 1) padding: exactly halves even sizes."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 conv (no checkerboard artefacts of transposed convs)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class OutputConv(nn.Conv2d):
    """The decoder's final conv; it keeps its (detached) input of the latest forward with gradients,
    so the gradient of a loss w.r.t. its weight can be formed from the gradient w.r.t. the image
    (:meth:`VQAutoencoder.last_layer_grad`) without an ``autograd.grad`` through the wrapped model."""

    last_input: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.last_input = x.detach() if torch.is_grad_enabled() else None
        return super().forward(x)


class VQAutoencoder(nn.Module):
    """encoder -> injected quantizer -> decoder, with the LlamaGen / taming tokenizer API.

    Subclasses set ``self.encoder`` (image -> (B, code_dim, h, w)) and ``self.decoder`` (whose final
    conv is ``self.decoder.conv_out``). The quantizer follows the bavq contract and owns the codebook.
    """

    quantizer: nn.Module
    encoder: nn.Module
    decoder: nn.Module

    def encode(self, x: Tensor) -> Tensor:
        """Pre-quantization latents z, (B, code_dim, h, w)."""
        return self.encoder(x)

    def quantize(self, z: Tensor):
        """The quantizer's QuantizerOutput (quantized, indices, loss, metrics) for latents z."""
        return self.quantizer(z)

    def decode(self, quantized: Tensor) -> Tensor:
        """Image from quantized latents (B, code_dim, h, w)."""
        return self.decoder(quantized)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Image from code indices (B, h, w)."""
        return self.decode(self.quantizer.decode_indices(indices))

    def forward(self, x: Tensor):
        """(reconstruction, QuantizerOutput); gradients reach the encoder through the straight-through
        estimator of the quantizer."""
        out = self.quantize(self.encode(x))
        return self.decode(out.quantized), out

    def last_layer(self) -> nn.Parameter:
        """Weight of the decoder's final conv (taming's adaptive GAN weight is measured on it)."""
        return self.decoder.conv_out.weight

    def last_layer_grad(self, recon_leaf: Tensor):
        """``loss -> d loss / d last_layer()`` for losses computed on ``recon_leaf``, a detached
        ``requires_grad`` copy of this model's latest reconstruction.

        The decoder output *is* the final conv's output, so d loss / d W is the conv weight-gradient
        of (its input, d loss / d image). Forming it this way keeps ``autograd.grad`` out of the
        wrapped model: DDP's and DeepSpeed ZeRO-2's gradient hooks must only run in the real
        backward (ZeRO-2 fails with an IndexError in reduce_ipg_grads otherwise).
        """
        conv = self.decoder.conv_out
        if conv.last_input is None:
            raise RuntimeError("last_layer_grad needs a forward with gradients enabled first")
        inp = conv.last_input

        def grad_of(loss: Tensor) -> Tensor:
            grad_image = torch.autograd.grad(loss, recon_leaf, retain_graph=True)[0]
            return torch.nn.grad.conv2d_weight(inp, conv.weight.shape, grad_image.to(inp.dtype), stride=conv.stride,
                                               padding=conv.padding, dilation=conv.dilation, groups=conv.groups)

        return grad_of

    @property
    def code_dim(self) -> int:
        return int(self.quantizer.code_dim)

    @property
    def num_codes(self) -> int:
        return int(self.quantizer.num_codes)


def check_channel_mult(channel_mult, base_channels: int) -> tuple[int, ...]:
    """Validate the width multipliers; raise a one-line ValueError on user mistakes."""
    mult = tuple(int(m) for m in channel_mult)
    if not mult or any(m < 1 for m in mult):
        raise ValueError(f"channel_mult must be a non-empty list of positive integers, got {channel_mult}")
    if base_channels < 1:
        raise ValueError(f"base_channels must be >= 1, got {base_channels}")
    return mult


def quantizer_code_dim(quantizer: nn.Module) -> int:
    """The quantizer's code_dim, with a clear message when the injected object is not a quantizer."""
    code_dim = getattr(quantizer, "code_dim", None)
    if not isinstance(code_dim, int) or code_dim < 1 or not hasattr(quantizer, "decode_indices"):
        raise ValueError("quantizer must follow the bavq contract (int code_dim, num_codes, decode_indices)")
    return code_dim


