"""Reconstruction FID (rFID): the Fréchet distance between Inception features of the held-out images
and of their reconstructions, from ONE local Inception weights file (never downloaded).

The feature extractor is torch-fidelity's ``FeatureExtractorInceptionV3`` (the TF-compatible FID
Inception that torchmetrics' ``FrechetInceptionDistance`` also wraps): uint8 RGB in, TF-1.x bilinear
resize to 299, 2048 pool features out. Its weights file is ``pt_inception-2015-12-05-6726825d.pth``
(pytorch-fid's release; torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` is the same
file under another name): a plain state dict of a torchvision ``Inception3`` with 1008 classes and
no auxiliary head.

Exactness over ranks: each rank accumulates the sufficient statistics of its own images — count,
Σf and Σf fᵀ in float64, for real and reconstructed features — and :meth:`ReconstructionFID.compute`
all-reduces them once, so every held-out image counts exactly once whatever the number of ranks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from bavq import dist
from bavq.config import ConfigError
from bavq.metrics import to_uint8_levels

CONFIG_KEY = "eval.inception_weights"
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE
FEATURE_DIM = 2048
STANDARD_INPUT_SIZE = 299


def load_inception(weights_path: str | Path, input_size: int = STANDARD_INPUT_SIZE):
    """torch-fidelity's FID Inception (2048 pool features) with the weights of one local file.

    A missing file raises FileNotFoundError and an unreadable one ConfigError, both one line naming
    ``eval.inception_weights``. ``input_size`` other than 299 (at least 75) is for fast tests only:
    such features are not comparable with any published FID.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = Path(weights_path) if weights_path else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{CONFIG_KEY}: Inception weights file '{path or ''}' not found; expected "
                                f"{WEIGHTS_FILE} (from {WEIGHTS_URL}; rFID weights are never downloaded)")
    try:  # safe load first: the extractor itself unpickles with weights_only=False
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user mistake
        raise ConfigError(f"{CONFIG_KEY}: '{path}' is not a readable torch state dict "
                          f"({type(exc).__name__}); expected {WEIGHTS_FILE}") from None
    if not isinstance(state, dict) or state.get("fc.weight", torch.empty(0)).shape != (1008, FEATURE_DIM):
        raise ConfigError(f"{CONFIG_KEY}: '{path}' is not an FID Inception state dict (no fc.weight of "
                          f"shape (1008, 2048)); expected {WEIGHTS_FILE}")
    del state
    try:  # the path is given, so the extractor never reaches its download branch
        extractor = FeatureExtractorInceptionV3("inception-v3-compat", [str(FEATURE_DIM)],
                                                feature_extractor_weights_path=str(path))
    except RuntimeError as exc:  # missing / unexpected keys or shapes
        raise ConfigError(f"{CONFIG_KEY}: '{path}' does not fit the FID Inception: "
                          f"{str(exc).strip().splitlines()[0]}") from None
    if input_size != STANDARD_INPUT_SIZE:
        if input_size < 75:
            raise ConfigError(f"eval.inception_input_size: Inception needs at least 75 pixels, got {input_size}")
        extractor.INPUT_IMAGE_SIZE = input_size  # the extractor's forward resizes to this attribute
    return extractor


