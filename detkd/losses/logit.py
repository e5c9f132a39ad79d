"""Classification-logit distillation for sigmoid (per-class) detection heads such as YOLOv8/11/26."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from detkd.losses._common import Reduction, reduce_loss, upcast


def kd_sigmoid(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    beta: float | None = None,
) -> torch.Tensor:
    """Soft-target KD for sigmoid heads: τ² · BCE(σ(s/τ), σ(t/τ)) per element, optionally QFL-weighted.

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep Learning Workshop
    (arXiv 2015), with the softmax over classes replaced by one Bernoulli per class, because YOLO class scores are
    independent sigmoids. With ``beta`` set, each element is multiplied by |σ(s/τ) − σ(t/τ)|^β: the quality focal
    loss of Li et al., "Generalized Focal Loss", NeurIPS 2020, as PaddleDetection's PP-YOLOE distillation uses it
    (β = 2), so the many easy background anchors the student already matches stop dominating. As in mmdet's
    ``quality_focal_loss`` the modulating factor is not detached. The BCE against a soft target is minimal, not 0,
    at s == t (it equals τ² times the target's entropy); its gradient there is 0. ``reduction="none"`` returns
    the elementwise loss, shaped like the inputs.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kd_sigmoid: shapes {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)} differ")
    scaled = upcast(student_logits) / temperature
    target = torch.sigmoid(upcast(teacher_logits.detach()) / temperature)
    loss = F.binary_cross_entropy_with_logits(scaled, target, reduction="none") * temperature**2
    if beta is not None:
        loss = loss * (torch.sigmoid(scaled) - target).abs().pow(beta)
    return reduce_loss(loss, reduction)
