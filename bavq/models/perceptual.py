"""LPIPS perceptual distance (Zhang et al. 2018, VGG16 variant) loaded from ONE local weights file.

Nothing is ever downloaded: clusters keep weights on disk and these machines have no network.

Expected file (safetensors, or a torch ``.pt``/``.pth`` holding a plain state dict), keys exactly:

* ``features.{i}.weight`` / ``features.{i}.bias`` for the 13 convs of torchvision's VGG16
  ``features`` (i in 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), as in torchvision's
  ``vgg16-397923af.pth``;
* ``lin{j}.weight`` of shape (1, C_j, 1, 1) for j = 0..4 (C = 64, 128, 256, 512, 512): the LPIPS
  linear heads, called ``lin{j}.model.1.weight`` in the ``lpips`` package's ``weights/v0.1/vgg.pth``.

:func:`convert_lpips_weights` builds that file from the two original files.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.vgg import cfgs, make_layers

CONFIG_KEY = "loss.lpips_weights"
TAP_LAYERS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16.features
TAP_CHANNELS = (64, 128, 256, 512, 512)
# lpips' ScalingLayer: maps [-1, 1] inputs to ImageNet-normalized VGG inputs.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG16 distance; always in eval mode. Build it with :meth:`from_file`.

    ``LPIPS()`` alone has random weights (only useful for tests and for :meth:`from_file`).
    """

    def __init__(self):
        super().__init__()
        # make_layers(cfgs["D"]) is exactly torchvision.models.vgg16(weights=None).features, without
        # building (and randomly initializing) the 120M-parameter classifier we never use.
        self.features = make_layers(cfgs["D"], batch_norm=False)
        for j, channels in enumerate(TAP_CHANNELS):
            self.add_module(f"lin{j}", nn.Conv2d(channels, 1, 1, bias=False))
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path) -> LPIPS:
        """Load all weights (VGG16 features + linear heads) from one local file; see the module doc."""
        path = Path(path) if path else None
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"{CONFIG_KEY}: LPIPS weights file '{path or ''}' not found; expected one safetensors or "
                "torch state dict with VGG16 'features.*' and LPIPS 'lin0..lin4.weight' keys "
                "(build it with bavq.models.perceptual.convert_lpips_weights)")
        model = cls()
        state = _load_state_dict(path)
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"{CONFIG_KEY}: '{path}' is not an LPIPS-VGG16 weights file "
                             f"(missing keys: {missing[:3]}, unexpected keys: {unexpected[:3]})")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:  # shape mismatches
            raise ValueError(f"{CONFIG_KEY}: '{path}': {str(exc).strip().splitlines()[-1].strip()}") from None
        return model

    def train(self, mode: bool = True) -> LPIPS:
        # Frozen metric network: stay in eval mode even when a parent module calls .train().
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-image distance (B,) between images x and y in [-1, 1], (B, C, H, W) with C = 1 or 3."""
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(x.shape)} and {tuple(y.shape)}")
        feats_x, feats_y = self._taps(x), self._taps(y)
        total = x.new_zeros(x.shape[0])
        for j, (fx, fy) in enumerate(zip(feats_x, feats_y)):
            diff = (_unit_normalize(fx) - _unit_normalize(fy)) ** 2
            total = total + getattr(self, f"lin{j}")(diff).mean(dim=(1, 2, 3))
        return total

    def _taps(self, x: Tensor) -> list[Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale images: same value in R, G, B
        h = (x - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.features[: TAP_LAYERS[-1] + 1]):
            h = layer(h)
            if i in TAP_LAYERS:
                taps.append(h)
        return taps


def _unit_normalize(feat: Tensor, eps: float = 1e-10) -> Tensor:
    # lpips.normalize_tensor: unit length along channels at every position.
    return feat / (torch.sqrt(torch.sum(feat**2, dim=1, keepdim=True)) + eps)


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"'{path}' does not hold a state dict (got {type(state).__name__})")
    return state


def convert_lpips_weights(vgg_path: str | Path, lin_path: str | Path, out_path: str | Path) -> Path:
    """Merge torchvision's VGG16 weights (``vgg16-397923af.pth``) and the ``lpips`` package's linear
    heads (``weights/v0.1/vgg.pth``) into the one file :meth:`LPIPS.from_file` reads.

    ``out_path`` ending in ``.safetensors`` writes safetensors, anything else a torch state dict.
    The classifier of VGG16 is dropped. Returns ``out_path``.
    """
    vgg = _load_state_dict(Path(vgg_path))
    lin = _load_state_dict(Path(lin_path))
    merged = {k: v for k, v in vgg.items() if k.startswith("features.")}
    for j in range(len(TAP_CHANNELS)):
        key = next((k for k in (f"lin{j}.model.1.weight", f"lin{j}.weight") if k in lin), None)
        if key is None:
            raise ValueError(f"'{lin_path}' has no 'lin{j}.model.1.weight': not an lpips vgg.pth file")
        merged[f"lin{j}.weight"] = lin[key]
    expected = set(LPIPS().state_dict())
    if set(merged) != expected:
        raise ValueError(f"'{vgg_path}' is not a torchvision VGG16 state dict "
                         f"(missing: {sorted(expected - set(merged))[:3]})")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    merged = {k: v.detach().float().contiguous() for k, v in merged.items()}
    if out_path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(merged, str(out_path))
    else:
        torch.save(merged, out_path)
    return out_path
