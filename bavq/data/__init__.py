"""Data: map-style sources for quick runs, WebDataset shards at scale, and the shard writer (bavq-prep).

The trainer needs only :func:`build_train_stream` and :func:`build_eval_loader`.
"""

from bavq.data.loaders import TrainStream, build_eval_loader, build_train_stream
from bavq.data.transforms import ImageTransform

__all__ = ["ImageTransform", "TrainStream", "build_eval_loader", "build_train_stream"]