def inception_input(images: Tensor) -> Tensor:
    """[-1, 1] images (B, C, H, W) -> uint8 RGB as the extractor expects (grayscale repeated to 3 channels)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"rFID needs (B, 1 or 3, H, W) images, got {tuple(images.shape)}")
    levels = to_uint8_levels(images).to(torch.uint8)
    return levels.expand(-1, 3, -1, -1) if levels.shape[1] == 1 else levels


class ReconstructionFID:
    """rFID between a split's images and their reconstructions, exact over ranks.

    Call :meth:`update` with every batch on every rank, then :meth:`compute` once on every rank
    (one all-reduce of the float64 sufficient statistics); it returns the same float everywhere.
    """

    def __init__(self, weights_path: str | Path, device, input_size: int = STANDARD_INPUT_SIZE):
        self.device = torch.device(device)
        self.extractor = load_inception(weights_path, input_size).to(self.device)
        # Per side (0 = images, 1 = reconstructions): count, Σf (D,), Σ f fᵀ (D, D), all float64.
        self._count = torch.zeros(2, dtype=torch.float64, device=self.device)
        self._sum = torch.zeros(2, FEATURE_DIM, dtype=torch.float64, device=self.device)
        self._outer = torch.zeros(2, FEATURE_DIM, FEATURE_DIM, dtype=torch.float64, device=self.device)
        self._result: float | None = None

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """(B, 2048) float64 Inception pool features of [-1, 1] images."""
        (feats,) = self.extractor(inception_input(images.to(self.device)))
        return feats.double()

    @torch.no_grad()
    def update(self, images: Tensor, recon: Tensor) -> None:
        """Add one batch of originals and reconstructions ([-1, 1], (B, C, H, W), same shape)."""
        if self._result is not None:
            raise RuntimeError("ReconstructionFID.update() after compute(): make a new ReconstructionFID")
        if images.shape != recon.shape:
            raise ValueError(f"images {tuple(images.shape)} and reconstructions {tuple(recon.shape)} differ")
        for side, batch in enumerate((images, recon)):
            feats = self.features(batch)
            self._count[side] += feats.shape[0]
            self._sum[side] += feats.sum(0)
            self._outer[side].addmm_(feats.T, feats)

    def compute(self) -> float:
        """Reduce the statistics over ranks (collective: every rank calls it) and return the rFID."""
        if self._result is None:
            flat = torch.cat([self._count, self._sum.flatten(), self._outer.flatten()]).to(dist.comm_device())
            flat = dist.all_reduce_sum(flat).cpu()
            count, sums, outer = flat.split([2, 2 * FEATURE_DIM, 2 * FEATURE_DIM**2])
            sums, outer = sums.view(2, FEATURE_DIM), outer.view(2, FEATURE_DIM, FEATURE_DIM)
            if count.min() < 2:
                raise ValueError(f"rFID needs at least 2 images over all ranks, got {int(count.min())}")
            moments = [mean_and_covariance(count[i], sums[i], outer[i]) for i in range(2)]
            self._result = frechet_distance(*moments[0], *moments[1])
        return self._result


def mean_and_covariance(count, feature_sum: Tensor, outer_sum: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance (float64) from n, Σf and Σ f fᵀ."""
    n = float(count)
    mean = feature_sum.double() / n
    cov = (outer_sum.double() - n * torch.outer(mean, mean)) / (n - 1)
    return mean, (cov + cov.T) / 2


def _psd_eigh(matrix: Tensor, rtol: float, what: str, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of a symmetric PSD matrix whose round-off eigenvalues are set to 0.

    A clearly negative eigenvalue (below -rtol · scale, by default the largest magnitude) means the
    input is not PSD and raises. Eigenvalues below eps · scale are round-off and become exactly 0:
    with fewer images than features most directions are null, and the square roots of their ~1e-16
    noise would otherwise add up to a bias (measured: relative error 3e-8 with 12 images in 2,048
    dimensions against an exact low-dimensional computation, 5e-11 with the cut-off; a larger
    cut-off, n · eps, drops real small eigenvalues and costs 5e-9 on a closed-form case).
    """
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    scale = max(float(scale if scale is not None else values.abs().max()), torch.finfo(torch.float64).tiny)
    if values.min() < -rtol * scale:
        raise ValueError(f"Fréchet distance: {what} has eigenvalue {values.min().item():.3g} "
                         f"(scale {scale:.3g}); not positive semi-definite")
    noise = torch.finfo(torch.float64).eps * scale
    return torch.where(values > noise, values, torch.zeros_like(values)), vectors


def frechet_distance(mu1, sigma1, mu2, sigma2, rtol: float = 1e-8) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) in float64.

    Tr (Σ1 Σ2)^½ = Σ √λ over the eigenvalues of the symmetric PSD matrix A = Σ1^½ Σ2 Σ1^½ (the same
    as those of Σ1 Σ2), so symmetric eigen-decompositions replace a general matrix square root
    (scipy.linalg.sqrtm): real by construction, no imaginary part to discard, and stable when the
    covariances are singular (fewer images than 2048 features).
    """
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(t, dtype=torch.float64, device="cpu")
                                for t in (mu1, sigma1, mu2, sigma2))
    values, vectors = _psd_eigh(sigma1, rtol, "covariance 1")
    keep = values > 0
    # A's nonzero eigenvalues are those of Bᵀ Σ2 B with B = V √Λ over the r nonzero eigenvalues of Σ1:
    # an r × r matrix, small when there are fewer images than features.
    half = vectors[:, keep] * values[keep].sqrt()  # (D, r)
    # Round-off in A is relative to ‖Σ1‖·‖Σ2‖, not to A's own largest eigenvalue (tiny when the two
    # covariances live in nearly orthogonal subspaces); the Frobenius norm bounds ‖Σ2‖ cheaply.
    scale = values.max() * torch.linalg.matrix_norm(sigma2)
    root_trace = 0.0
    if keep.any():  # Σ1 = 0 (all images identical) leaves nothing to take a square root of
        product, _ = _psd_eigh(half.T @ sigma2 @ half, rtol, "Σ1^½ Σ2 Σ1^½", scale=scale)
        root_trace = product.sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * root_trace)
