"""The quantizers' argument rules, each written once.

:meth:`bavq.config.QuantizerConfig.validate` and the constructors (:class:`~bavq.quantizers.base.Quantizer`,
:class:`~bavq.quantizers.ba_vq.BAVQ`) both call these, so a ``BAVQ(...)`` built by hand is checked
like a config file. Each function reads the arguments as attributes of ``args`` (a
``QuantizerConfig`` or the quantizer under construction: the names are the same) and raises
:class:`~bavq.rules.ConfigError` (a ValueError) naming the config key, ``quantizer.<argument>``.
"""

from __future__ import annotations

from typing import Any

from bavq.rules import QUANTIZERS, check, one_of


def check_name(name: str) -> None:
    """``quantizer.name`` is a known quantizer."""
    one_of(name, "quantizer.name", QUANTIZERS)


def check_codebook_args(args: Any) -> None:
    """The arguments every quantizer shares (see :class:`~bavq.quantizers.base.Quantizer`)."""
    check(args.num_codes >= 2, "quantizer.num_codes", f"must be >= 2, got {args.num_codes}")
    check(args.code_dim >= 1, "quantizer.code_dim", f"must be >= 1, got {args.code_dim}")
    check(0.0 <= args.decay < 1.0, "quantizer.decay", f"must be in [0, 1), got {args.decay}")
    check(args.eps > 0, "quantizer.eps", f"must be > 0, got {args.eps}")
    check(args.commitment >= 0, "quantizer.commitment", f"must be >= 0, got {args.commitment}")
    check(args.chunk_size > 0, "quantizer.chunk_size", f"must be > 0, got {args.chunk_size}")
    check(args.chunk_budget_mib > 0, "quantizer.chunk_budget_mib", f"must be > 0, got {args.chunk_budget_mib}")
    one_of(args.init, "quantizer.init", ("random", "data"))
    check(args.dead_code_threshold >= 0, "quantizer.dead_code_threshold", "must be >= 0")
    check(not args.dead_code_relative or args.dead_code_threshold < 1, "quantizer.dead_code_threshold",
          f"with quantizer.dead_code_relative it is a fraction of the mean count and must be < 1 (>= 1 restarts "
          f"every code below the mean, half the codebook, at every step), got {args.dead_code_threshold}")


def check_ba_vq_args(args: Any) -> None:
    """The BA-VQ arguments (see :class:`~bavq.quantizers.ba_vq.BAVQ`)."""
    one_of(args.beta_mode, "quantizer.beta_mode", ("anneal", "adaptive", "fixed"))
    for key in ("beta_start", "beta_end", "adaptive_c_start", "adaptive_c_end"):
        check(getattr(args, key) > 0, f"quantizer.{key}", f"must be > 0, got {getattr(args, key)}")
    check(args.beta_anneal_steps >= 0, "quantizer.beta_anneal_steps", "must be >= 0")
    check(args.max_beta_growth > 0, "quantizer.max_beta_growth", "must be > 0")
    check(args.entropy_weight >= 0, "quantizer.entropy_weight", "must be >= 0")
    check(args.prior_floor > 0, "quantizer.prior_floor", f"must be > 0, got {args.prior_floor}")
    one_of(args.assign, "quantizer.assign", ("nearest", "map"))
    check(args.entropy_loss_weight >= 0, "quantizer.entropy_loss_weight", "must be >= 0")
    check(args.anneal_start_nats > 0, "quantizer.anneal_start_nats", f"must be > 0, got {args.anneal_start_nats}")
    check(args.anneal_end_nats > args.anneal_start_nats, "quantizer.anneal_end_nats",
          f"must be > quantizer.anneal_start_nats ({args.anneal_start_nats}), got {args.anneal_end_nats}")
    check(0 < args.anneal_rate <= 1, "quantizer.anneal_rate", f"must be in (0, 1], got {args.anneal_rate}")
    one_of(args.estep, "quantizer.estep", ("softmax", "balanced"))
    check(args.balance_iters >= 0, "quantizer.balance_iters", f"must be >= 0, got {args.balance_iters}")
    check(args.balance_iters >= 1 or args.balance_warm_start, "quantizer.balance_iters",
          "0 (the online balance) needs quantizer.balance_warm_start: true; use >= 1 otherwise")
    one_of(args.balance_target, "quantizer.balance_target", ("uniform", "prior"))
    check(not args.balance_warm_start or args.estep == "balanced", "quantizer.balance_warm_start",
          f"applies to estep 'balanced' only, but estep is '{args.estep}'")
    check(not args.balance_beta_scale or args.balance_warm_start, "quantizer.balance_beta_scale",
          "rescales the warm-started potentials: it needs quantizer.balance_warm_start: true")
    one_of(args.restart_counts, "quantizer.restart_counts", ("soft", "hard"))
