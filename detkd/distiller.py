"""Pairs a student's and a teacher's :class:`DetectorView` and computes the configured distillation terms.

Features pair by stride (P3 with P3 ...), through a connector from student to teacher channels (resized when
the grids differ): the neck's levels, or with ``from: backbone`` the backbone stages that feed it (a YOLO's at
strides 8/16/32, a ResNet's C3-C5). Dense head outputs pair anchor by anchor, so logit and box terms need both heads
on the same strides and input size. A two-stage teacher has no dense head; its RoI head judges the student's own
decoded boxes instead (``second_stage`` terms, ``kd_rcnn_cls`` and ``kd_rcnn_box``). Classes pair by name (or
``class_map``): a COCO-80 teacher can teach a 3-class student; student classes the teacher does not know get no logit
target.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkd import losses
from detkd.adapters.view import DetectorAdapter, DetectorView
from detkd.config import DistillConfig, FeatureLossConfig, ScheduleConfig
from detkd.errors import DetkdError
from detkd.losses.registry import FeatureLoss
from detkd.ultralytics_internals import Assignment, task_aligned_targets
from detkd.utils import class_key


def build_connector(kind: str, c_in: int, c_out: int) -> nn.Module:
    """Student → teacher channel map: 1×1 conv (FitNet), + BN, or Ultralytics' conv-ReLU-conv projector."""
    if kind == "conv":
        return nn.Conv2d(c_in, c_out, 1)
    if kind == "conv_bn":
        return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
    if kind == "mlp":
        return nn.Sequential(nn.Conv2d(c_in, c_out, 1), nn.ReLU(inplace=True), nn.Conv2d(c_out, c_out, 1))
    raise DetkdError(f"recipe: unknown connector {kind!r}")


def class_pairs(
    student_names: dict[int, str], teacher_names: dict[int, str], class_map: dict[str, str] | None = None
) -> tuple[list[int], list[int]]:
    """(student indices, teacher indices) of the classes both know, by name or by ``class_map``."""
    by_name = {class_key(n): i for i, n in teacher_names.items()}
    s_idx, t_idx = [], []
    for i, name in sorted(student_names.items()):
        target = (class_map or {}).get(name, name)
        if class_map and name in class_map and class_key(target) not in by_name:
            raise DetkdError(f"recipe: class_map maps '{name}' to '{target}', which the teacher does not have")
        if class_key(target) in by_name:
            s_idx.append(i)
            t_idx.append(by_name[class_key(target)])
    return s_idx, t_idx


def schedule_factor(cfg: ScheduleConfig, progress: float, epochs: int) -> float:
    """Distillation weight multiplier at ``progress`` (epochs done, fractional) of ``epochs``."""
    end = epochs - cfg.stop_last_epochs
    if progress >= end:
        return 0.0
    factor = min(1.0, progress / cfg.warmup_epochs) if cfg.warmup_epochs > 0 else 1.0
    span = max(end - cfg.warmup_epochs, 1e-9)
    t = min(max((progress - cfg.warmup_epochs) / span, 0.0), 1.0)
    if cfg.decay == "linear":
        factor *= 1.0 - t
    elif cfg.decay == "cosine":
        factor *= 0.5 * (1.0 + math.cos(math.pi * t))
    return factor


def gt_boxes_per_image(batch: dict, n: int, image_size: tuple[int, int]) -> list[Tensor]:
    """Ultralytics batch labels (normalised xywh + batch_idx) → one (K, 4) xyxy pixel tensor per image."""
    h, w = image_size
    xywh = batch["bboxes"] * torch.tensor([w, h, w, h], device=batch["bboxes"].device, dtype=batch["bboxes"].dtype)
    xyxy = torch.cat((xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), 1)
    idx = batch["batch_idx"].view(-1).long()
    return [xyxy[idx == i] for i in range(n)]


def pairs_by_stride(student_strides: list[int], teacher_strides: list[int]) -> dict[int, int]:
    """Student level -> the (first) teacher level with the same stride, for the student levels that have one."""
    return {i: teacher_strides.index(s) for i, s in enumerate(student_strides) if s in teacher_strides}


