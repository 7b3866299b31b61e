"""The data builders called from a whole Config the way the trainer calls them (tests/ is on
sys.path under pytest, no package)."""

from __future__ import annotations

from bavq.config import Config
from bavq.data import build_eval_loader, build_train_stream


def train_stream(cfg: Config, rank: int, world_size: int):
    """``build_train_stream`` from the data section plus train.batch_size and train.seed."""
    return build_train_stream(cfg.data, rank, world_size, batch_size=cfg.train.batch_size, seed=cfg.train.seed)


def eval_loader(cfg: Config, rank: int, world_size: int):
    """``build_eval_loader`` from the data section plus eval.batch_size."""
    return build_eval_loader(cfg.data, rank, world_size, batch_size=cfg.eval.batch_size)
