"""Tokenizer losses (taming / LlamaGen recipe): pixel + perceptual + hinge GAN with adaptive weight.

Every loss returns ``(loss, metrics)`` where metrics are detached float scalars; nothing here logs
and nothing owns the discriminator (the trainer runs it and passes its logits in).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bavq.config import LossConfig

Metrics = dict[str, Tensor]


def _scalar(value: Tensor | float, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().float()
    return torch.tensor(float(value), device=like.device)


def reconstruction_loss(x: Tensor, recon: Tensor, kind: str = "l1") -> tuple[Tensor, Metrics]:
    """Mean absolute ("l1") or mean squared ("l2") pixel error over all elements."""
    if kind == "l1":
        loss = F.l1_loss(recon, x)
    elif kind == "l2":
        loss = F.mse_loss(recon, x)
    else:
        raise ValueError(f"reconstruction loss must be 'l1' or 'l2', got '{kind}'")
    return loss, {"rec_loss": _scalar(loss, x)}


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> tuple[Tensor, Metrics]:
    """taming's hinge loss: 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(G(z))))."""
    loss_real = F.relu(1.0 - logits_real).mean()
    loss_fake = F.relu(1.0 + logits_fake).mean()
    loss = 0.5 * (loss_real + loss_fake)
    metrics = {"d_loss": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
    return loss, {k: _scalar(v, loss) for k, v in metrics.items()}


def adaptive_disc_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor,
                         max_weight: float = 1e4) -> Tensor:
    """taming's balance: ||d nll / d W|| / (||d g / d W|| + 1e-4), clamped to [0, max_weight], detached.

    W is the decoder's last conv weight (``model.last_layer()``); both losses must depend on it.
    ``last_layer`` may also be a function mapping a loss to its gradient w.r.t. W.
    The graph is retained so the caller can still back-propagate the total loss.
    """
    if callable(last_layer):  # a ``loss -> d loss / d W`` function (VQAutoencoder.last_layer_grad)
        nll_grad, g_grad = last_layer(nll_loss), last_layer(g_loss)
    else:
        nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.linalg.vector_norm(nll_grad) / (torch.linalg.vector_norm(g_grad) + 1e-4)
    return torch.clamp(weight, 0.0, max_weight).detach()


def gan_active(cfg: LossConfig, step: int) -> bool:
    """Whether the GAN terms (generator and discriminator) are on at generator step ``step``."""
    return cfg.disc_weight > 0 and step >= cfg.disc_start


class GeneratorLoss(nn.Module):
    """Generator (encoder + decoder) objective:
    rec + perceptual_weight * LPIPS + quant_loss + d_weight * disc_weight * g_loss.

    The quantizer's loss is already weighted (commitment etc.) and is added as is. The GAN term is
    active only when ``disc_weight > 0`` and ``step >= disc_start``; ``d_weight`` is taming's adaptive
    weight when ``adaptive_disc_weight`` is on and gradients are enabled, 1 when it is off, and 0
    under ``torch.no_grad()`` (evaluation), where the adaptive weight is undefined (taming does the same).

    Args:
        cfg: the ``loss`` section of the config.
        lpips: a perceptual module ``lpips(x, recon) -> (B,)`` (e.g. :class:`bavq.models.perceptual.LPIPS`);
            required when ``cfg.perceptual_weight > 0``. It is a frozen submodule: this loss has no
            trainable state and need not be checkpointed.
    """

    def __init__(self, cfg: LossConfig, lpips: nn.Module | None = None):
        super().__init__()
        if cfg.perceptual_weight > 0 and lpips is None:
            raise ValueError("loss.perceptual_weight > 0 needs an LPIPS module (from loss.lpips_weights)")
        self.cfg = cfg
        self.lpips = lpips if cfg.perceptual_weight > 0 else None

    def forward(self, x: Tensor, recon: Tensor, quant_loss: Tensor, logits_fake: Tensor | None,
                last_layer: Tensor | None, step: int) -> tuple[Tensor, Metrics]:
        """Total generator loss and metrics {rec_loss, perceptual_loss, quant_loss, g_loss, d_weight, total}.

        ``logits_fake`` are the discriminator's logits on ``recon`` (needed in training once the GAN
        term is active; may be None under ``torch.no_grad()``); ``last_layer`` is
        ``model.last_layer()`` (needed for the adaptive weight).
        """
        cfg = self.cfg
        rec, _ = reconstruction_loss(x, recon, cfg.reconstruction)
        perceptual = self.lpips(x, recon).mean() if self.lpips is not None else rec.new_zeros(())
        nll = rec + cfg.perceptual_weight * perceptual
        total = nll + quant_loss
        g_loss, d_weight = rec.new_zeros(()), rec.new_zeros(())
        # Evaluation (no grad) may skip the discriminator: the GAN term is then left out of the total.
        if gan_active(cfg, step) and (logits_fake is not None or torch.is_grad_enabled()):
            if logits_fake is None:
                raise ValueError(f"GeneratorLoss needs logits_fake at step {step} >= loss.disc_start")
            g_loss = -logits_fake.mean()
            d_weight = self._disc_weight(nll, g_loss, last_layer)
            total = total + d_weight * cfg.disc_weight * g_loss
        metrics = {"rec_loss": rec, "perceptual_loss": perceptual, "quant_loss": quant_loss, "g_loss": g_loss,
                   "d_weight": d_weight, "total": total}
        return total, {k: _scalar(v, rec) for k, v in metrics.items()}

    def _disc_weight(self, nll: Tensor, g_loss: Tensor, last_layer: Tensor | None) -> Tensor:
        if not self.cfg.adaptive_disc_weight:
            return torch.ones((), device=nll.device)
        if not (torch.is_grad_enabled() and nll.requires_grad and g_loss.requires_grad):
            return torch.zeros((), device=nll.device)
        if last_layer is None:
            raise ValueError("GeneratorLoss needs last_layer=model.last_layer() for the adaptive GAN weight")
        return adaptive_disc_weight(nll, g_loss, last_layer)


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor, step: int,
                       cfg: LossConfig) -> tuple[Tensor, Metrics]:
    """Hinge discriminator loss, multiplied by 0 before ``disc_start`` (or when ``disc_weight`` is 0).

    Pass ``logits_fake`` computed on detached reconstructions. The zero still depends on the
    discriminator's parameters, so a backward pass through it is valid (all gradients zero) and
    DDP sees every parameter used.
    """
    loss, metrics = hinge_d_loss(logits_real, logits_fake)
    factor = 1.0 if gan_active(cfg, step) else 0.0
    loss = factor * loss
    metrics["d_loss"] = _scalar(loss, logits_real)
    return loss, metrics
