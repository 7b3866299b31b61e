"""PatchGAN discriminator (pix2pix / taming ``NLayerDiscriminator``) without BatchNorm.

taming uses BatchNorm here; we use GroupNorm (or no norm) instead because BatchNorm
(1) normalizes with statistics of the per-rank batch, so R ranks x B images no longer equal one
process x R*B images (the exactness tests and the comparability of runs across GPU counts break),
(2) keeps running statistics in buffers that DDP with ``broadcast_buffers=False`` lets drift apart
across ranks, and SyncBatchNorm does not work under DeepSpeed, and (3) sees the real and the fake
batch in separate forward passes, so its statistics themselves tell real from fake.
"""

from __future__ import annotations

from torch import Tensor, nn

from .blocks import group_norm


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return group_norm(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"discriminator norm must be 'group' or 'none', got '{kind}'")


class NLayerDiscriminator(nn.Module):
    """PatchGAN: ``n_layers`` stride-2 4x4 convs, one stride-1 conv, then a 1-channel logit map.

    A 256x256 image gives (B, 1, 30, 30) logits with n_layers=3; a 32x32 image gives (B, 1, 2, 2).

    Args:
        in_channels: image channels.
        channels: width of the first layer (doubles per layer, capped at 8x).
        n_layers: number of stride-2 layers.
        norm: "group" (GroupNorm, default) or "none".
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm: str = "group"):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        use_bias = norm == "none"  # an affine norm right after the conv makes the conv bias redundant
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last widening conv keeps the resolution (pix2pix)
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=use_bias),
                       _norm(norm, channels * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, 1, h, w) patch logits."""
        return self.main(x)


def _init_weights(module: nn.Module) -> None:
    # pix2pix / taming init: conv weights N(0, 0.02); norm scales N(1, 0.02), shifts 0.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
