"""BA-VQ: a codebook optimized by Blahut-Arimoto with an entropy term (DESIGN.md, "BA-VQ").

Minimizes beta E[d] + I(X;K) - lambda H(K) by online EM. One step on the flattened batch:
1. prior q_k = (N_k / sum N + alpha / K) / (1 + alpha), l_k = (1 - lambda) log q_k (``log_prior``
   holds log q, recomputed whenever N changes);
2. E-step a(x,k) = l_k - beta d(x,k), log p(k|x) = a - logsumexp_k a (chunked, fp32);
3. hard code: nearest (argmin d) or MAP (argmax a);
4. local sums S_k = sum_x p, M^b_k = sum_x p x, hard counts and scalars, ONE all-reduce;
5. M-step N <- gamma N + (1-gamma) S, M <- gamma M + (1-gamma) M^b, e_k = M_k / N_k where
   N_k > 1e-20 sum N (else e_k kept and M_k <- N_k e_k); D_hat <- 0.9 D_hat + 0.1 mean min d;
6. straight-through output and commitment (+ optional entropy) loss (in the base class).
beta is "anneal" (the default, deterministic annealing from a measured hot start: see
:meth:`BAVQ._measure_start`), fixed-geometric (beta_start -> beta_end) or adaptive c D / (2 D_hat),
c geometric from adaptive_c_start to adaptive_c_end, growth capped at (1 + max_beta_growth) per step.
The E-step is "balanced" (the default: the softmax above with Sinkhorn column potentials, so columns
sum to n r_k, DESIGN.md) or the plain "softmax"; the 1,000-step study behind these defaults is in the
README ("BA-VQ's E-step and beta schedule").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from bavq import dist
from bavq.metrics import entropy_of_counts
from bavq.quantizers import _entropy_loss, _nearest, _sinkhorn, _soft
from bavq.quantizers.base import Quantizer
from bavq.quantizers.checks import check_ba_vq_args

_NUM_SCALARS = 5  # vectors, sum min d, sum d(x, index(x)), sum H(p(.|x)), sum_x sum_k p d


def geometric(start: float, end: float, step: Tensor, steps: int) -> Tensor:
    """start -> end geometrically over ``steps`` steps, constant at ``end`` afterwards (``step`` is
    the 0-dim step buffer: the result stays on its device, no host read)."""
    if steps <= 0:
        return torch.full((), end, device=step.device)
    return start * (end / start) ** (step.clamp(max=steps).float() / steps)


def _moments(x: Tensor) -> Tensor:
    """[n | sum x (D) | sum x x^T (D*D)] of rows x: sums, so they all-reduce exactly."""
    count = torch.tensor([float(x.shape[0])], device=x.device, dtype=x.dtype)
    return torch.cat([count, x.sum(0), (x.t() @ x).reshape(-1)])


def _critical_spread(moments: Tensor, dim: int) -> Tensor:
    """2 lambda_max(Cov x) from GLOBAL moments (0-dim, on their device): the critical temperature of
    deterministic annealing."""
    n = moments[0].clamp_min(1.0)
    mean = moments[1 : 1 + dim] / n
    cov = moments[1 + dim :].view(dim, dim) / n - torch.outer(mean, mean)
    return 2.0 * torch.linalg.eigvalsh(cov.double()).max().clamp_min(0.0).to(moments.dtype)


class BAVQ(Quantizer):
    """Blahut-Arimoto codebook; common arguments as in :class:`Quantizer`, plus:

    Args:
        beta_mode: "anneal" (measured hot start, slow cooling to a cold end), "fixed"
            (beta_start -> beta_end) or "adaptive" (c D / (2 D_hat)).
        anneal_start_nats: anneal mode: beta_0 = this / spread, spread = max(the largest gap
            min_x [d(x,k) - min_j d(x,j)] of any code, mean min distance) on the first global batch,
            so the farthest code is within this many nats of some row's best code.
        anneal_end_nats: anneal mode: the cold end, beta D_hat = this.
        anneal_rate: anneal mode: beta grows by at most anneal_rate (1 - decay) per step, i.e. the
            cooling is slower than the EMA's relaxation (time constant 1 / (1 - decay)) for rate < 1.
        estep: "softmax" (p ~ q^(1-lambda) exp(-beta d)) or "balanced" (Sinkhorn: columns n r_k).
        balance_iters: Sinkhorn iterations of the balanced E-step.
        balance_target: column marginal r of the balanced E-step, "uniform" (1/K) or "prior" (q).
        balance_warm_start: start each E-step's Sinkhorn iterations from the column potentials of
            the previous one (buffer ``balance_v``, global, saved in checkpoints) instead of 0, so
            the iterations accumulate over steps: with ``balance_iters`` 1 a step makes 2 soft passes
            instead of 4 (speed, README "Benchmarks"); not the default. With ``balance_iters`` 0 (the
            online balance) a step makes ONE soft pass: it uses ``balance_v`` as it is, and the
            update then takes one Sinkhorn step from that pass's global soft counts S (the column
            sums of p under v): v <- v + log(n r) - log S, n = sum S, for the next step.
        balance_beta_scale: warm start: multiply the carried potentials by beta / (the beta they were
            computed at) (buffer ``balance_beta``): in the cold limit v / beta tends to the transport
            dual potential, a distance, so v itself grows with beta while the schedule cools.
        restart_counts: which EMA counts decide the dead codes of a restart: "soft" (``ema_count``, the
            E-step's soft counts, which the balanced E-step holds near n r_k, so restarts rarely fire)
            or "hard" (buffer ``ema_hard_count``, the EMA of the hard codes' counts, as VQ-EMA's):
            a code that keeps soft mass but is nobody's nearest code counts as dead. A restarted code
            keeps its soft count (``ema_sum`` = fresh x ``ema_count``) and gets hard count = the limit.
        beta_start, beta_end, beta_anneal_steps: the fixed schedule (geometric; also the length of
            the c schedule in adaptive mode).
        adaptive_c_start, adaptive_c_end: the c schedule of adaptive mode.
        max_beta_growth: adaptive beta grows by at most this factor per step (slow cooling).
        entropy_weight: lambda; 0 textbook BA, 1 uniform prior, > 1 spreads usage.
        prior_floor: alpha, weight of the uniform floor in the prior.
        assign: hard code "nearest" (argmin d) or "map" (argmax a).
        entropy_loss_weight: weight of mean_x H(p(.|x)) - H(mean_x p) in the loss; 0 = off.

    Extra buffers: ``log_prior`` (K), ``beta`` (the beta of the next E-step; 0 in adaptive and anneal
    modes until the first training batch measured D_hat) and ``d_hat`` (-1 until measured).
    Flat statistics layout: [S (K) | M^b (K*D) | hard counts (K) | reached (K) | anneal mode only:
    n, sum x (D), sum x x^T (D*D) | 5 scalars], where
    reached_k counts the ranks on which some row gave code k mass above the fp32 floor; codes with 0
    are reported as ``underflow_codes``. ``balance_tv`` is the total variation between the step's
    soft column marginal S / n and the balance target r (0: exactly balanced; logged for both E-steps).
    """

    def __init__(self, num_codes: int, code_dim: int, *, beta_mode: str = "anneal", beta_start: float = 1.0,
                 beta_end: float = 100.0, beta_anneal_steps: int = 10000, adaptive_c_start: float = 2.0,
                 adaptive_c_end: float = 64.0, max_beta_growth: float = 0.001, entropy_weight: float = 1.0,
                 prior_floor: float = 0.1, assign: str = "nearest", entropy_loss_weight: float = 0.0,
                 anneal_start_nats: float = 4.0, anneal_end_nats: float = 32.0, anneal_rate: float = 0.5,
                 estep: str = "balanced", balance_iters: int = 3, balance_target: str = "uniform",
                 balance_warm_start: bool = False, balance_beta_scale: bool = False,
                 restart_counts: str = "soft", **common):
        super().__init__(num_codes, code_dim, **common)
        self.beta_mode, self.beta_start, self.beta_end = beta_mode, beta_start, beta_end
        self.beta_anneal_steps, self.max_beta_growth = beta_anneal_steps, max_beta_growth
        self.adaptive_c_start, self.adaptive_c_end = adaptive_c_start, adaptive_c_end
        self.entropy_weight, self.prior_floor = entropy_weight, prior_floor
        self.assign, self.entropy_loss_weight = assign, entropy_loss_weight
        self.anneal_start_nats, self.anneal_end_nats = anneal_start_nats, anneal_end_nats
        self.anneal_rate = anneal_rate
        self.estep, self.balance_iters, self.balance_target = estep, balance_iters, balance_target
        self.balance_warm_start, self.balance_beta_scale = balance_warm_start, balance_beta_scale
        self.restart_counts = restart_counts
        check_ba_vq_args(self)
        if restart_counts == "hard":
            self.register_buffer("ema_hard_count", torch.ones(num_codes))
        if balance_warm_start:
            self.register_buffer("balance_v", torch.zeros(num_codes))
        if balance_beta_scale:
            self.register_buffer("balance_beta", torch.tensor(0.0))  # 0: balance_v not computed yet
        self.register_buffer("log_prior", torch.full((num_codes,), -math.log(num_codes)))
        self.register_buffer("beta", torch.tensor(beta_start if beta_mode == "fixed" else 0.0))
        self.register_buffer("d_hat", torch.tensor(-1.0))
        self._pending_gaps: Tensor | None = None  # anneal mode: local per-code gaps not yet reduced
        self._critical: Tensor | None = None  # anneal mode: 2 lambda_max(Cov x) of the last global batch
        self._measured = False  # host copy of "d_hat >= 0" (adaptive / anneal): no device read per step

    # ------------------------------------------------------------------ E-step
    def _log_weight(self) -> Tensor | None:
        """(1 - lambda) log q, or None when lambda = 1 makes it identically zero."""
        if self.entropy_weight == 1.0:
            return None
        return (1.0 - self.entropy_weight) * self.log_prior

    def _measure_first_d_hat(self, x: Tensor) -> None:
        """Adaptive beta needs D_hat before the first E-step: one extra (tiny) all-reduce, once."""
        _, min_dist = _nearest.nearest_codes(x, self.codebook, self.rows_per_chunk)
        totals = torch.stack([min_dist.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
        dist.all_reduce_sum(totals)
        self.d_hat.copy_(totals[0] / totals[1].clamp_min(1.0))
        self.beta.copy_(self._adaptive_target())

    def _measure_start(self, x: Tensor) -> None:
        """Anneal mode's hot start, from the first GLOBAL batch (collective, once): D_hat and
        beta_0 = anneal_start_nats / spread (see :meth:`_reach_beta`)."""
        gaps, min_dist = _nearest.code_gaps(x, self.codebook, self.rows_per_chunk)
        largest_gap = dist.all_reduce_max(gaps.neg()).neg().max()  # a code's gap is its min over ranks
        totals = dist.all_reduce_sum(torch.cat([min_dist.sum().reshape(1), _moments(x)]))
        self.d_hat.copy_(totals[0] / totals[1].clamp_min(1.0))
        self.beta.copy_(self._reach_beta(largest_gap, _critical_spread(totals[1:], self.code_dim)))

    def _reach_beta(self, largest_gap: Tensor, critical: Tensor) -> Tensor:
        """The coldest beta at which every code still receives posterior mass: anneal_start_nats / spread.

        A code whose log-odds against every row's best code is below ~-80 gets exactly zero mass in
        fp32 and never moves (DESIGN.md, "What the first grid showed"). The spread is measured on the
        global batch: the largest gap max_k min_x [d(x,k) - min_j d(x,j)] (how far the farthest code
        is from being anyone's nearest); once every code is near the data (gaps near 0) it is the
        smaller of D_hat (beta D_hat = anneal_start_nats, the study's hot start) and the critical
        spread 2 lambda_max(Cov x) (hotter than that all codes merge at the centroid: Rose's
        deterministic annealing, so a collapsed codebook starts splitting right away). Random codes
        start far away, so beta_0 is very hot; as they move in the gap shrinks and this floor lets
        beta follow them instead of wasting steps above the data's scale.
        """
        spread = torch.maximum(largest_gap, torch.minimum(self.d_hat, critical)).clamp_min(1e-20)
        return self.anneal_start_nats / spread

    def _anneal_next(self, largest_gap: Tensor, critical: Tensor) -> Tensor:
        """beta of the next step: cool by at most anneal_rate (1 - decay) per step (slower than the EMA's
        relaxation), never hotter than the reach floor, and at most the cold end anneal_end_nats / D_hat
        (which tracks the encoder's scale, so every run ends hard: beta D_hat = anneal_end_nats)."""
        cold = self.anneal_end_nats / self.d_hat.clamp_min(1e-20)
        cooled = self.beta * (1.0 + self.anneal_rate * (1.0 - self.decay))
        return torch.minimum(cold, torch.maximum(cooled, self._reach_beta(largest_gap, critical)))

    def _adaptive_target(self) -> Tensor:
        c = geometric(self.adaptive_c_start, self.adaptive_c_end, self.step, self.beta_anneal_steps)
        return c * self.code_dim / (2.0 * self.d_hat.clamp_min(1e-20))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._measured = False  # d_hat came from the state dict: look at it once more

    def _train_stats(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        rows = x.detach()
        if self.beta_mode != "fixed" and not self._measured:
            if bool(self.d_hat < 0):  # a device read once per construction or load, not per step
                (self._measure_first_d_hat if self.beta_mode == "adaptive" else self._measure_start)(rows)
            self._measured = True
        # The one host read of the step: the kernels take beta as a scalar argument.
        beta = float(self.beta)
        log_weight = self._log_weight()
        if self.estep == "balanced":
            log_weight = self._balanced_log_weight(rows, log_weight, beta)
        st = _soft.soft_assign(rows, self.codebook, log_weight, beta, self.rows_per_chunk,
                              nearest=self.assign == "nearest")
        if self.beta_mode == "anneal":  # the E-step pass gives the gaps when it had the distances
            gaps = st.gaps if st.gaps is not None else _nearest.code_gaps(rows, self.codebook, self.rows_per_chunk)[0]
            # min over micro-batches here and over ranks at the update: the gaps of the global batch
            self._pending_gaps = gaps if self._pending_gaps is None else torch.minimum(self._pending_gaps, gaps)
        counts = torch.bincount(st.indices, minlength=self.num_codes).to(rows.dtype)
        scalars = torch.stack([rows.new_full((), rows.shape[0]), st.min_dist.sum(),
                               st.hard_dist.sum(), st.entropy.sum(), st.soft_dist.sum()])
        parts = [st.soft_counts, st.soft_sums.reshape(-1), counts, st.reached]
        if self.beta_mode == "anneal":
            parts.append(_moments(rows))
        stats = torch.cat(parts + [scalars])
        extra = None
        if self.entropy_loss_weight > 0 and torch.is_grad_enabled() and x.requires_grad:
            extra = self.entropy_loss_weight * self._entropy_loss(x, st, log_weight, beta)
        return st.indices, stats, extra

    def _balanced_log_weight(self, rows: Tensor, log_weight: Tensor | None, beta: float) -> Tensor:
        """log_weight + v: the Sinkhorn column potentials turn the softmax E-step into the balanced one.

        Collective (2 all-reduces of K values per iteration). With gradient accumulation each
        micro-batch is balanced on its own global micro-batch (the columns of one micro-step).
        """
        start = self.balance_v if self.balance_warm_start else None
        if self.balance_beta_scale:  # on the device: self.beta is this step's beta
            then = self.balance_beta
            start = start * torch.where(then > 0, self.beta / then.clamp_min(1e-30), torch.ones_like(then))
            self.balance_beta.copy_(self.beta)
        v = _sinkhorn.balance_potentials(rows, self.codebook, log_weight, beta, self.rows_per_chunk,
                                         self._log_ratio(), self.balance_iters, start)
        if self.balance_warm_start:
            self.balance_v.copy_(v)  # global (from global column sums): identical on every rank
        return v if log_weight is None else log_weight + v

    def _log_ratio(self) -> Tensor:
        """log r_k, the balanced E-step's column marginal (sum_k r_k = 1)."""
        if self.balance_target == "uniform":
            return torch.full_like(self.log_prior, -math.log(self.num_codes))
        return self.log_prior

    def _online_balance(self, soft_counts: Tensor) -> None:
        """``balance_iters`` 0: one Sinkhorn step on ``balance_v`` from the GLOBAL soft counts of the
        step's E-step (its columns under the v it used), i.e. the column log-sum-exp that a Sinkhorn
        pass would compute, taken from the pass the step already made; identical on every rank.

        Before ``_after_update`` (the prior target is the prior the E-step used). A column whose
        mass underflowed to 0 in fp32 is raised by at most ~88 nats per step (clamped at the
        smallest normal fp32), never to inf."""
        log_s = soft_counts.clamp_min(torch.finfo(torch.float32).tiny).log()
        self.balance_v.add_(self._log_ratio() + torch.logsumexp(log_s, 0) - log_s)

    def _entropy_loss(self, x: Tensor, st: _soft.SoftStats, log_weight: Tensor | None, beta: float) -> Tensor:
        """mean_x H(p(.|x)) - H(mean_x p) over the GLOBAL batch, with a chunked backward.

        Its mean-p term is all-reduced before the entropy (one extra all-reduce of K + 2 values,
        only when the loss is on): with R ranks, each rank's rows get the gradient of the global
        loss scaled by R (the data-parallel gradient average divides it back), so R ranks equal one
        process that saw the whole batch. Every rank returns the same (global) value.
        """
        totals = torch.cat([st.soft_counts, torch.stack([st.entropy.sum(), st.entropy.new_full((), x.shape[0])])])
        dist.all_reduce_sum(totals)
        n_global = totals[-1].clamp_min(1.0)
        mean_p = totals[:-2] / n_global
        value = totals[-2] / n_global + torch.special.xlogy(mean_p, mean_p).sum()
        weight = torch.zeros_like(self.log_prior) if log_weight is None else log_weight.clone()
        log_mean_p = mean_p.clamp_min(1e-30).log()
        # EntropyLoss scales its row gradients by 1 / (rows of this call); the global loss wants
        # 1 / n_global per row, times R for the data-parallel average.
        scale = dist.get_world_size() * x.shape[0] / n_global
        return _entropy_loss.EntropyLoss.apply(x, value, self.codebook.clone(), weight, log_mean_p, beta,
                                      self.rows_per_chunk, scale)

    def _eval_indices(self, x: Tensor) -> Tensor:
        beta = float(self.beta)
        if self.assign == "nearest" or beta <= 0:  # adaptive beta unknown before training: nearest
            return _nearest.nearest_codes(x, self.codebook, self.rows_per_chunk)[0]
        log_weight = self._log_weight()
        bias = -beta * self.codebook.square().sum(1)
        if log_weight is not None:
            bias = bias + log_weight
        return _nearest.best_scores(x, self.codebook, bias, 2.0 * beta, self.rows_per_chunk)

    # ------------------------------------------------------------------ M-step and schedules
    def _apply_update(self, stats: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        num_codes, dim = self.num_codes, self.code_dim
        soft_counts = stats[:num_codes]
        soft_sums = stats[num_codes : num_codes * (dim + 1)].view(num_codes, dim)
        counts = stats[num_codes * (dim + 1) : num_codes * (dim + 2)]
        reached = stats[num_codes * (dim + 2) : num_codes * (dim + 3)]
        if self.beta_mode == "anneal":
            moments = stats[num_codes * (dim + 3) : num_codes * (dim + 3) + 1 + dim + dim * dim]
            self._critical = _critical_spread(moments, dim)
        n, sum_min, sum_hard, sum_entropy, sum_soft = stats[-_NUM_SCALARS:].unbind()
        n = n.clamp_min(1.0)
        if self.estep == "balanced" and self.balance_iters == 0:
            self._online_balance(soft_counts)
        self.ema_count.mul_(self.decay).add_(soft_counts, alpha=1.0 - self.decay)
        self.ema_sum.mul_(self.decay).add_(soft_sums, alpha=1.0 - self.decay)
        if self.restart_counts == "hard":
            self.ema_hard_count.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        alive = (self.ema_count > 1e-20 * self.ema_count.sum())[:, None]
        codes = torch.where(alive, self.ema_sum / self.ema_count.clamp_min(1e-30)[:, None], self.codebook)
        if self.l2_normalize:
            codes = F.normalize(codes, dim=1)
        self.codebook.copy_(codes)
        self.ema_sum.copy_(torch.where(alive, self.ema_sum, self.ema_count[:, None] * self.codebook))
        mean_min = sum_min / n
        self.d_hat.copy_(torch.where(self.d_hat < 0, mean_min, 0.9 * self.d_hat + 0.1 * mean_min))
        assign_entropy = sum_entropy / n
        metrics = {
            "beta": self.beta.clone(),  # the beta this step's E-step used
            "distortion": sum_hard / n,
            "distortion_soft": sum_soft / n,
            "assign_entropy": assign_entropy,
            "rate": entropy_of_counts(soft_counts).float() - assign_entropy,
            "underflow_codes": (reached == 0).sum().to(stats.dtype),  # zero soft mass in fp32 this step
            # How balanced this step's E-step was: total variation between its column marginal and r.
            "balance_tv": 0.5 * (soft_counts / soft_counts.sum().clamp_min(1e-30)
                                 - self._log_ratio().exp()).abs().sum(),
        }
        return counts, metrics

    def _restart_counts(self) -> Tensor:
        return self.ema_hard_count if self.restart_counts == "hard" else self.ema_count

    def _after_update(self) -> dict[str, Tensor]:
        total = self.ema_count.sum()
        prior = (self.ema_count / total + self.prior_floor / self.num_codes) / (1.0 + self.prior_floor)
        self.log_prior.copy_(prior.log())
        # The schedules stay on the buffers' device (no host reads): see _train_stats for the one read.
        if self.beta_mode == "fixed":
            self.beta.copy_(geometric(self.beta_start, self.beta_end, self.step, self.beta_anneal_steps))
        elif self.beta_mode == "anneal":
            gaps, self._pending_gaps = self._pending_gaps, None
            largest_gap = dist.all_reduce_max(gaps.neg()).neg().max()  # a second, K-value collective
            self.beta.copy_(self._anneal_next(largest_gap, self._critical))
        else:
            self.beta.copy_(torch.minimum(self._adaptive_target(), self.beta * (1.0 + self.max_beta_growth)))
        return {
            "d_hat": self.d_hat.clone(),
            "prior_entropy": -(prior * self.log_prior).sum(),
            "prior_max_k": prior.max() * self.num_codes,
        }
