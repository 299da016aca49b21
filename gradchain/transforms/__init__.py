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
from gradchain.transforms.clipping import clip, clip_by_agc, clip_by_global_norm
from gradchain.transforms.curvature import scale_by_abs_hessian_diag
from gradchain.transforms.hypergrad import hypergrad_lr, hypergrad_lr_value
from gradchain.transforms.inplace import (
    scale_by_adam_inplace,
    scale_by_adopt,
    scale_by_laprop,
    scale_by_rms_inplace,
)
from gradchain.transforms.mechanic import mechanic_scale, mechanic_scale_value
from gradchain.transforms.momentum import ema, qh_momentum, trace
from gradchain.transforms.palm import palm_beta2
from gradchain.transforms.schedule_free import (
    schedule_free,
    schedule_free_eval_params,
    to_eval,
    to_train,
)
from gradchain.transforms.sm3 import scale_by_sm3
from gradchain.transforms.soap import soap_precondition

__all__ = [
    "identity",
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "add_decayed_weights",
    "scale_by_sign",
    "trace",
    "ema",
    "qh_momentum",
    "scale_by_adam",
    "scale_by_rms",
    "palm_beta2",
    "scale_by_adam_inplace",
    "scale_by_rms_inplace",
    "scale_by_laprop",
    "scale_by_adopt",
    "soap_precondition",
    "schedule_free",
    "schedule_free_eval_params",
    "to_eval",
    "to_train",
    "mechanic_scale",
    "hypergrad_lr",
    "hypergrad_lr_value",
    "mechanic_scale_value",
    "scale_by_sm3",
    "scale_by_abs_hessian_diag",
    "clip",
    "clip_by_global_norm",
    "clip_by_agc",
]
