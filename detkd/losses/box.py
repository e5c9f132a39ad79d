"""Box-regression distillation: LD for distribution (DFL) heads, GIoU + L1 for heads that regress boxes directly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss

from detkd.losses._common import Reduction, reduce_loss, upcast


def ld(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 10.0,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Localization distillation: KL between teacher and student box-edge distributions (bins on the last dim).

    Zheng et al., "Localization Distillation for Dense Object Detection", CVPR 2022. Follows mmdet's
    ``KnowledgeDistillationKLDivLoss`` exactly: per distribution τ² · mean over bins of
    φ(t/τ)·(log φ(t/τ) − log φ(s/τ)), i.e. the KL divided by the number of bins (mmdet's ``.mean(1)``). The
    high temperature (10) transfers the teacher's uncertainty about each edge, not just its argmax.
    ``reduction="none"`` returns one value per distribution (input shape without the last dim).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"ld: shapes {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)} differ")
    log_p_s = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
    log_p_t = F.log_softmax(upcast(teacher_logits.detach()) / temperature, dim=-1)
    loss = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).mean(-1) * temperature**2
    return reduce_loss(loss, reduction)


def box_distill(
    student_boxes: torch.Tensor,
    teacher_boxes: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    image_size: tuple[float, float] | None = None,
    iou_weight: float = 2.5,
    l1_weight: float = 0.5,
    reduction: Reduction = "mean",
) -> dict[str, torch.Tensor]:
    """Distil decoded xyxy boxes (..., 4) for heads without edge distributions (YOLO26, reg_max = 1).

    Teacher boxes as targets of a GIoU loss (Rezatofighi et al., CVPR 2019) and an L1 loss, weighted per box
    (e.g. by teacher confidence; taken as constants), as in PaddleDetection's PP-YOLOE distillation
    (``ppdet/slim/distill_loss.py::DistillPPYOLOELoss``: GIoU weight 2.5, normalised by Σ w). Returns
    ``{"giou": iou_weight · Σ w·(1 − GIoU) / Σ w, "l1": l1_weight · Σ w·|s − t| / (Σ w · 4)}``.

    The L1 term must be scale-free. With ``image_size`` (H_img, W_img) coordinates are divided by the image size
    (x by W_img, y by H_img), the normalisation of Ultralytics' own YOLO26 L1 box term; for boxes sharing an anchor
    point this equals that term's L1 on normalised ltrb distances. With ``image_size=None`` the boxes are taken as
    already normalised, e.g. in grid units (pixels / the anchor's stride, as Ultralytics' box losses decode them),
    which weighs every pyramid level alike. The default ``l1_weight`` 0.5 keeps Ultralytics' box:L1 gain ratio
    (7.5 : 1.5) against ``iou_weight`` 2.5 (PP-YOLOE's distillation itself has no L1 term; its second box term,
    DFL, also weighs 0.5). ``reduction``: "mean" as above, "sum" Σ w·loss, "none" w·loss per box (shape ...).
    """
    if student_boxes.shape != teacher_boxes.shape or student_boxes.shape[-1] != 4:
        raise ValueError(f"box_distill: need equal (..., 4) boxes, got {student_boxes.shape} and {teacher_boxes.shape}")
    s, t = upcast(student_boxes), upcast(teacher_boxes.detach())
    giou = generalized_box_iou_loss(s.reshape(-1, 4), t.reshape(-1, 4)).reshape(s.shape[:-1])
    l1 = (s - t).abs()
    if image_size is not None:
        img_h, img_w = image_size
        l1 = l1 / s.new_tensor([img_w, img_h, img_w, img_h])
    l1 = l1.mean(-1)
    w = torch.ones_like(giou) if weights is None else upcast(weights.detach()).reshape(giou.shape)
    if reduction == "mean":
        total = w.sum().clamp_min(torch.finfo(w.dtype).tiny)  # all-zero weights give 0, not NaN
        giou, l1 = (w * giou).sum() / total, (w * l1).sum() / total
    else:
        giou, l1 = reduce_loss(w * giou, reduction), reduce_loss(w * l1, reduction)
    return {"giou": iou_weight * giou, "l1": l1_weight * l1}
