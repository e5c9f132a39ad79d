"""Helpers shared by the loss modules: reduction, fp32 promotion and the IoU of paired boxes."""

from __future__ import annotations

from typing import Literal

import torch

Reduction = Literal["mean", "sum", "none"]


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 to fp32, so that sums over whole feature maps cannot overflow; other dtypes unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def reduce_loss(loss: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """``mean`` | ``sum`` | ``none`` of an elementwise loss; the mean of an empty tensor is 0, not NaN."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / max(loss.numel(), 1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def paired_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes paired element-wise: (..., 4) xyxy each → (...). (torchvision's ``box_iou`` is all pairs.)"""
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1) + (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area - inter).clamp(min=1e-9)
