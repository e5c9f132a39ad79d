"""Helpers shared by the loss modules: reduction and fp32 promotion."""

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
