"""Distillation losses for detectors: pure functions where there is nothing to learn, modules where there is.

Feature imitation (``feature``): :func:`fitnet`, :func:`cwd`, :func:`pkd`, :func:`score_weighted_l2`,
:class:`MGDLoss`, :class:`FGDLoss` (with :func:`fgd_masks`), each registered under its recipe name in
:mod:`detkd.losses.registry` (:data:`FEATURE_LOSSES`; add one with :func:`register_feature_loss`). Logits
(``logit``): :func:`kd_sigmoid`. Boxes (``box``): :func:`ld`, :func:`box_distill`. A two-stage teacher's RoI head
judging the student's boxes (``second_stage``): :func:`second_stage_targets`, :func:`second_stage_class_kd`,
:func:`second_stage_box_kd`, :func:`teacher_best`. Teacher inputs are always
detached inside the losses. :func:`paired_iou`: the IoU of boxes paired element-wise, for the terms that weigh by it.
"""

from detkd.losses._common import paired_iou
from detkd.losses.box import box_distill, ld
from detkd.losses.feature import FGDLoss, GlobalContext, MGDLoss, cwd, fgd_masks, fitnet, pkd, score_weighted_l2
from detkd.losses.logit import kd_sigmoid
from detkd.losses.registry import FEATURE_LOSSES, register_feature_loss
from detkd.losses.second_stage import (
    second_stage_box_kd,
    second_stage_class_kd,
    second_stage_targets,
    teacher_best,
)

__all__ = [
    "FEATURE_LOSSES",
    "FGDLoss",
    "GlobalContext",
    "MGDLoss",
    "box_distill",
    "cwd",
    "fgd_masks",
    "fitnet",
    "kd_sigmoid",
    "ld",
    "paired_iou",
    "pkd",
    "register_feature_loss",
    "score_weighted_l2",
    "second_stage_box_kd",
    "second_stage_class_kd",
    "second_stage_targets",
    "teacher_best",
]
