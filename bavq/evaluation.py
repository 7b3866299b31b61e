"""Whole-split evaluation over all ranks and the run's final outputs.

Every held-out image is seen exactly once across ranks (the loader guarantees it); the code
histogram, the PSNR/SSIM/LPIPS sums and the rFID feature statistics are reduced once at the end, so
ranks with uneven counts never wait on each other per batch. rFID and LPIPS are computed only from
local weights files (eval.inception_weights, loss.lpips_weights); without one the metric is
reported as null with the reason, never estimated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bavq import dist
from bavq.config import Config, to_dict
from bavq.metrics import CodebookStats, psnr_per_image, ssim_per_image
from bavq.paths import atomic_write


@dataclass
class EvalResult:
    codebook: dict  # codebook_usage, perplexity, normalized_entropy, dead_codes, tokens
    psnr: float
    ssim: float
    images: int
    rec_l1: float
    rfid: float | None = None
    rfid_reason: str | None = None
    lpips: float | None = None  # mean per-image LPIPS over the split
    lpips_reason: str | None = None
    histogram: np.ndarray | None = None  # (K,) int64 code counts over the split
    samples: dict = field(default_factory=dict)  # first images and reconstructions (main process)

    def summary(self) -> dict:
        out = {**self.codebook, "psnr": self.psnr, "ssim": self.ssim, "rec_l1": self.rec_l1,
               "images": self.images, "rfid": self.rfid, "lpips": self.lpips}
        if self.rfid is None:
            out["rfid_reason"] = self.rfid_reason
        if self.lpips is None:
            out["lpips_reason"] = self.lpips_reason
        return out


@torch.no_grad()
def evaluate_model(model, loader, cfg: Config, device, progress=None) -> EvalResult:
    """Evaluate ``model`` (a plain, unwrapped module; eval mode, so the codebook does not change) on
    ``loader``. Images enter in the model's parameter dtype (fp32 for the plain models that
    :func:`bavq.models.plain_generator` builds), under bf16 autocast when ``eval.precision=bf16``;
    metrics are computed from the fp32 originals. Per-batch sums stay on ``device`` (no host sync
    per batch) and are reduced once, on the communication device, at the end. ``progress``, when
    given, wraps the loader (e.g. ``functools.partial(bavq.progress.track, desc=...)``)."""
    was_training = model.training
    model.eval()
    model_dtype = next(model.parameters()).dtype
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              enabled=cfg.eval.precision == "bf16")
    stats = CodebookStats(cfg.quantizer.num_codes)
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # psnr, ssim, images, l1, lpips
    fid, lpips = _make_fid(cfg, device), _make_lpips(cfg, device)
    samples = {}
    for images, _keys in (loader if progress is None else progress(loader)):
        images = images.to(device, non_blocking=True).float()
        with autocast:
            recon, q = model(images.to(model_dtype))
        recon = recon.float().clamp(-1, 1)
        stats.update(q.indices)
        psnr = psnr_per_image(images, recon)
        sums += torch.stack([psnr.sum(), ssim_per_image(images, recon).double().sum(),
                             psnr.new_tensor(float(images.shape[0])),
                             (images - recon).abs().mean(dim=(1, 2, 3)).double().sum(),
                             lpips(images, recon).double().sum() if lpips is not None else psnr.new_zeros(())])
        if fid is not None:
            fid.update(images, recon)
        if not samples:
            n = cfg.eval.num_recon_images
            samples = {"images": images[:n].cpu(), "recon": recon[:n].cpu()}
    stats.reduce()
    sums = dist.all_reduce_sum(sums.to(dist.comm_device())).cpu()
    model.train(was_training)
    n = max(1.0, sums[2].item())
    rfid, rfid_reason = (fid.compute(), None) if fid is not None else (None, NO_FID_REASON)
    lpips_value, lpips_reason = (sums[4].item() / n, None) if lpips is not None else (None, NO_LPIPS_REASON)
    return EvalResult(codebook=stats.compute(), psnr=sums[0].item() / n, ssim=sums[1].item() / n,
                      images=int(sums[2].item()), rec_l1=sums[3].item() / n, rfid=rfid, rfid_reason=rfid_reason,
                      lpips=lpips_value, lpips_reason=lpips_reason,
                      histogram=stats.histogram.cpu().numpy(), samples=samples)


NO_FID_REASON = ("no local Inception weights (set eval.inception_weights to a pt_inception-2015-12-05-6726825d.pth "
                 "file); rFID is never downloaded or estimated")
NO_LPIPS_REASON = ("no local LPIPS weights (set loss.lpips_weights to an LPIPS-VGG16 file); "
                   "LPIPS is never downloaded or estimated")


def _make_fid(cfg: Config, device):
    """rFID accumulator, or None without eval.inception_weights (a set but bad path raises)."""
    if not cfg.eval.inception_weights:
        return None
    from bavq.fid import ReconstructionFID

    return ReconstructionFID(cfg.eval.inception_weights, device, cfg.eval.inception_input_size)


def _make_lpips(cfg: Config, device):
    """LPIPS on ``device``, or None without loss.lpips_weights (a set but bad path raises, one line)."""
    if not cfg.loss.lpips_weights:
        return None
    from bavq.config import ConfigError
    from bavq.models.perceptual import LPIPS

    try:
        return LPIPS.from_file(cfg.loss.lpips_weights).to(device)
    except ValueError as exc:  # wrong keys or shapes: a config mistake, reported like one
        raise ConfigError(str(exc).splitlines()[0]) from None


def save_image_grid(samples: dict, path: Path) -> None:
    """Originals (top row) over reconstructions (bottom row) as one PNG."""
    from torchvision.utils import save_image

    if not samples:
        return
    both = torch.cat([samples["images"], samples["recon"]]).float()
    save_image((both + 1) / 2, str(path), nrow=samples["images"].shape[0], padding=1)


def write_final_outputs(run_dir: Path, cfg: Config, model, result: EvalResult, extra: dict, is_main: bool) -> dict:
    """final_metrics.json, final_model.safetensors/.pt (fp32), code histogram and a reconstruction grid.

    Every file is written to a temporary name and renamed into place, so a kill mid-write leaves
    the previous complete file or none (``bavq-eval`` prefers ``final_model.safetensors``)."""
    final = {"quantizer": cfg.quantizer.name, "num_codes": cfg.quantizer.num_codes, **result.summary(), **extra}
    final.setdefault("rfid_reason", None)
    final.setdefault("lpips_reason", None)
    if not is_main:
        return final
    run_dir = Path(run_dir)
    from bavq.tokenizer import write_weights

    state = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    write_weights(state, run_dir / "final_model.safetensors")  # the format Tokenizer.from_pretrained reads
    atomic_write(run_dir / "final_model.pt", lambda tmp: torch.save({"state_dict": state, "config": to_dict(cfg)}, tmp))
    atomic_write(run_dir / "code_histogram.npy", lambda tmp: np.save(tmp, result.histogram))
    if result.samples:
        atomic_write(run_dir / "reconstructions.png", lambda tmp: save_image_grid(result.samples, tmp))
    atomic_write(run_dir / "final_metrics.json", lambda tmp: tmp.write_text(json.dumps(final, indent=2)))
    return final

