"""The quantizer contract and the machinery every codebook shares.

A :class:`Quantizer` holds its codebook in fp32 *buffers* (never parameters): ``codebook`` (K, D),
``ema_count`` (K), ``ema_sum`` (K, D), plus ``step`` and ``initialized``; subclasses add theirs.
Everything a resumed run needs is a buffer, so ``state_dict()`` round-trips it.

Training-mode ``forward`` computes the LOCAL sufficient statistics of its batch and adds them to
a pending flat fp32 accumulator. :meth:`Quantizer.update_codebook` then does the single
all-reduce (sum) of that buffer, the EMA / M-step, dead-code restarts and schedules, and returns
metrics of the GLOBAL batch. With ``auto_update = True`` (default) forward calls it itself; a
trainer with gradient accumulation sets ``auto_update = False`` and calls it after the last
micro-step, so micro-batches are summed locally and reduced once. Nothing is divided before the
reduction, so R ranks give the buffers of one process that saw the whole batch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bavq import dist
from bavq.metrics import WindowUsage, entropy_of_counts
from bavq.quantizers import _ops, _sampling
from bavq.quantizers.checks import check_codebook_args

_PURPOSE_INIT, _PURPOSE_RESTART, _PURPOSE_RANDOM = 1, 2, 3


@dataclass
class QuantizerOutput:
    """What every quantizer returns."""

    quantized: Tensor  # same shape and dtype as the input, straight-through to the encoder
    indices: Tensor  # (B, *spatial) int64
    loss: Tensor  # scalar added to the generator loss (commitment, optional entropy term)
    metrics: dict[str, Tensor] = field(default_factory=dict)  # 0-dim tensors for logging


class Quantizer(nn.Module):
    """Base class: input z is (B, code_dim, *spatial), channel-first like taming.

    Args:
        num_codes: codebook size K.
        code_dim: dimension D of each code (the encoder emits exactly D channels).
        decay: EMA decay gamma of the codebook statistics.
        eps: Laplace smoothing of VQ-EMA counts (unused by BA-VQ).
        commitment: weight of the commitment loss, F.mse_loss(z, sg(e)) (mean over vectors and
            dimensions, the taming / LlamaGen convention, so published weights carry over).
        chunk_size, chunk_budget_mib: rows per distance chunk = min(chunk_size, budget // (4 K)).
        init: "random" (Gaussian codes from ``seed``) or "data" (codes from the first global batch).
        dead_code_threshold: codes whose ``ema_count`` falls below it are restarted from vectors of
            the global batch after each update; 0 disables restarts.
        dead_code_relative: the threshold is a fraction of the mean ``ema_count`` (whose stationary
            value is the tokens of one update / K) rather than a count. An absolute threshold at or
            above that mean restarts most codes at every step; the first update warns when it is.
        l2_normalize: quantize unit vectors with unit codes (inputs and codes normalized).
        seed: seed of every random draw (init, restarts); identical on all ranks by design.
        usage_window: tokens in the sliding window of the ``usage_window`` metric.

    A bad argument raises :class:`~bavq.config.ConfigError` (a ValueError) naming its config key,
    ``quantizer.<argument>``, from the rules in :mod:`bavq.quantizers.checks`.
    """

    auto_update: bool

    def __init__(self, num_codes: int, code_dim: int, *, decay: float = 0.99, eps: float = 1e-5,
                 commitment: float = 0.25, chunk_size: int = 8192, chunk_budget_mib: int = 128,
                 init: str = "random", dead_code_threshold: float = 0.0, dead_code_relative: bool = False,
                 l2_normalize: bool = False, seed: int = 0, usage_window: int = 65536):
        super().__init__()
        self.num_codes, self.code_dim = num_codes, code_dim
        self.decay, self.eps, self.commitment = decay, eps, commitment
        self.chunk_size, self.chunk_budget_mib = chunk_size, chunk_budget_mib
        self.init, self.dead_code_threshold = init, dead_code_threshold
        self.dead_code_relative = dead_code_relative
        self._threshold_checked = False  # the first update compares an absolute threshold to n / K
        self.l2_normalize, self.seed = l2_normalize, seed
        check_codebook_args(self)
        self.auto_update = True

        generator = _sampling.shared_generator(seed, 0, _PURPOSE_RANDOM)
        codes = torch.randn(num_codes, code_dim, generator=generator)
        if l2_normalize:
            codes = F.normalize(codes, dim=1)
        # At initialization N_k = 1 and the sums equal the codes, so codes = sums / counts from the start.
        self.register_buffer("codebook", codes)
        self.register_buffer("ema_count", torch.ones(num_codes))
        self.register_buffer("ema_sum", codes.clone())
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))  # codebook updates done
        self.register_buffer("initialized", torch.tensor(init == "random"))
        self.usage_window = WindowUsage(num_codes, usage_window)
        self._pending: Tensor | None = None  # local statistics not yet reduced
        self._pool: list[Tensor] = []  # this rank's vectors of the pending batches, for restarts
        self._init_done = init == "random"  # host copy of ``initialized``: no device read per step

    # ------------------------------------------------------------------ subclass hooks
    def _train_stats(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """E-step on rows x (N, D): (indices, flat local statistics, extra loss or None)."""
        raise NotImplementedError

    def _eval_indices(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _apply_update(self, stats: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """EMA / M-step from GLOBAL flat statistics; returns (global hard counts, metrics)."""
        raise NotImplementedError

    def _after_update(self) -> dict[str, Tensor]:
        """Runs after restarts and the step increment (schedules, prior); returns metrics."""
        return {}

    # ------------------------------------------------------------------ contract
    @property
    def rows_per_chunk(self) -> int:
        return _ops.chunk_rows(self.num_codes, self.chunk_size, self.chunk_budget_mib)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize z (B, code_dim, *spatial); in training mode also accumulate statistics."""
        rows = _ops.to_rows(z, self.code_dim)
        with _ops.fp32_math(z.device.type):
            x = rows.float()
            if self.l2_normalize:
                x = F.normalize(x, dim=1)
            extra_loss = None
            if self.training:
                if not self._init_done:
                    if not bool(self.initialized):  # a device read once per construction or load
                        self._data_init(x.detach())
                    self._init_done = True
                indices, stats, extra_loss = self._train_stats(x)
                self._accumulate(stats, x.detach())
            else:
                indices = self._eval_indices(x.detach())
            codes = F.embedding(indices, self.codebook)  # a copy: later updates do not change it
            loss = self.commitment * F.mse_loss(x, codes)
            if extra_loss is not None:
                loss = loss + extra_loss
            if self.training:
                metrics = self.update_codebook() if self.auto_update else {}
            else:
                metrics = self._local_metrics(x.detach(), indices, codes)
            # = x + (codes - x).detach() in value and gradient, but exactly the codes in value
            # (x - x.detach() is exactly 0), so decode_indices(indices) == quantized bit for bit.
            quantized = codes + (x - x.detach())
        quantized = _ops.from_rows(quantized, z.shape).to(z.dtype).contiguous()
        return QuantizerOutput(quantized=quantized, indices=indices.view(z.shape[0], *z.shape[2:]),
                               loss=loss, metrics=metrics)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Codes of ``indices`` (B, *spatial) as a (B, code_dim, *spatial) fp32 tensor."""
        codes = F.embedding(indices.long(), self.codebook)
        return codes.movedim(-1, 1).contiguous()

    @torch.no_grad()
    def update_codebook(self) -> dict[str, Tensor]:
        """Reduce the pending statistics over ranks (one all-reduce), update the codebook, restart
        dead codes, advance the schedules; returns metrics of the global batch. Collective."""
        if self._pending is None:
            raise RuntimeError("update_codebook() called with no pending statistics: run a "
                               "training-mode forward first")
        stats, self._pending = self._pending, None
        with _ops.fp32_math(stats.device.type):
            dist.all_reduce_sum(stats)
            counts, metrics = self._apply_update(stats)
            if self.dead_code_threshold > 0:
                self._check_threshold(counts)
                metrics["restarted_codes"] = self._restart_dead_codes()
            self._pool = []
            self.step += 1
            metrics.update(self._after_update())
            self.usage_window.update(counts)
            metrics.update(self._usage_metrics(counts))
            metrics["usage_window"] = self.usage_window.usage()
        return metrics

    # ------------------------------------------------------------------ shared machinery
    def _accumulate(self, stats: Tensor, x: Tensor) -> None:
        self._pending = stats if self._pending is None else self._pending.add_(stats)
        if self.dead_code_threshold > 0:
            self._pool.append(x)

    @torch.no_grad()
    def _data_init(self, x: Tensor) -> None:
        """Codes drawn from the first global batch, identically on every rank (collective).

        When K exceeds the global batch's rows, rows are drawn with replacement and the repeated
        copies get small noise (:func:`_sampling.jitter_duplicates`), so the K codes are distinct."""
        generator = _sampling.shared_generator(self.seed, int(self.step), _PURPOSE_INIT)
        codes = _sampling.jitter_duplicates(_sampling.sample_global_rows(x, self.num_codes, generator), generator)
        if self.l2_normalize:
            codes = F.normalize(codes, dim=1)
        self.codebook.copy_(codes)
        self.ema_sum.copy_(codes)
        self.ema_count.fill_(1.0)
        self.initialized.fill_(True)

    def _check_threshold(self, counts: Tensor) -> None:
        """Once per construction (one host read): warn when an absolute threshold is at or above the
        mean count of an update (global tokens / K), where most codes would be restarted every step."""
        if self._threshold_checked or self.dead_code_relative:
            return
        self._threshold_checked = True
        tokens = float(counts.sum())
        mean = tokens / self.num_codes
        if self.dead_code_threshold >= mean and dist.get_rank() == 0:
            warnings.warn(
                f"quantizer.dead_code_threshold={self.dead_code_threshold:g} is at or above the mean code count "
                f"of an update ({tokens:,.0f} tokens / {self.num_codes:,} codes = {mean:.3g}): most codes will "
                f"count as dead and be restarted every step. Use a threshold well below {mean:.3g}, or "
                f"quantizer.dead_code_relative=true with a fraction of the mean (e.g. 0.1).",
                RuntimeWarning, stacklevel=2)

    @torch.no_grad()
    def _restart_dead_codes(self) -> Tensor:
        """Replace codes whose EMA count (:meth:`_restart_counts`) is below the threshold by vectors
        of the global batch.

        The counts are global, so every rank sees the same dead set and takes the same branch.
        A restarted code gets count = threshold and sum = threshold * code (as in
        vector-quantize-pytorch), so it is restarted again next step unless some vector picks it.
        With ``dead_code_relative`` the threshold is ``dead_code_threshold`` x the mean EMA count.
        """
        counts = self._restart_counts()
        limit = self.dead_code_threshold
        if self.dead_code_relative:
            limit = counts.mean() * self.dead_code_threshold  # global: the same on every rank
        dead = counts < limit
        num_dead = int(dead.sum())
        if num_dead == 0:
            return torch.zeros((), device=self.codebook.device)
        generator = _sampling.shared_generator(self.seed, int(self.step), _PURPOSE_RESTART)
        fresh = _sampling.sample_global_rows(torch.cat(self._pool), num_dead, generator)
        self.codebook[dead] = fresh
        counts[dead] = limit
        # sum = count x code, so the next M-step leaves the code at fresh (with ``ema_count`` as the
        # restart counts this is limit x fresh; other counts leave ``ema_count`` as it was)
        self.ema_sum[dead] = fresh * self.ema_count[dead][:, None]
        return torch.tensor(float(num_dead), device=self.codebook.device)

    def _restart_counts(self) -> Tensor:
        """The global per-code EMA counts (a buffer, updated in place) that decide which codes are dead."""
        return self.ema_count

    def _usage_metrics(self, counts: Tensor) -> dict[str, Tensor]:
        entropy = entropy_of_counts(counts).float()
        return {"perplexity": entropy.exp(), "usage": (counts > 0).float().mean()}

    def _local_metrics(self, x: Tensor, indices: Tensor, codes: Tensor) -> dict[str, Tensor]:
        """Evaluation-mode metrics of THIS rank's batch (global ones go through CodebookStats)."""
        counts = torch.bincount(indices, minlength=self.num_codes)
        metrics = self._usage_metrics(counts)
        metrics["distortion"] = (x - codes).square().sum(1).mean()
        return metrics

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._init_done = self.init == "random"  # ``initialized`` came from the state dict: look again

    def _apply(self, fn, recurse=True):
        # Keep the fp32 codebook state fp32 when the model is cast (module.half(), DeepSpeed bf16):
        # device moves apply, dtype casts do not. A bf16 EMA with decay 0.999 stalls.
        saved = {name: buf for name, buf in self._buffers.items()
                 if buf is not None and buf.is_floating_point()}
        result = super()._apply(fn, recurse)
        for name, old in saved.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return result

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, code_dim={self.code_dim}, decay={self.decay}, "
                f"init={self.init}, dead_code_threshold={self.dead_code_threshold}, "
                f"dead_code_relative={self.dead_code_relative}, "
                f"l2_normalize={self.l2_normalize}")
