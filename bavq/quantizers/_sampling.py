"""Random draws identical on every rank: shared generators, rows sampled from the global batch,
jittered duplicate codes."""

from __future__ import annotations

import torch
from torch import Tensor

from bavq import dist


def shared_generator(seed: int, step: int, purpose: int) -> torch.Generator:
    """A CPU generator seeded identically on every rank from (seed, step, purpose)."""
    gen = torch.Generator()
    gen.manual_seed((seed * 1_000_003 + step * 16 + purpose) % (2**63))
    return gen


@torch.no_grad()
def sample_global_rows(local: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` rows drawn from the concatenation (rank order) of every rank's ``local`` rows.

    Identical on every rank and identical to one process holding the whole batch: the shared
    generator picks global row numbers (without replacement when there are enough rows, with
    replacement otherwise), each rank fills in the rows it owns, and one all-reduce (sum) of the
    (count, D) result completes it. The traffic is count x D floats whatever the batch size or
    the number of ranks (a fixed-size subset rather than gathering every rank's batch); the
    per-rank row counts come from a tiny all_gather, so ranks may even hold different numbers.
    """
    sizes = dist.all_gather_cat(torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device))
    sizes = sizes.cpu()
    total = int(sizes.sum())
    if total == 0:
        raise RuntimeError("cannot sample codebook vectors from an empty global batch")
    offset = int(sizes[: dist.get_rank()].sum())
    if total >= count:  # drawn on the CPU by the shared CPU generator, then moved
        chosen = torch.randperm(total, generator=generator, device="cpu")[:count]
    else:
        chosen = torch.randint(0, total, (count,), generator=generator, device="cpu")
    chosen = chosen.to(local.device)
    mine = (chosen >= offset) & (chosen < offset + local.shape[0])
    picked = local.new_zeros(count, local.shape[1])
    picked[mine] = local[chosen[mine] - offset]
    return dist.all_reduce_sum(picked)


@torch.no_grad()
def jitter_duplicates(codes: Tensor, generator: torch.Generator, scale: float = 0.1) -> Tensor:
    """``codes`` with every repeated row after its first copy moved by Gaussian noise.

    Data init draws K rows of the global batch with replacement when it holds fewer than K rows
    (K = 16,384 vs 64 x 49 = 3,136 tokens): identical codes then split the same data forever and
    capped usage near 25%. The noise has ``scale`` times the per-dimension std of the drawn rows
    (a small fraction of the data's spread) and comes from the shared generator, so every rank
    gets the same codebook; the first copy of each row stays an exact data vector.
    """
    num, dim = codes.shape
    _, inverse = torch.unique(codes, dim=0, return_inverse=True)
    positions = torch.arange(num, device=codes.device)
    first = torch.full((int(inverse.max()) + 1,), num, device=codes.device, dtype=positions.dtype)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    repeated = positions != first[inverse]
    noise = torch.randn(num, dim, generator=generator).to(codes.device)  # drawn in full: rank-independent
    std = codes.std(0) if num > 1 else codes.new_zeros(dim)
    std = torch.where(std > 0, std, codes.abs().mean().clamp_min(1e-3).expand(dim))
    return torch.where(repeated[:, None], codes + scale * std * noise, codes)
