"""``bavq.Tokenizer``: a trained tokenizer for inference (images <-> code grids).

    tok = Tokenizer.from_pretrained("experiments/ba_k512")      # run, checkpoint or exported folder
    indices = tok.encode(images)                                 # (B, C, H, W) in [-1, 1] -> (B, h, w) int64
    images = tok.decode_indices(indices)                         # (B, h, w) -> (B, C, H, W) fp32 in [-1, 1]
    tok.save_pretrained("tokenizers/ba_k512")                    # model.safetensors + config.yaml + tokenizer.json

This is the one place that builds a model from a saved config: ``bavq-eval``, ``bavq-export`` and
``bavq-tokenize`` go through it (and :func:`bavq.models.plain_generator` underneath). The model is
plain fp32 in eval mode whatever trained it (DDP, DeepSpeed bf16, ZeRO shards), so the codebook
never changes and every source of the same weights gives the same indices. Under an outer autocast
the encoder and decoder follow it; the quantizer's distances stay fp32 with autocast off.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from bavq import __version__
from bavq.config import Config, ConfigError, load_config, save_config
from bavq.paths import atomic_write
from bavq.weights import EXPORT_INFO, load_generator_state

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
_RANGE_SLACK = 0.5  # resampling overshoot is fine; [0, 255] (or [0, 1] * 255) inputs are not


class Tokenizer:
    """A trained VQ tokenizer for inference: ``encode``, ``decode_indices``, ``reconstruct``.

    Images are float tensors (B, C, H, W) with values in [-1, 1] (``x / 127.5 - 1`` of uint8 pixels),
    C = ``config.model.in_channels`` and H, W multiples of :attr:`downsample` (the training size
    ``config.data.image_size`` is what the codebook was fit on). Code grids are int64 (B, h, w) with
    h = H / downsample. Mistakes in shapes, dtypes or ranges raise ValueError with a one-line message.
    """

    def __init__(self, model: nn.Module, config: Config):
        self.model = model.float().eval()
        self.model.requires_grad_(False)
        self._config = config
        self.source_dir: Path | None = None  # the folder it was loaded from (from_pretrained)

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        config: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> "Tokenizer":
        """Load from a run folder (``final_model.safetensors``), a checkpoint folder (DDP, or DeepSpeed
        ZeRO shards consolidated), an exported folder (:meth:`save_pretrained`) or a weights file.

        ``config`` defaults to ``config.yaml`` beside the weights; ``overrides`` (``key.sub=value``)
        change only what does not touch the weights (e.g. ``quantizer.chunk_size``). Raises
        ConfigError (one line) when the path, config or weights do not fit.
        """
        from bavq.models import plain_generator

        state, folder = load_generator_state(path)
        config_path = Path(config) if config else folder / CONFIG
        if not config_path.is_file():
            raise ConfigError(f"no {CONFIG} beside '{path}'; pass the config the weights were trained with")
        cfg = load_config(config_path, list(overrides))
        tokenizer = cls(plain_generator(cfg, state, device), cfg)
        tokenizer.source_dir = folder
        return tokenizer

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``directory`` = {model.safetensors (fp32), config.yaml, tokenizer.json}, loadable by
        :meth:`from_pretrained`. The folder is built beside the target and renamed into place, so an
        interrupted save leaves the previous folder or none, never a mix. Refuses to replace a folder
        that is not an exported tokenizer."""
        target = Path(directory)
        if target.exists() and any(target.iterdir()) and not (target / EXPORT_INFO).is_file():
            raise ConfigError(f"'{target}' exists and is not an exported tokenizer folder; choose another one")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            write_weights(self.model.state_dict(), tmp / WEIGHTS)
            save_config(self._config, tmp / CONFIG)
            (tmp / EXPORT_INFO).write_text(json.dumps(self.info(), indent=2))
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            if target.exists():
                os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def info(self) -> dict:
        """What a stage-2 model needs to know (written as tokenizer.json by :meth:`save_pretrained`)."""
        size = self._config.data.image_size
        return {"format": "bavq-tokenizer", "bavq_version": __version__, "arch": self._config.model.arch,
                "quantizer": self._config.quantizer.name, "num_codes": self.num_codes, "code_dim": self.code_dim,
                "downsample": self.downsample, "image_size": size, "grid_shape": list(self.grid_shape(size)),
                "channels": self.channels, "input_range": [-1.0, 1.0]}

    # ------------------------------------------------------------------ properties
    @property
    def config(self) -> Config:
        """The resolved config the weights were trained with."""
        return self._config

    @property
    def num_codes(self) -> int:
        return int(self.model.quantizer.num_codes)

    @property
    def code_dim(self) -> int:
        return int(self.model.quantizer.code_dim)

    @property
    def downsample(self) -> int:
        """Image side / code-grid side."""
        return int(self.model.downsample_factor)

    @property
    def channels(self) -> int:
        return int(self._config.model.in_channels)

    @property
    def device(self) -> torch.device:
        return self.model.quantizer.codebook.device

    def grid_shape(self, image_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
        """(h, w) of the code grid of an image of ``image_size`` (default: the training size)."""
        size = self._config.data.image_size if image_size is None else image_size
        height, width = (size, size) if isinstance(size, int) else size
        self._check_size(height, width)
        return height // self.downsample, width // self.downsample

    def to(self, device: str | torch.device) -> "Tokenizer":
        """Move the model (codebook included, still fp32) to ``device``; returns self."""
        self.model.to(device)
        return self

    def __repr__(self) -> str:
        return (f"Tokenizer({self._config.model.arch}, {self._config.quantizer.name}, K={self.num_codes}, "
                f"D={self.code_dim}, f={self.downsample}, device={self.device})")

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Code indices (B, h, w) int64 of images (B, C, H, W) in [-1, 1]."""
        x = self._check_images(images)
        return self.model.quantize(self.model.encode(x)).indices

    @torch.no_grad()
    def decode_indices(self, indices: Tensor) -> Tensor:
        """Images (B, C, H, W) fp32 in [-1, 1] (clamped) from code indices (B, h, w)."""
        return self.model.decode_indices(self._check_indices(indices)).float().clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """encode then decode in one forward: equal to ``decode_indices(encode(images))``."""
        recon, _ = self.model(self._check_images(images))
        return recon.float().clamp(-1, 1)

    # ------------------------------------------------------------------ validation (one-line errors)
    def _check_size(self, height: int, width: int) -> None:
        f = self.downsample
        if height < f or width < f or height % f or width % f:
            raise ValueError(f"image size {height}x{width} is not a multiple of the tokenizer's down-sampling "
                             f"factor {f} (trained at {self._config.data.image_size})")

    def _check_images(self, images) -> Tensor:
        if not torch.is_tensor(images) or images.dim() != 4:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images must be a (B, C, H, W) tensor, got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point in [-1, 1], got {images.dtype} "
                             "(convert uint8 pixels with x.float() / 127.5 - 1)")
        if images.shape[1] != self.channels:
            raise ValueError(f"images have {images.shape[1]} channels but the tokenizer takes {self.channels}")
        self._check_size(images.shape[2], images.shape[3])
        if images.numel() and (images.min() < -1 - _RANGE_SLACK or images.max() > 1 + _RANGE_SLACK):
            raise ValueError(f"image values span [{images.min().item():.3g}, {images.max().item():.3g}]; "
                             "expected [-1, 1] (x / 127.5 - 1 for [0, 255] pixels, 2 * x - 1 for [0, 1])")
        return images.to(self.device, torch.float32)

    def _check_indices(self, indices) -> Tensor:
        if not torch.is_tensor(indices) or indices.dim() != 3 or indices.is_floating_point() or indices.is_complex():
            shape = (f"{tuple(indices.shape)} {indices.dtype}" if torch.is_tensor(indices) else type(indices).__name__)
            raise ValueError(f"indices must be an integer (B, h, w) tensor, got {shape}")
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.num_codes):
            raise ValueError(f"indices span [{indices.min().item()}, {indices.max().item()}] but the codebook "
                             f"has {self.num_codes} codes (0..{self.num_codes - 1})")
        return indices.to(self.device, torch.long)


def write_weights(state: dict, path: str | Path) -> None:
    """Weights as fp32 safetensors, written to a temporary name and renamed into place (so a kill
    mid-write leaves the previous complete file or none). Used by :meth:`Tokenizer.save_pretrained`
    and the trainer's ``final_model.safetensors``."""
    from safetensors.torch import save_file

    cpu = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp)))
