"""Losses: hand-computed values, the adaptive GAN weight, and the disc_start schedule."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from bavq.config import LossConfig
from bavq.losses import (
    GeneratorLoss,
    adaptive_disc_weight,
    discriminator_loss,
    hinge_d_loss,
    reconstruction_loss,
)

METRIC_KEYS = {"rec_loss", "perceptual_loss", "quant_loss", "g_loss", "d_weight", "total"}


def test_reconstruction_loss_values():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0])
    recon = torch.tensor([1.0, 1.0, 0.0, 3.0])  # errors 1, 0, -2, 0
    l1, metrics = reconstruction_loss(x, recon, "l1")
    assert l1.item() == pytest.approx(0.75) and metrics["rec_loss"].item() == pytest.approx(0.75)
    assert reconstruction_loss(x, recon, "l2")[0].item() == pytest.approx(1.25)
    with pytest.raises(ValueError, match="'l1' or 'l2'"):
        reconstruction_loss(x, recon, "huber")


def test_hinge_d_loss_hand_example():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r) = 0, 0.5, 2   -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + f) = 0, 1, 2     -> mean 1
    loss, metrics = hinge_d_loss(real, fake)
    assert loss.item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert metrics["logits_real"].item() == pytest.approx(0.5)
    assert metrics["logits_fake"].item() == pytest.approx(-1 / 3)
    assert all(not v.requires_grad for v in metrics.values())


def test_adaptive_disc_weight_hand_computation():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    nll = (w**2).sum()  # gradient 2w = (2, 4), norm sqrt(20)
    g = 3 * w[0] - 4 * w[1]  # gradient (3, -4), norm 5
    weight = adaptive_disc_weight(nll, g, w)
    assert weight.item() == pytest.approx(math.sqrt(20) / (5 + 1e-4), rel=1e-6)
    assert not weight.requires_grad and w.grad is None  # autograd.grad does not touch .grad
    (nll + g).backward()  # the graph was retained for the real backward pass
    torch.testing.assert_close(w.grad, torch.tensor([5.0, 0.0]))


def test_adaptive_disc_weight_is_clamped():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    flat_g = 1e-9 * w.sum()  # tiny GAN gradient: sqrt(20) / ~1e-4 > max_weight
    assert adaptive_disc_weight((w**2).sum(), flat_g, w).item() == pytest.approx(1e4)
    assert adaptive_disc_weight((w**2).sum(), flat_g, w, max_weight=7.0).item() == pytest.approx(7.0)


class TinyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv_out = nn.Conv2d(2, 3, 1)


def generator_inputs():
    decoder = TinyDecoder()
    x = torch.rand(2, 3, 4, 4)
    recon = decoder.conv_out(torch.randn(2, 2, 4, 4))
    logits_fake = recon.mean(dim=1, keepdim=True) * 2.0  # a stand-in discriminator on the reconstruction
    return decoder, x, recon, logits_fake, torch.tensor(0.3)


def test_generator_loss_gan_off_before_disc_start():
    cfg = LossConfig(disc_weight=0.8, disc_start=100)
    decoder, x, recon, logits_fake, quant = generator_inputs()
    total, metrics = GeneratorLoss(cfg)(x, recon, quant, logits_fake, decoder.conv_out.weight, step=99)
    expected = (recon - x).abs().mean() + 0.3
    assert total.item() == pytest.approx(expected.item())
    assert set(metrics) == METRIC_KEYS
    assert metrics["g_loss"].item() == 0.0 and metrics["d_weight"].item() == 0.0
    assert all(v.dtype == torch.float32 and not v.requires_grad and v.dim() == 0 for v in metrics.values())
    # Before disc_start the discriminator is not even needed.
    total_none, _ = GeneratorLoss(cfg)(x, recon, quant, None, None, step=99)
    assert total_none.item() == pytest.approx(total.item())


def test_generator_loss_gan_on_with_adaptive_weight():
    cfg = LossConfig(disc_weight=0.8, disc_start=100)
    decoder, x, recon, logits_fake, quant = generator_inputs()
    last = decoder.conv_out.weight
    total, metrics = GeneratorLoss(cfg)(x, recon, quant, logits_fake, last, step=100)
    rec = (recon - x).abs().mean()
    g = -logits_fake.mean()
    grad_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
    grad_g = torch.autograd.grad(g, last, retain_graph=True)[0]
    d_weight = (grad_rec.norm() / (grad_g.norm() + 1e-4)).item()
    assert metrics["d_weight"].item() == pytest.approx(d_weight, rel=1e-5)
    assert metrics["g_loss"].item() == pytest.approx(g.item())
    assert total.item() == pytest.approx((rec + 0.3 + d_weight * 0.8 * g).item(), rel=1e-5)
    total.backward()
    assert last.grad is not None


def test_generator_loss_fixed_weight_and_errors():
    decoder, x, recon, logits_fake, quant = generator_inputs()
    cfg = LossConfig(disc_weight=0.5, disc_start=0, adaptive_disc_weight=False)
    total, metrics = GeneratorLoss(cfg)(x, recon, quant, logits_fake, None, step=0)
    assert metrics["d_weight"].item() == 1.0
    assert total.item() == pytest.approx(((recon - x).abs().mean() + 0.3 - 0.5 * logits_fake.mean()).item())
    with pytest.raises(ValueError, match="logits_fake"):
        GeneratorLoss(cfg)(x, recon, quant, None, None, step=0)
    with pytest.raises(ValueError, match="last_layer"):
        GeneratorLoss(LossConfig(disc_weight=0.5))(x, recon, quant, logits_fake, None, step=0)
    with torch.no_grad():  # evaluation: adaptive weight undefined -> GAN term left out
        _, metrics = GeneratorLoss(LossConfig(disc_weight=0.5))(x, recon, quant, None, None, step=5)
    assert metrics["d_weight"].item() == 0.0


class MeanSquareLPIPS(nn.Module):
    def forward(self, x, y):
        return (x - y).pow(2).mean(dim=(1, 2, 3))


def test_generator_loss_perceptual_term():
    decoder, x, recon, _, quant = generator_inputs()
    cfg = LossConfig(reconstruction="l2", perceptual_weight=2.0, lpips_weights="unused")
    total, metrics = GeneratorLoss(cfg, MeanSquareLPIPS())(x, recon, quant, None, None, step=0)
    mse = (recon - x).pow(2).mean()
    assert metrics["perceptual_loss"].item() == pytest.approx(mse.item())
    assert total.item() == pytest.approx((3 * mse + 0.3).item())
    with pytest.raises(ValueError, match="LPIPS"):
        GeneratorLoss(cfg)


def test_discriminator_loss_zero_before_disc_start():
    cfg = LossConfig(disc_weight=1.0, disc_start=10)
    real = torch.tensor([0.5, -0.5], requires_grad=True)
    fake = torch.tensor([0.2, -0.8], requires_grad=True)
    loss, metrics = discriminator_loss(real, fake, step=9, cfg=cfg)
    assert loss.item() == 0.0 and metrics["d_loss"].item() == 0.0
    loss.backward()  # still connected to the discriminator's graph
    assert real.grad is not None and real.grad.abs().sum() == 0
    loss, metrics = discriminator_loss(real, fake, step=10, cfg=cfg)
    assert loss.item() == pytest.approx(hinge_d_loss(real, fake)[0].item())
    assert loss.item() == pytest.approx(0.5 * ((0.5 + 1.5) / 2 + (1.2 + 0.2) / 2))
    off = dataclasses.replace(cfg, disc_weight=0.0)
    assert discriminator_loss(real, fake, step=10, cfg=off)[0].item() == 0.0
