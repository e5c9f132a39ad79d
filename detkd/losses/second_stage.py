"""Distillation from a two-stage teacher's second stage (its RoI head) evaluated at the student's own boxes.

A Faster R-CNN has no dense per-anchor head to pair with a YOLO head, but its RoI head can judge any box. The
distiller decodes the student's boxes at the anchors that matter, runs the teacher's RoI head on them (on the
teacher's own features: :meth:`detkd.adapters.torchvision.TorchvisionAdapter.second_stage`), and these losses turn
its verdict into targets:

- :func:`second_stage_class_kd`: the teacher's softmax over its K+1 classes, mapped to the student's classes, is the
  soft target of each student class sigmoid (binary cross-entropy: Hinton et al.'s soft targets with one Bernoulli per
  class, the form :func:`~detkd.losses.logit.kd_sigmoid` uses for sigmoid heads). The teacher's probability of class k
  is the probability that the box is a k; 1 − p_k, the complement, holds background and every other class, which is
  what a sigmoid's "not k" means. A student class without a teacher counterpart has no target (masked), not a target
  of 0. Averaged over the judged boxes, or (``teacher_weighted``) weighted by the teacher's confidence in each box,
  the weighting of the dense logit term's ``locations: teacher``. IoU-aware (``iou_aware``): p_k times the IoU of the
  student's box with the teacher's refinement of it for class k, VarifocalNet's IoU-aware classification score (Zhang
  et al., CVPR 2021: the class target of a box is its IoU with the object) with the teacher's refined box standing for
  the object. A Faster R-CNN's softmax calls a box with IoU 0.5 a confident k (it was trained so); a YOLOv8 student's
  task loss trains its class scores on TAL's IoU-aligned targets (Feng et al., TOOD, ICCV 2021), which rank a
  well-placed box above a loose one: the product speaks the student's language.
- :func:`second_stage_box_kd`: the teacher's refinement of each student box (the refined box of its most probable
  non-background class) is the target of the student's decoded box: GIoU + L1 on image-normalised coordinates
  (:func:`~detkd.losses.box.box_distill`), weighted by the teacher's confidence in the box (its largest
  non-background probability), so boxes the teacher calls background barely pull.

The idea of letting the teacher's second stage score the student's boxes follows HEAD (Wang et al., "Heterogeneous
Detector Distillation", ECCV 2022), which attaches the teacher's RoI head to the *student's* features as an assistant
head, trained with the student, and distils through it. Here nothing is attached and nothing extra is trained: the
teacher's own, frozen RoI head scores the student's boxes on the *teacher's* features, so the targets are exactly
what the teacher itself would say about those boxes, and the student learns only through them (the RoI head sees
detached boxes; the box term's gradient reaches the student through its decoded boxes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from detkd.losses._common import paired_iou, upcast
from detkd.losses.box import box_distill


def second_stage_targets(
    class_logits: Tensor,
    student_classes: Tensor,
    teacher_classes: Tensor,
    num_student_classes: int,
    boxes: Tensor | None = None,
    refined_boxes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(targets, known), each (R, nc): the teacher's softmax probability of each student class, and whether that
    class has a teacher counterpart. ``class_logits`` (R, K+1): column 0 background; ``student_classes[i]`` pairs with
    teacher column ``teacher_classes[i]`` (1 ... K, never the background column). With the judged ``boxes`` (R, 4)
    and the teacher's ``refined_boxes`` (R, K+1, 4), IoU-aware: each probability times IoU(box, its refinement for
    that class)."""
    if (teacher_classes == 0).any():
        raise ValueError("second_stage_targets: column 0 is the teacher's background, not a class to pair")
    probs = upcast(class_logits.detach()).softmax(-1)
    rows = class_logits.shape[0]
    targets = probs.new_zeros(rows, num_student_classes)
    known = torch.zeros(rows, num_student_classes, dtype=torch.bool, device=probs.device)
    paired = probs[:, teacher_classes]
    if (boxes is None) != (refined_boxes is None):
        raise ValueError("second_stage_targets: IoU-aware targets need both the boxes and their refinements")
    if boxes is not None:
        refined = upcast(refined_boxes.detach())[:, teacher_classes]
        paired = paired * paired_iou(upcast(boxes.detach())[:, None], refined)
    targets[:, student_classes] = paired
    known[:, student_classes] = True
    return targets, known


def second_stage_class_kd(
    student_logits: Tensor, targets: Tensor, known: Tensor, weights: Tensor | None = None
) -> Tensor:
    """Σ_r Σ_c known_rc · BCE(σ(s_rc), p_rc) / max(R, 1): soft-target BCE per student class with a teacher
    counterpart, summed over classes, averaged over the R judged boxes. ``student_logits`` (R, nc) raw. With
    ``weights`` (R,) a weighted mean over the boxes instead, Σ_r w_r · (...) / Σ_r w_r: with the teacher's
    confidence in each box (:func:`teacher_best`), the many boxes it calls background do not dilute the
    ones it recognises when it judges every anchor, as the dense logit term's ``locations: teacher`` does."""
    if student_logits.shape != targets.shape or targets.shape != known.shape:
        raise ValueError(
            f"second_stage_class_kd: shapes {tuple(student_logits.shape)}, {tuple(targets.shape)}, "
            f"{tuple(known.shape)} differ"
        )
    bce = F.binary_cross_entropy_with_logits(upcast(student_logits), targets.detach(), reduction="none")
    per_box = (bce * known).sum(-1)
    if weights is None:
        return per_box.sum() / max(per_box.shape[0], 1)
    weights = upcast(weights.detach())
    return (per_box * weights).sum() / weights.sum().clamp(min=1e-12)


def teacher_best(class_logits: Tensor, refined_boxes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(confidence (R,), box (R, 4), column (R,)) per judged box: the teacher's largest non-background probability,
    its refinement of the box for that class, and that class's column. ``class_logits`` (R, K+1), column 0
    background; ``refined_boxes`` (R, K+1, 4)."""
    confidence, best = upcast(class_logits.detach()).softmax(-1)[:, 1:].max(-1)
    column = best + 1
    return confidence, refined_boxes.detach()[torch.arange(len(best), device=best.device), column], column


def second_stage_box_kd(
    student_boxes: Tensor,
    class_logits: Tensor,
    refined_boxes: Tensor,
    image_size: tuple[float, float],
    l1_weight: float = 1.0,
) -> dict[str, Tensor]:
    """``{"giou", "l1"}`` between the student's decoded boxes (R, 4 xyxy pixels) and the teacher's refinement of
    them: for each box, ``refined_boxes`` (R, K+1, 4) at the teacher's most probable non-background class, weighted
    by that probability (Σ w·loss / Σ w; L1 divided by the image size (H, W)). Gradients reach the student boxes."""
    confidence, target, _ = teacher_best(class_logits, refined_boxes)
    return box_distill(
        student_boxes, target, weights=confidence, image_size=image_size, iou_weight=1.0, l1_weight=l1_weight
    )
