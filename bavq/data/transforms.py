"""Image transforms: the readers' (channels, crop/resize, flip, scaling to [-1, 1]) and bavq-prep's encoding.

The random choices take an explicit ``torch.Generator`` instead of the global RNG that
torchvision's random transforms use. That is what makes map-style epochs exactly reproducible
per (seed, epoch, index) whatever the number of ranks and workers, and what lets each shard
reader worker own a stream seeded from (seed, rank, worker, resume step).
The pixel work itself is torchvision's (``transforms.v2.functional``), on PIL images or tensors.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError

from bavq.config import DataConfig

# torchvision's RandomResizedCrop defaults
_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def _size_of(image) -> tuple[int, int]:
    """(height, width) of a PIL image or a (C, H, W) tensor."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[-2]), int(image.shape[-1])


def random_resized_crop_params(height: int, width: int, scale: tuple[float, float],
                               generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random-resized crop: torchvision's algorithm with an explicit generator."""
    area = height * width
    log_ratio = (math.log(_RATIO[0]), math.log(_RATIO[1]))
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target_area = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    # fallback: the largest centred crop within the ratio bounds (as torchvision does)
    in_ratio = width / height
    if in_ratio < _RATIO[0]:
        w, h = width, int(round(width / _RATIO[0]))
    elif in_ratio > _RATIO[1]:
        h, w = height, int(round(height * _RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _set_channels(image, channels: int):
    if isinstance(image, Image.Image):
        mode = "L" if channels == 1 else "RGB"
        return image if image.mode == mode else image.convert(mode)
    if image.shape[0] == channels:
        return image
    if channels == 3:  # grayscale tensor -> 3 identical channels
        return image[:1].expand(3, -1, -1)
    return TF.rgb_to_grayscale(image[:3], num_output_channels=1)


def to_unit_range(image) -> torch.Tensor:
    """uint8 PIL image or tensor -> float32 (C, H, W) in [-1, 1]."""
    if isinstance(image, Image.Image):  # "L" or "RGB": one byte per channel; (H, W, C) view, no numpy copy
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        image = pixels.view(image.height, image.width, len(image.getbands())).permute(2, 0, 1)
    return image.to(torch.float32).div_(127.5).sub_(1.0)


@dataclass(frozen=True)
class ImageTransform:
    """Channels, then center crop (eval, or crop_scale 1) or random-resized crop, then flip.

    Input: a PIL image or a uint8 (C, H, W) tensor. Output: float32 (channels, size, size) in [-1, 1].
    The center crop first resizes the shorter side to ``size`` (a no-op when it already is).
    """

    size: int
    channels: int = 3
    train: bool = False
    crop_scale: float = 1.0  # lower bound of the random-resized-crop area; 1.0 = center crop
    flip: bool = False

    @property
    def is_random(self) -> bool:
        return self.train and (self.crop_scale < 1.0 or self.flip)

    def __call__(self, image, generator: torch.Generator | None = None) -> torch.Tensor:
        image = _set_channels(image, self.channels)
        height, width = _size_of(image)
        if self.train and self.crop_scale < 1.0:
            top, left, h, w = random_resized_crop_params(height, width, (self.crop_scale, 1.0), generator)
            image = TF.resized_crop(image, top, left, h, w, [self.size, self.size], antialias=True)
        else:
            if min(height, width) != self.size:
                image = TF.resize(image, [self.size], antialias=True)  # shorter side -> size
            if _size_of(image) != (self.size, self.size):
                image = TF.center_crop(image, [self.size, self.size])
        if self.train and self.flip and bool(torch.rand(1, generator=generator) < 0.5):
            image = TF.hflip(image)
        return to_unit_range(image)


def train_transform(cfg: DataConfig) -> ImageTransform:
    """The training transform the config asks for (random crop and flip only when enabled)."""
    return ImageTransform(cfg.image_size, cfg.channels, train=True,
                          crop_scale=cfg.random_crop_scale, flip=cfg.random_flip)


def eval_transform(cfg: DataConfig) -> ImageTransform:
    """Deterministic evaluation transform: shorter side to image_size, center crop."""
    return ImageTransform(cfg.image_size, cfg.channels, train=False)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps); stable across processes, unlike hash() of str."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value = (value ^ (value >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 29
    return value & 0x7FFFFFFFFFFFFFFF


def generator_for(*parts: int) -> torch.Generator:
    """A CPU generator seeded from ``parts`` (e.g. seed, epoch, index)."""
    return torch.Generator().manual_seed(mix_seed(*parts))


# ----------------------------------------------------------------------------- writing (bavq-prep)
PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
EXT_OF_PIL = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # MPO: camera JPEGs


@dataclass(frozen=True)
class EncodeOptions:
    """How images are stored: resize policy and output format."""

    resize: int = 0  # shorter side in pixels; 0 = keep the original size (and bytes when possible)
    center_crop: bool = True  # after resizing, crop the centre resize x resize square
    fmt: str = "keep"  # keep | jpg | png | webp ("keep": the source's own jpg/png/webp, png for arrays)
    quality: int = 95  # jpg / webp quality


def resize_shorter(image: Image.Image, size: int, center_crop: bool) -> Image.Image:
    """Shorter side to ``size`` (bicubic), then optionally the centred size x size crop."""
    width, height = image.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    image = image.resize(new, Image.Resampling.BICUBIC)
    if center_crop:
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return image


def encode_image(raw: bytes | np.ndarray, opts: EncodeOptions) -> tuple[bytes, str]:
    """(encoded bytes, extension) of one image; raises on unreadable data.

    The original bytes are passed through untouched when no resize is asked and the source is
    already in the requested format (after a full decode, so truncated files are still caught).
    """
    if isinstance(raw, np.ndarray):
        image, src_ext = Image.fromarray(raw), None
    else:
        if not raw:
            raise ValueError("empty file")
        try:
            image = Image.open(io.BytesIO(raw))
        except UnidentifiedImageError:
            raise ValueError("not an image file") from None
        src_ext = EXT_OF_PIL.get(image.format)
        if opts.resize:
            image.draft(image.mode, (opts.resize, opts.resize))  # JPEG: decode at a reduced scale >= size
        image.load()
    target = opts.fmt if opts.fmt != "keep" else (src_ext or "png")
    if not opts.resize and src_ext == target:
        return bytes(raw), target
    if opts.resize:
        image = resize_shorter(image, opts.resize, opts.center_crop)
    mode = "L" if image.mode in ("1", "L", "I", "I;16", "F") else "RGB"  # alpha and palettes are dropped
    image = image.convert(mode) if image.mode != mode else image
    buf = io.BytesIO()
    image.save(buf, format=PIL_FORMAT[target], **({"quality": opts.quality} if target != "png" else {}))
    return buf.getvalue(), target
