"""rFID: the Fréchet distance against scipy and a closed form; the accumulator against a direct
computation with torch-fidelity's extractor; weights-file errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from bavq.config import ConfigError
from bavq.fid import ReconstructionFID, frechet_distance, load_inception

SMALL_SIZE = 75  # the smallest input Inception v3 takes; 16x fewer FLOPs than 299


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random FID Inception state dict in the pt_inception file's format: torchvision's Inception3
    with 1008 classes and no auxiliary head (as pytorch-fid builds it). He-initialised convolutions
    and random BN statistics keep the features O(1) through the 90 layers."""
    from torchvision.models import inception_v3

    gen = torch.Generator().manual_seed(seed)
    model = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.weight[0].numel()
            module.weight.data = torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1, generator=gen)
            module.running_var.uniform_(0.5, 1.5, generator=gen)
    return model.state_dict()


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(random_inception_state(), path)
    return path


def scipy_fid(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """Independent reference (pytorch-fid's recipe): scipy.linalg.sqrtm of Σ1Σ2, retried with a small
    diagonal offset when not finite, imaginary part discarded after a tolerance check."""
    from scipy import linalg

    mu1, mu2 = feats1.mean(0), feats2.mean(0)
    s1, s2 = np.cov(feats1, rowvar=False), np.cov(feats2, rowvar=False)
    if len(feats1) + len(feats2) < feats1.shape[1]:
        # Fewer images than features: both covariances vanish outside the span of the centred data, so
        # the distance is the same in an orthonormal basis of that span (exact, and sqrtm stays small).
        basis = np.linalg.qr(np.concatenate([feats1 - mu1, feats2 - mu2]).T)[0]
        mu1, mu2, s1, s2 = mu1 @ basis, mu2 @ basis, basis.T @ s1 @ basis, basis.T @ s2 @ basis
        with warnings.catch_warnings():  # the basis has 2 more vectors than the data's rank
            warnings.simplefilter("ignore")
            covmean = linalg.sqrtm(s1 @ s2)
        return float(((feats1.mean(0) - feats2.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2)
                     - 2 * np.trace(covmean).real)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * 1e-6
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def moments(feats: np.ndarray):
    return feats.mean(0), np.cov(feats, rowvar=False)


def near_singular_features(rng, n: int, dim: int) -> np.ndarray:
    """Features on a low-dimensional subspace plus 1e-6 noise: a covariance with condition ~1e12."""
    basis = rng.standard_normal((dim // 4, dim))
    return rng.standard_normal((n, dim // 4)) @ basis + 1e-6 * rng.standard_normal((n, dim))


@pytest.mark.parametrize("case", ["well_conditioned", "fewer_samples_than_dims", "near_singular"])
def test_frechet_distance_matches_scipy(case):
    rng = np.random.default_rng(0)
    if case == "well_conditioned":
        a, b = rng.standard_normal((400, 32)), 0.5 + 1.3 * rng.standard_normal((400, 32)) @ rng.random((32, 32))
    elif case == "fewer_samples_than_dims":  # rank <= 23 covariances in 64 dims, like 12 images vs 2048
        a, b = rng.standard_normal((24, 64)), rng.standard_normal((20, 64)) * 2 + 1
    else:
        a, b = near_singular_features(rng, 300, 48), near_singular_features(rng, 300, 48)
    ours, ref = frechet_distance(*moments(a), *moments(b)), scipy_fid(a, b)
    assert ref > 1 and ours == pytest.approx(ref, rel=1e-6)


def test_frechet_distance_closed_form():
    """Diagonal covariances spanning 12 orders of magnitude: FID = ‖μ1 − μ2‖² + Σ (√a − √b)²."""
    rng = np.random.default_rng(1)
    a, b = 10.0 ** rng.uniform(-12, 0, 64), 10.0 ** rng.uniform(-12, 0, 64)
    rot = np.linalg.qr(rng.standard_normal((64, 64)))[0]  # a common rotation keeps the closed form
    mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(mu1 @ rot, rot.T @ np.diag(a) @ rot, mu2 @ rot, rot.T @ np.diag(b) @ rot)
    assert got == pytest.approx(expected, rel=1e-8)
    sigma = rot.T @ np.diag(a) @ rot
    assert abs(frechet_distance(mu1, sigma, mu1, sigma)) < 1e-6  # identical Gaussians: 0 up to round-off


def test_frechet_distance_fewer_images_than_features():
    """12 images in 2,048 dimensions (rank-11 covariances, as rFID on a small split): equal to the
    distance computed exactly in an orthonormal basis of the two data spans (22 dimensions)."""
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((12, 2048)), 0.2 + 1.5 * rng.standard_normal((12, 2048))
    assert frechet_distance(*moments(x), *moments(y)) == pytest.approx(scipy_fid(x, y), rel=1e-9)


def test_frechet_distance_rejects_non_psd():
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(np.zeros(2), np.diag([1.0, -0.5]), np.zeros(2), np.eye(2))


def direct_features(path, images: torch.Tensor) -> np.ndarray:
    """torch-fidelity's extractor on the uint8 RGB images, built here without bavq.fid."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    extractor.INPUT_IMAGE_SIZE = SMALL_SIZE
    levels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    with torch.no_grad():
        return extractor(levels.expand(-1, 3, -1, -1))[0].double().numpy()


def test_rfid_matches_direct_computation(inception_file):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(10, 1, 16, 16, generator=gen) * 2 - 1  # grayscale: repeated to RGB
    recon = (images + 0.3 * torch.randn(images.shape, generator=gen)).clamp(-1, 1)
    fid = ReconstructionFID(inception_file, "cpu", input_size=SMALL_SIZE)
    for part in (slice(0, 4), slice(4, 10)):  # uneven batches
        fid.update(images[part], recon[part])
    real, fake = direct_features(inception_file, images), direct_features(inception_file, recon)
    assert real.std(0).mean() > 1e-3  # the random network gives informative features
    value = fid.compute()
    assert value > 0 and value == pytest.approx(scipy_fid(real, fake), rel=1e-6)
    assert fid.compute() == value  # reduced once; a second call returns the same number
    with pytest.raises(RuntimeError, match="after compute"):
        fid.update(images, recon)


def test_weights_file_errors(tmp_path, inception_file):
    with pytest.raises(FileNotFoundError, match="eval.inception_weights.*pt_inception-2015-12-05-6726825d.pth"):
        load_inception(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="eval.inception_weights: .* not a readable"):
        load_inception(garbage)
    wrong = tmp_path / "wrong.pth"
    state = random_inception_state()
    state.pop("Mixed_7c.branch_pool.conv.weight")
    torch.save(state, wrong)
    with pytest.raises(ConfigError, match="eval.inception_weights: .* does not fit"):
        load_inception(wrong)