def _feature_levels(adapter: DetectorAdapter, source: str, role: str, term: int) -> tuple[list[int], list[int]]:
    """(channels, strides) of the features a term reads ``from`` (``neck`` or ``backbone``) of one detector."""
    if source == "neck":
        return list(adapter.channels), list(adapter.strides)
    strides = list(adapter.backbone_strides or [])
    if not strides:
        raise DetkdError(
            f"recipe: distill.feature[{term}] from: backbone needs the {role}'s backbone stage outputs, which it "
            f"({type(adapter.model).__name__}) does not offer separately from its neck; use from: neck"
        )
    return list(adapter.backbone_channels), strides


def _view_levels(view: DetectorView, source: str) -> list[Tensor]:
    if source == "neck":
        return view.feats
    if view.backbone_feats is None:
        raise DetkdError(
            "recipe: a from: backbone feature term got a view without backbone outputs (record_backbone() was "
            "not called on its adapter)"
        )
    return view.backbone_feats


def _weighted_mean(per_anchor: Tensor, weights: Tensor) -> Tensor:
    """Σ w·ℓ / Σ w over anchors, the sum clamped at 1 as Ultralytics normalises its class loss."""
    return (per_anchor * weights).sum() / weights.sum().clamp(min=1.0)


class _LossInputs:
    """The :data:`~detkd.losses.registry.INPUTS` of one forward pass, each computed once, when a loss first asks."""

    def __init__(self, batch: dict, teacher: DetectorView):
        self.batch, self.teacher = batch, teacher

    def for_loss(self, entry: FeatureLoss, stride: int) -> dict[str, object]:
        """The loss's inputs at the teacher's features of ``stride`` (its class scores: of the head level there)."""
        if "teacher_scores" in entry.inputs and self.teacher.cls_logits is None:
            raise DetkdError(f"recipe: the '{entry.name}' feature loss needs a teacher with dense class scores")
        given = {name: getattr(self, name) for name in entry.inputs}
        if "teacher_scores" in given:
            given["teacher_scores"] = given["teacher_scores"][self.teacher.strides.index(stride)]
        return given

    @cached_property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.batch["img"].shape[-2:])

    @cached_property
    def gt_boxes(self) -> list[Tensor]:
        return gt_boxes_per_image(self.batch, self.batch["img"].shape[0], self.image_size)

    @cached_property
    def teacher_scores(self) -> list[Tensor]:
        """Teacher's max class probability per location, split by level: (N, 1, H·W) each (Ultralytics' weights)."""
        t = self.teacher
        scores = t.cls_logits.detach().float().sigmoid().max(-1).values.unsqueeze(1)
        return list(scores.split(t.level_sizes(), dim=-1))


