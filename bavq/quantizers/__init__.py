"""Codebook quantizers: VQ-EMA (baseline) and BA-VQ (Blahut-Arimoto), one contract.

``build_quantizer(cfg)`` turns a :class:`bavq.config.QuantizerConfig` into a module.
"""

from __future__ import annotations

from bavq.config import QuantizerConfig
from bavq.quantizers.ba_vq import BAVQ
from bavq.quantizers.base import Quantizer, QuantizerOutput
from bavq.quantizers.checks import check_name
from bavq.quantizers.vq_ema import VQEMA

__all__ = ["BAVQ", "VQEMA", "Quantizer", "QuantizerOutput", "build_quantizer"]


def build_quantizer(cfg: QuantizerConfig, *, seed: int = 0, usage_window: int = 65536) -> Quantizer:
    """The quantizer described by ``cfg``; ``seed`` (train.seed) drives the random init and restarts
    identically on every rank, ``usage_window`` (log.usage_window) sizes the window-usage metric.
    An unknown ``name`` or a bad field raises ConfigError naming its key."""
    check_name(cfg.name)
    common = dict(
        decay=cfg.decay, eps=cfg.eps, commitment=cfg.commitment, chunk_size=cfg.chunk_size,
        chunk_budget_mib=cfg.chunk_budget_mib, init=cfg.init, dead_code_threshold=cfg.dead_code_threshold,
        dead_code_relative=cfg.dead_code_relative, l2_normalize=cfg.l2_normalize, seed=seed, usage_window=usage_window,
    )
    if cfg.name == "vq_ema":
        return VQEMA(cfg.num_codes, cfg.code_dim, **common)
    return BAVQ(
        cfg.num_codes, cfg.code_dim, beta_mode=cfg.beta_mode, beta_start=cfg.beta_start,
        beta_end=cfg.beta_end, beta_anneal_steps=cfg.beta_anneal_steps,
        adaptive_c_start=cfg.adaptive_c_start, adaptive_c_end=cfg.adaptive_c_end,
        max_beta_growth=cfg.max_beta_growth, entropy_weight=cfg.entropy_weight,
        prior_floor=cfg.prior_floor, assign=cfg.assign, entropy_loss_weight=cfg.entropy_loss_weight,
        anneal_start_nats=cfg.anneal_start_nats, anneal_end_nats=cfg.anneal_end_nats,
        anneal_rate=cfg.anneal_rate, estep=cfg.estep, balance_iters=cfg.balance_iters,
        balance_target=cfg.balance_target, balance_warm_start=cfg.balance_warm_start,
        balance_beta_scale=cfg.balance_beta_scale, restart_counts=cfg.restart_counts, **common,
    )
