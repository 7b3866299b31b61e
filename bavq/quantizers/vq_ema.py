"""VQ-EMA: the baseline codebook (van den Oord et al. 2017, Razavi et al. 2019).

index(x) = argmin_k ||x - e_k||^2; n_k and s_k (counts and sums of the vectors assigned to k)
are all-reduced over ranks, then N <- gamma N + (1 - gamma) n, S <- gamma S + (1 - gamma) s,
Laplace smoothing N~_k = (N_k + eps) / (sum N + K eps) * sum N and e_k = S_k / N~_k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bavq.quantizers import _nearest
from bavq.quantizers.base import Quantizer


class VQEMA(Quantizer):
    """Hard nearest-code quantizer with an EMA (k-means-like) codebook; see :class:`Quantizer`.

    Flat statistics layout: [n_k (K) | s_k (K*D) | number of vectors | sum of min distances].
    """

    def _train_stats(self, x: Tensor) -> tuple[Tensor, Tensor, None]:
        rows = x.detach()
        indices, min_dist = _nearest.nearest_codes(rows, self.codebook, self.rows_per_chunk)
        counts, sums = _nearest.hard_sums(rows, indices, self.num_codes)
        scalars = torch.stack([rows.new_full((), rows.shape[0]), min_dist.sum()])
        return indices, torch.cat([counts, sums.reshape(-1), scalars]), None

    def _eval_indices(self, x: Tensor) -> Tensor:
        return _nearest.nearest_codes(x, self.codebook, self.rows_per_chunk)[0]

    def _apply_update(self, stats: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        num_codes, dim = self.num_codes, self.code_dim
        counts = stats[:num_codes]
        sums = stats[num_codes : num_codes * (dim + 1)].view(num_codes, dim)
        num_vectors, sum_min_dist = stats[-2], stats[-1]
        self.ema_count.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (total + num_codes * self.eps) * total
        codes = self.ema_sum / smoothed[:, None]
        if self.l2_normalize:
            codes = F.normalize(codes, dim=1)
        self.codebook.copy_(codes)
        return counts, {"distortion": sum_min_dist / num_vectors.clamp_min(1.0)}