class Distiller(nn.Module):
    """Learned parts (connectors, MGD generators, FGD context blocks) and the loss computation.

    Built from a recipe's ``distill`` section and the two adapters (their levels, channels and classes); the
    adapters themselves are not kept, so the teacher never enters this module's parameters. ``student_names``
    defaults to the student model's classes (a trainer passes the data set's).
    """

    def __init__(
        self,
        cfg: DistillConfig,
        student: DetectorAdapter,
        teacher: DetectorAdapter,
        student_names: dict[int, str] | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        s_strides, t_strides = list(student.strides), list(teacher.strides)
        self._check_teacher_feeds(cfg, teacher, s_strides)
        # student level -> teacher level with the same stride: the neck's, and each feature term's (neck or backbone)
        self.level_pairs = pairs_by_stride(s_strides, t_strides)
        self.feature_pairs: list[dict[int, int]] = []
        self.feature_parts = nn.ModuleList()
        for i, f in enumerate(cfg.feature):
            if f.loss not in losses.FEATURE_LOSSES:
                known = ", ".join(sorted(losses.FEATURE_LOSSES))
                raise DetkdError(f"recipe: unknown feature loss {f.loss!r} (known: {known})")
            s_channels, s_levels = _feature_levels(student, f.from_, "student", i)
            t_channels, t_levels = _feature_levels(teacher, f.from_, "teacher", i)
            pairs = pairs_by_stride(s_levels, t_levels)
            parts = nn.ModuleDict()
            for level in f.levels:
                if level not in pairs:
                    kind = "feature level" if f.from_ == "neck" else "backbone stage"
                    raise DetkdError(
                        f"recipe: {kind} {level} of the student (strides {s_levels}) has no teacher "
                        f"{kind} with the same stride (teacher strides {t_levels})"
                    )
                parts[str(level)] = self._feature_module(f, s_channels[level], t_channels[pairs[level]])
            self.feature_pairs.append(pairs)
            self.feature_parts.append(parts)
        dense = cfg.logit.weight > 0 or cfg.box.weight > 0
        if dense and teacher.dense_head and s_strides != t_strides:
            raise DetkdError(
                f"recipe: logit/box distillation pairs anchors, which needs equal head strides "
                f"(student {s_strides}, teacher {t_strides}); use feature losses only"
            )
        names = student.names if student_names is None else student_names
        s_idx, t_idx = class_pairs(names, teacher.names, cfg.class_map)
        by_class = [
            ("logit distillation", cfg.logit.weight > 0),
            ("distill.second_stage", cfg.second_stage.cls_weight > 0),
        ]
        by_class.append(("distill.pseudo", cfg.pseudo is not None))
        if not s_idx and (term := next((name for name, on in by_class if on), None)):
            raise DetkdError(f"recipe: {term} needs classes that teacher and student share (none match)")
        self.register_buffer("student_classes", torch.tensor(s_idx, dtype=torch.long), persistent=False)
        self.register_buffer("teacher_classes", torch.tensor(t_idx, dtype=torch.long), persistent=False)

    @staticmethod
    def _check_teacher_feeds(cfg: DistillConfig, teacher: DetectorAdapter, s_strides: list[int]) -> None:
        """Refuse, before any step, a term the teacher cannot feed, in one line naming the term and the teacher:
        dense logit/box terms pair the teacher's per-anchor outputs, which a two-stage teacher makes from its two
        stages at the student's anchors (its dense verdict) when its FPN has a level at each of the student's
        strides; losses weighted by dense class scores read them on the teacher's own levels, which a two-stage
        teacher does not have; ``second_stage`` terms need a teacher's RoI head to judge boxes, which a single-stage
        teacher does not have, and ``second_stage.dense`` shapes the dense verdict the logit/box terms read, so it
        needs a two-stage teacher and one of those terms."""
        if cfg.second_stage.active and not getattr(teacher, "roi_head", False):
            raise DetkdError(
                f"recipe: distill.second_stage needs a two-stage teacher's second stage (RoI head) to judge the "
                f"student's boxes, which this teacher ({type(teacher.model).__name__}: single-stage) does not have; "
                "use distill.logit and distill.box with it"
            )
        if cfg.second_stage.dense != "cells" and not getattr(teacher, "roi_head", False):
            raise DetkdError(
                f"recipe: distill.second_stage.dense shapes a two-stage teacher's dense verdict, which this teacher "
                f"({type(teacher.model).__name__}: single-stage, a dense head of its own) does not make; remove it"
            )
        if cfg.second_stage.dense != "cells" and cfg.logit.weight == 0 and cfg.box.weight == 0:
            raise DetkdError(
                "recipe: distill.second_stage.dense shapes what distill.logit and distill.box read, and neither has "
                "a weight: give one a weight or remove it"
            )
        if teacher.dense_head:
            return
        dense_terms = [name for name, c in (("distill.logit", cfg.logit), ("distill.box", cfg.box)) if c.weight > 0]
        if dense_terms and getattr(teacher, "roi_head", False):  # a two-stage teacher: its dense verdict
            if missing := [s for s in s_strides if s not in teacher.strides]:
                raise DetkdError(
                    f"recipe: {dense_terms[0]} pairs the student's anchors with the teacher's dense verdict, which "
                    f"needs a teacher FPN level at each student stride: none at {missing} (teacher strides "
                    f"{list(teacher.strides)})"
                )
            dense_terms = []
        dense_terms += [
            f"distill.feature loss '{f.loss}'"
            for f in cfg.feature
            if f.loss in losses.FEATURE_LOSSES and "teacher_scores" in losses.FEATURE_LOSSES[f.loss].inputs
        ]
        if dense_terms:
            raise DetkdError(
                f"recipe: {dense_terms[0]} needs the teacher's dense per-anchor outputs, which this teacher "
                f"({type(teacher.model).__name__}: two-stage, no dense head) does not have; use feature terms and "
                "distill.second_stage with it"
            )

    @staticmethod
    def _feature_module(f: FeatureLossConfig, c_s: int, c_t: int) -> nn.Module:
        """The loss's own module (it aligns channels itself), else the connector to the teacher's channels."""
        entry = losses.FEATURE_LOSSES[f.loss]
        if entry.learned:
            return entry.definition(c_s, c_t, **f.params)
        if c_s == c_t and not entry.connector_at_equal_channels:
            return nn.Identity()
        return build_connector(f.connector, c_s, c_t)

    @property
    def uses_backbone(self) -> bool:
        """Whether a feature term reads the backbone's stage outputs (views need ``record_backbone()``)."""
        return any(f.from_ == "backbone" for f in self.cfg.feature)

    @property
    def term_names(self) -> list[str]:
        """Names of the logged terms, fixed for a run (Ultralytics keys its loss columns on the first batch)."""
        names = [f"kd_{f.loss}" for f in self.cfg.feature]
        if len(set(names)) != len(names):  # the same loss twice (e.g. on different levels): number them
            names = [f"kd_{f.loss}{i}" for i, f in enumerate(self.cfg.feature)]
        if self.cfg.logit.weight > 0:
            names.append("kd_cls")
        if self.cfg.box.weight > 0:
            names.append("kd_box")
        if self.cfg.second_stage.cls_weight > 0:
            names.append("kd_rcnn_cls")
        if self.cfg.second_stage.box_weight > 0:
            names.append("kd_rcnn_box")
        return names

    def forward(
        self, s: DetectorView, t: DetectorView, batch: dict, assigned: Assignment | None = None
    ) -> dict[str, Tensor]:
        """Weighted distillation terms (unscaled by the schedule), keyed by :attr:`term_names`. ``assigned``: what
        the student's task loss assigned this batch (needed by ``locations: positives`` and ``gate``)."""
        terms = {}
        names = iter(self.term_names)
        inputs = _LossInputs(batch, t)
        for f, parts, pairs in zip(self.cfg.feature, self.feature_parts, self.feature_pairs):
            entry = losses.FEATURE_LOSSES[f.loss]
            s_levels, t_levels, t_strides = _view_levels(s, f.from_), _view_levels(t, f.from_), t.strides
            if f.from_ == "backbone":
                t_strides = t.backbone_strides
            total = 0.0
            for level, part in parts.items():
                level = int(level)
                t_level = pairs[level]
                s_feat, t_feat = s_levels[level].float(), t_levels[t_level].float().detach()
                given = inputs.for_loss(entry, t_strides[t_level])
                if entry.learned:  # aligns the student itself, at the teacher's grid
                    value = part(self._resize(s_feat, t_feat), t_feat, **given)
                else:
                    value = entry.definition(self._resize(part(s_feat), t_feat), t_feat, **given, **f.params)
                total = total + (sum(value.values()) if isinstance(value, dict) else value)
            terms[next(names)] = f.weight * total
        if self.cfg.logit.weight > 0 or self.cfg.box.weight > 0:
            if t.cls_logits is None:  # a two-stage teacher: its dense verdict at the student's anchors
                t = self._dense_teacher(s, t, tuple(batch["img"].shape[-2:]), self.cfg.second_stage.dense)
            t_cls = t.cls_logits.float().detach()[..., self.teacher_classes]
            s_cls = s.cls_logits.float()[..., self.student_classes]
            locations = {}  # per location kind (and the gate), computed once when logit and box terms share it

            def where(c, box: bool) -> Tensor:
                """The term's weight per anchor: its locations, times the teacher-better gate when it has one."""
                if c.locations not in locations:
                    locations[c.locations] = self._location_weights(c.locations, t_cls, assigned)
                if c.gate == "none":
                    return locations[c.locations]
                if assigned is None:
                    raise DetkdError("recipe: 'gate: teacher_better' needs the student's assigner, which is missing")
                if "better" not in locations:  # shared by the logit and box gates
                    targets = assigned.scores[..., self.student_classes]
                    locations["better"] = teacher_better_classes(s_cls, t_cls, targets)
                better = locations["better"]
                if box:  # at positives the box decides; elsewhere (no target box) the class scores do
                    boxes = teacher_better_boxes(s.boxes_xyxy(pixels=True), t.boxes_xyxy(pixels=True), assigned.boxes)
                    better = torch.where(assigned.fg_mask, boxes, better)
                return locations[c.locations] * better

        if self.cfg.logit.weight > 0:
            c = self.cfg.logit
            per_anchor = losses.kd_sigmoid(s_cls, t_cls, c.temperature, reduction="none", beta=c.qfl_beta).sum(-1)
            terms[next(names)] = c.weight * _weighted_mean(per_anchor, where(c, box=False))
        if self.cfg.box.weight > 0:
            c = self.cfg.box
            weights = where(c, box=True)
            if s.reg_max > 1 and s.reg_max == t.reg_max:
                per_anchor = losses.ld(s.box_logits.float(), t.box_logits.float(), c.temperature, "none").mean(-1)
                box = _weighted_mean(per_anchor, weights)
            else:  # no shared distribution: decoded boxes, in grid units so every level weighs alike
                parts = losses.box_distill(
                    s.boxes_xyxy().float(), t.boxes_xyxy(), weights=weights, iou_weight=1.0, l1_weight=c.l1_weight
                )
                box = parts["giou"] + parts["l1"]
            terms[next(names)] = c.weight * box
        if self.cfg.second_stage.active:
            for value in self._second_stage_terms(s, t, batch, assigned):
                terms[next(names)] = value
        return terms

    def _second_stage_terms(
        self, s: DetectorView, t: DetectorView, batch: dict, assigned: Assignment | None
    ) -> list[Tensor]:
        """The weighted ``second_stage`` terms, class then box (those with a weight): the teacher's RoI head judges
        the student's decoded boxes at its assigned positives (unless ``positives`` is off) and its ``topk`` most
        confident anchors per image (:mod:`detkd.losses.second_stage`)."""
        c = self.cfg.second_stage
        if assigned is None:
            raise DetkdError(
                "recipe: distill.second_stage judges the student's positives: it needs the student's "
                "assigner, which is missing"
            )
        s_cls = s.cls_logits.float()
        judged = torch.zeros_like(assigned.fg_mask)
        k = min(c.topk, s_cls.shape[1])
        if k:
            top = s_cls.detach().amax(-1).topk(k, dim=1).indices
            judged.scatter_(1, top, True)
        judged = judged | assigned.fg_mask if c.positives else judged & ~assigned.fg_mask
        image_size = tuple(batch["img"].shape[-2:])
        boxes = s.boxes_xyxy(pixels=True).float()
        verdict = t.two_stage.second_stage(t, [b[m].detach() for b, m in zip(boxes, judged)], image_size)
        out = []
        if c.cls_weight > 0:
            targets, known = losses.second_stage_targets(
                verdict.class_logits,
                self.student_classes,
                self.teacher_classes,
                s_cls.shape[-1],
                boxes=boxes[judged] if c.iou_aware else None,
                refined_boxes=verdict.boxes if c.iou_aware else None,
            )
            weights = losses.teacher_best(verdict.class_logits, verdict.boxes)[0] if c.teacher_weighted else None
            out.append(c.cls_weight * losses.second_stage_class_kd(s_cls[judged], targets, known, weights))
        if c.box_weight > 0:
            parts = losses.second_stage_box_kd(
                boxes[judged], verdict.class_logits, verdict.boxes, image_size, l1_weight=c.l1_weight
            )
            out.append(c.box_weight * (parts["giou"] + parts["l1"]))
        return out

    @staticmethod
    def _dense_teacher(s: DetectorView, t: DetectorView, image_size: tuple[int, int], form: str) -> DetectorView:
        """A two-stage teacher's view with dense outputs at the student's anchors, from its dense verdict
        (:meth:`~detkd.adapters.torchvision.TorchvisionAdapter.dense_verdict`): class logits whose sigmoids are its
        softmax probabilities (column 0, background, pairs with no student class), so the logit term's soft targets
        and ``locations: teacher`` read them as a YOLO teacher's; and the refined box of its most probable class, as
        distances from the student's anchor points (decoded-box mode of the box term: no DFL to pair). ``form``
        (``second_stage.dense``): ``aligned`` keeps the probabilities only where :func:`aligned_verdict` says."""
        verdict = t.two_stage.dense_verdict(t, s.strides, image_size)
        n, a = s.cls_logits.shape[:2]
        best = losses.teacher_best(verdict.class_logits, verdict.boxes)
        confidence, box, column = (x.view(n, a, *x.shape[1:]) for x in best)
        probs = verdict.class_logits.float().softmax(-1).view(n, a, -1)
        if form == "aligned":
            kept = [t.two_stage.kept_detections(*image) for image in zip(box, confidence, column)]
            points = s.anchor_points * s.stride_tensor
            probs = aligned_verdict(probs, box, column, kept, points, s.strides)
        boxes = box / s.stride_tensor
        ltrb = torch.cat((s.anchor_points - boxes[..., :2], boxes[..., 2:] - s.anchor_points), -1)
        anchors = {"anchor_points": s.anchor_points, "stride_tensor": s.stride_tensor}
        return replace(t, cls_logits=torch.logit(probs, eps=1e-6), box_ltrb=ltrb, **anchors)

    @staticmethod
    def _resize(s_map: Tensor, t_feat: Tensor) -> Tensor:
        if s_map.shape[-2:] != t_feat.shape[-2:]:
            s_map = F.interpolate(s_map, size=t_feat.shape[-2:], mode="bilinear", align_corners=False)
        return s_map

    @staticmethod
    def _location_weights(locations: str, t_cls: Tensor, assigned: Assignment | None) -> Tensor:
        if locations == "all":
            return torch.ones(t_cls.shape[:2], device=t_cls.device)
        if locations == "teacher":
            return t_cls.sigmoid().amax(-1) if t_cls.shape[-1] else torch.zeros(t_cls.shape[:2], device=t_cls.device)
        if assigned is None:
            raise DetkdError("recipe: locations 'positives' needs the student's assigner, which this criterion lacks")
        return assigned.fg_mask.float()


def aligned_verdict(
    probs: Tensor, boxes: Tensor, columns: Tensor, kept: list[Tensor], points: Tensor, strides: list[int]
) -> Tensor:
    """A dense verdict's class probabilities (N, A, K+1; column 0 background) where a TAL-trained head would speak.

    The verdict's own detections (``kept``: per image, the cells whose best-class ``boxes`` (N, A, 4) pixels and
    class ``columns`` (N, A) the RoI head's postprocessing keeps) are the objects; Ultralytics' task-aligned assigner
    (:func:`~detkd.ultralytics_internals.task_aligned_targets`, YOLOv8's criterion's settings) picks their cells
    from the verdict's probabilities and boxes at the anchor ``points`` (A, 2) pixels. Each object's best-aligned cell
    keeps the verdict's probabilities; its other cells keep them times their alignment relative to that cell's (TAL's
    p^0.5·CIoU^6: a looser box counts much less); every other cell is background (0). Never more confident than the
    verdict itself, it says "object" in about as many cells as a YOLO head trained by the same assigner, where the
    plain verdict says so in every cell near an object (detkd's form; the `frcnn` benchmark profile's `dense-aligned`
    and `dense-head` methods compare the two)."""
    foreground = probs[..., 1:]
    labels = [c[k] - 1 for c, k in zip(columns, kept)]
    objects = [b[k] for b, k in zip(boxes, kept)]
    targets, assigned, owner = task_aligned_targets(foreground, boxes, points, labels, objects, strides)
    score = targets.amax(-1) * assigned  # unassigned cells (their owner reads 0) must not raise object 0's best
    objects_at_least_one = max(max(map(len, kept), default=0), 1)  # the column an image without objects points to
    best = score.new_zeros(len(score), objects_at_least_one).scatter_reduce(1, owner, score, "amax")
    relative = score / best.gather(1, owner).clamp_min(1e-12)
    sharp = foreground * relative[..., None]
    return torch.cat((1 - sharp.sum(-1, keepdim=True), sharp), -1)


def teacher_better_classes(s_cls: Tensor, t_cls: Tensor, target_scores: Tensor) -> Tensor:
    """1 at the anchors where the teacher's class scores are closer to the labels than the student's, else 0: (N, A).

    "Closer" is the student's own classification loss (Ultralytics' BCE against its assigner's IoU-aware targets,
    0 on background), summed over the shared classes, taken by both. A teacher the student has overtaken at an
    anchor stops pulling it back there; once the student passes the teacher everywhere the term is silent, so
    distillation cannot cap a student below what it reaches alone. (detkd's rule; it follows the intuition of
    teacher-correctness weighting in the distillation literature, applied per anchor against the same labels the
    task loss uses.)"""
    y = target_scores.to(t_cls.dtype)
    teacher = F.binary_cross_entropy_with_logits(t_cls, y, reduction="none").sum(-1)
    student = F.binary_cross_entropy_with_logits(s_cls.detach(), y, reduction="none").sum(-1)
    return (teacher < student).to(t_cls.dtype)


def teacher_better_boxes(s_boxes: Tensor, t_boxes: Tensor, target_boxes: Tensor) -> Tensor:
    """1 where the teacher's box overlaps the assigned target box more than the student's (IoU), else 0: (N, A).
    All boxes xyxy in the same units; meaningful at the student's positives (elsewhere the target is empty)."""
    iou = losses.paired_iou
    return (iou(t_boxes.detach(), target_boxes) > iou(s_boxes.detach(), target_boxes)).float()
