"""The one view of a detector that distillation needs, whatever the detector is, and the adapter that reads it."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import Tensor, nn


@dataclass
class DetectorView:
    """Neck features and dense head outputs of one forward pass.

    Dense outputs are flattened over the feature levels in ``strides`` order (P3 then P4 then P5), one row per
    anchor point, as Ultralytics' criterion sees them. A detector without dense outputs (a two-stage teacher) leaves
    them ``None`` and offers features (and backbone stages), and its second stage to judge boxes it is given.
    """

    feats: list[Tensor]  # (N, C, H, W) per neck level, strides 8/16/32 (an FPN: 4 ... 64)
    strides: list[int]
    names: dict[int, str]
    cls_logits: Tensor | None = None  # (N, A, nc) raw, sigmoid per class
    box_logits: Tensor | None = None  # (N, A, 4, reg_max) raw DFL logits (sides l, t, r, b); None when reg_max == 1
    box_ltrb: Tensor | None = None  # (N, A, 4) distances from the anchor point, in units of its stride
    anchor_points: Tensor | None = None  # (A, 2) anchor centres in grid units
    stride_tensor: Tensor | None = None  # (A, 1)
    # (N, C, H, W) per backbone stage feeding the neck (ResNet C2-C5; a YOLO's at strides 8/16/32, when its
    # adapter records them: UltralyticsAdapter.record_backbone)
    backbone_feats: list[Tensor] | None = None
    backbone_strides: list[int] | None = None
    # a two-stage detector's adapter, whose second stage judges boxes on a view's features:
    # ``two_stage.second_stage(view, boxes, image_size)`` and ``two_stage.dense_verdict(view, strides, image_size)``
    # (detkd.adapters.torchvision). The adapter, not a function bound to one view, so that a view cut to some
    # images (of_images) is judged on its own images' features. None for single-stage detectors
    two_stage: Any = None

    @property
    def reg_max(self) -> int:
        return 1 if self.box_logits is None else self.box_logits.shape[-1]

    def boxes_xyxy(self, pixels: bool = False) -> Tensor:
        """Decoded boxes (N, A, 4): in grid units of each anchor's level, or in input pixels."""
        lt, rb = self.box_ltrb.chunk(2, -1)
        boxes = torch.cat((self.anchor_points - lt, self.anchor_points + rb), -1)
        return boxes * self.stride_tensor if pixels else boxes

    def level_sizes(self) -> list[int]:
        return [f.shape[-2] * f.shape[-1] for f in self.feats]

    def of_images(self, which: slice) -> DetectorView:
        """The view of some of the batch's images (a batch of labeled and unlabeled ones is split by it); anchors and
        strides are shared by all images."""

        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[which]

        return replace(
            self,
            feats=[f[which] for f in self.feats],
            cls_logits=cut(self.cls_logits),
            box_logits=cut(self.box_logits),
            box_ltrb=cut(self.box_ltrb),
            backbone_feats=None if self.backbone_feats is None else [f[which] for f in self.backbone_feats],
        )


def grid_stride(size: int, feature: Tensor) -> int:
    """The power of two by which ``feature``'s grid divides an input of ``size`` pixels (ceil-mode grids round)."""
    return 2 ** round(math.log2(size / feature.shape[-1]))


class DetectorAdapter(Protocol):
    """What the distiller and the criterion need of a detector, student or teacher (one adapter per family).

    ``channels``, ``strides`` and ``names`` describe the feature levels and classes (the distiller builds its
    connectors and class pairs from them), ``backbone_channels`` and ``backbone_strides`` the backbone stages that
    feed the neck (for ``from: backbone`` feature terms, whose views need ``record_backbone()`` first: it returns
    handles to ``remove()`` when done, none where views always carry them); ``view`` reads a :class:`DetectorView`
    off the output of the model's forward pass (a student's, with gradients); calling the adapter runs the frozen
    model on images (a teacher's).
    ``dense_head``: whether views carry per-anchor class and box outputs (logit and box terms pair them);
    ``roi_head``: whether views carry a second stage that judges given boxes (``view.two_stage``: the
    ``second_stage`` terms use it, and the dense terms its dense verdict).
    """

    model: nn.Module
    dense_head: bool
    roi_head: bool

    @property
    def channels(self) -> list[int]: ...

    @property
    def strides(self) -> list[int]: ...

    @property
    def names(self) -> dict[int, str]: ...

    @property
    def backbone_channels(self) -> list[int]: ...

    @property
    def backbone_strides(self) -> list[int]: ...

    def record_backbone(self) -> list: ...  # handles with ``remove()``

    def view(self, preds) -> DetectorView: ...

    def __call__(self, images: Tensor) -> DetectorView: ...
