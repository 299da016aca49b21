"""Gradient transformations: one family per module, each a factory returning init/update."""

from gradchain.transforms.adaptive import scale_by_adam, scale_by_rms
from gradchain.transforms.basic import (
    add_decayed_weights,
    identity,
    scale,
    scale_by_learning_rate,
    scale_by_schedule,
    scale_by_sign,
)
from gradchain.transforms.clipping import clip, clip_by_global_norm
from gradchain.transforms.momentum import ema, trace

__all__ = [
    "identity",
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "add_decayed_weights",
    "scale_by_sign",
    "trace",
    "ema",
    "scale_by_adam",
    "scale_by_rms",
    "clip",
    "clip_by_global_norm",
]
