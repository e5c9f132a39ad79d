"""The student's training criterion: Ultralytics' own loss plus the distillation terms.

It replaces ``student.criterion`` for the run, so Ultralytics' loop (AMP, accumulation, EMA, logging) runs
unchanged: each distillation term becomes a loss column (``results.csv``, progress bar). The teacher is held
here, outside the student's module tree, so it never reaches the optimizer, the EMA or a checkpoint; copies and
pickles of the student (EMA snapshots, ``last.pt``) get ``criterion = None`` and rebuild a plain one.

With unlabeled images (a recipe's ``unlabeled:``), a training batch holds the labeled images first and then the
unlabeled ones, its ``LABELED`` key saying how many are labeled (:mod:`detkd.engine.trainer` builds it). Student and
teacher see the whole batch in one forward each (one set of BatchNorm statistics); then:

- Ultralytics' task loss is taken on the labeled images only (an unlabeled image is not a background image);
- the distillation terms are taken on each part, logged as ``kd_x`` (labeled) and ``kd_x_u`` (unlabeled), each part
  weighing by its number of images, as Ultralytics weighs its loss by the batch size;
- with ``unlabeled.pseudo``, the task loss is also taken on the unlabeled images against the teacher's detections
  scoring at least ``pseudo.conf`` (:func:`teacher_detections`), times ``pseudo.weight``, logged as ``pseudo_u``.
  Those detections are then the unlabeled images' labels wherever a term reads labels (its assignment, ``gt_boxes``).
  Without ``pseudo`` they have none: a feature loss that reads ``gt_boxes`` sees every location as background there,
  and terms that need an assignment are refused when the recipe loads.

With ``distill.pseudo`` the labeled images get pseudo-boxes too, where their labels have a gap: the teacher's
detections scoring at least ``pseudo.conf`` that overlap none of the image's labels (IoU < 0.5 with each, whatever
its class: :func:`with_missed_boxes`), boxes the annotators missed. With ``L(labels)`` Ultralytics' task loss, the
labeled images' loss becomes ``L(labels) + weight · (L(labels + missed) − L(labels))``: at ``weight`` 1 the task loss
on the completed labels, at 0 on the labels alone, in between a blend of the two (the task loss cannot weigh
single boxes, so the blend weighs its two values). The part after ``L(labels)`` is logged as ``pseudo``; it is the
change the extra boxes make, so it can be negative (the student already finds them). The distillation terms read the
labels' own assignment.

The pseudo-box task loss is the teacher's knowledge as much as the dense terms, so the schedule scales it too.
"""

from __future__ import annotations

import torch
import torchvision

from detkd import ultralytics_internals as internals
from detkd.adapters.ultralytics import UltralyticsAdapter
from detkd.adapters.view import DetectorAdapter, DetectorView
from detkd.config import UnlabeledConfig
from detkd.distiller import Distiller

LABELED = "detkd_labeled"  # batch key: how many of the batch's images (the first ones) are labeled
PSEUDO = "pseudo_u"  # the column of the pseudo-box task loss on unlabeled images
MISSED = "pseudo"  # the column of what the missed boxes change in the labeled images' task loss (distill.pseudo)
MISSED_IOU = 0.5  # a teacher detection overlapping a label this much or more is that label's object, not a miss
NMS_IOU = 0.7  # Ultralytics' predict default
MAX_DET = 300  # Ultralytics' predict default


class DistillationCriterion:
    def __init__(
        self,
        task,
        student: UltralyticsAdapter,
        teacher: DetectorAdapter,
        distiller: Distiller,
        unlabeled: UnlabeledConfig | None = None,
    ):
        self.task = task  # Ultralytics' criterion (v8DetectionLoss, E2ELoss, ...)
        self.student = student
        self.teacher = teacher
        self.distiller = distiller
        self.unlabeled = unlabeled
        self.factor = 1.0  # schedule multiplier, set by the trainer each batch
        self.nonfinite: dict[str, int] = {}  # term -> batches where it was not finite (reported each epoch)
        self._assigned: internals.Assignment | None = None  # the current batch's targets, from the task's assigner
        self._hooks = [internals.on_assignment(task, self._capture_assignment)]
        if distiller.uses_backbone:  # from: backbone feature terms read both detectors' backbone stages
            self._hooks += [*student.record_backbone(), *teacher.record_backbone()]
        # teacher class index -> student class index (-1: a class the student does not have), for pseudo-boxes
        pairs = dict(zip(distiller.teacher_classes.tolist(), distiller.student_classes.tolist()))
        self._to_student = torch.full((max(teacher.names, default=0) + 1,), -1, dtype=torch.long)
        for t, s in pairs.items():
            self._to_student[t] = s

    def _capture_assignment(self, assigned: internals.Assignment) -> None:
        self._assigned = assigned

    @property
    def term_names(self) -> list[str]:
        """The logged terms: the distiller's (and ``pseudo`` with ``distill.pseudo``), and with unlabeled images the
        distiller's on them (``_u``) and ``pseudo_u``."""
        names = self.distiller.term_names
        labeled = [*names, *([MISSED] if self.distiller.cfg.pseudo else [])]
        if self.unlabeled is None:
            return labeled
        return [*labeled, *(f"{n}_u" for n in names), *([PSEUDO] if self.unlabeled.pseudo else [])]

    def task_and_terms(self, preds, batch) -> tuple[torch.Tensor, dict, dict[str, torch.Tensor]]:
        """Ultralytics' loss (× batch size) with its items, and the weighted distillation terms (before the
        schedule and the non-finite check) of a labeled batch: what ``detkd diagnose`` weighs."""
        loss, items = self.task(preds, batch)  # runs the assigner: its targets are captured for the terms
        teacher = self.teacher(batch["img"])
        terms = self.distiller(self.student.view(preds), teacher, batch, self._assigned)
        return loss, items, {**terms, **self._missed_boxes_term(preds, batch, teacher, loss)}

    def _missed_boxes_term(self, preds, batch: dict, teacher: DetectorView, loss: torch.Tensor) -> dict:
        """``distill.pseudo`` on labeled images (``preds``, ``batch`` and ``teacher`` of those only; ``loss``:
        their task loss): ``weight · (L(labels + missed) − L(labels))`` per image (see the module docstring)."""
        c = self.distiller.cfg.pseudo
        if c is None:
            return {}
        merged, added = with_missed_boxes(batch, self.pseudo_boxes(teacher, batch["img"], c.conf))
        if not added:  # nothing missed: the labels are the completed labels
            return {MISSED: torch.zeros((), device=loss.device)}
        assigned = self._assigned
        completed, _ = self.task(preds, merged)
        self._assigned = assigned  # the terms read the labels' own assignment
        return {MISSED: c.weight * (completed.sum() - loss.sum()) / batch["img"].shape[0]}

    def _labeled_task(self, preds, batch, n_labeled: int) -> tuple[torch.Tensor, dict]:
        """Ultralytics' loss on the labeled images (× their number), its targets captured for the terms."""
        self._assigned = None
        if n_labeled == batch["img"].shape[0]:
            return self.task(preds, batch)
        if n_labeled:
            return self.task(internals.head_outputs_of_images(preds, slice(0, n_labeled)), batch)
        # no labeled image: nothing to learn from labels; the task's items keep their names, at zero
        loss, items = self.task(preds, _with_boxes(batch, *_no_boxes(batch["img"])))
        self._assigned = None
        return loss * 0.0, {k: torch.zeros_like(v) for k, v in items.items()}

    def __call__(self, preds, batch):
        names = self.term_names
        n = batch["img"].shape[0]
        n_labeled = batch.get(LABELED, n)
        if not self.student.model.training or self.factor == 0.0:
            loss, items = self._labeled_task(preds, batch, n_labeled)
            zero = torch.zeros((), device=loss.device)
            return torch.cat([loss, zero.view(1)]), {**items, **dict.fromkeys(names, zero)}
        if n_labeled == n and self.unlabeled is None:
            loss, items, terms = self.task_and_terms(preds, batch)
            weighted = [(terms, n)]
        else:
            loss, items, weighted = self._mixed(preds, batch, n_labeled)
        zero = torch.zeros((), device=loss.device)
        total, logged = zero, {}
        for terms, images in weighted:
            for name, value in terms.items():
                if not torch.isfinite(value):  # keep one bad term from poisoning the step; counted and reported
                    self.nonfinite[name] = self.nonfinite.get(name, 0) + 1
                    value = zero
                logged[name] = value.detach()
                total = total + value * images  # Ultralytics' criteria return loss × batch size
        items = {**items, **{name: logged.get(name, zero) for name in names}}  # zero: a part without images
        return torch.cat([loss, (total * self.factor).view(1)]), items

    def _mixed(self, preds, batch, n_labeled: int) -> tuple[torch.Tensor, dict, list[tuple[dict, float]]]:
        """A batch of labeled then unlabeled images (see the module docstring): the labeled task loss and items, and
        the terms of each part with the number of images each weighs by (the pseudo-box loss is × its images)."""
        n = batch["img"].shape[0]
        student, teacher = self.student.view(preds), self.teacher(batch["img"])
        loss, items = self._labeled_task(preds, batch, n_labeled)
        weighted = []
        if n_labeled:
            part = slice(0, n_labeled)
            labeled, t_view = {**batch, "img": batch["img"][part]}, teacher.of_images(part)
            terms = self.distiller(student.of_images(part), t_view, labeled, self._assigned)
            labeled_preds = internals.head_outputs_of_images(preds, part) if n_labeled < n else preds
            weighted.append(({**terms, **self._missed_boxes_term(labeled_preds, labeled, t_view, loss)}, n_labeled))
        if n_labeled < n:
            part = slice(n_labeled, n)
            images = batch["img"][part]
            t_view, assigned = teacher.of_images(part), None
            if self.unlabeled.pseudo is not None:
                boxes = self.pseudo_boxes(t_view, images, self.unlabeled.pseudo.conf)
                unlabeled = _with_boxes({"img": images}, *boxes)
                self._assigned = None
                pseudo, _ = self.task(internals.head_outputs_of_images(preds, part), unlabeled)
                assigned = self._assigned
                weighted.append(
                    ({PSEUDO: self.unlabeled.pseudo.weight * pseudo.sum() / (n - n_labeled)}, n - n_labeled)
                )
            else:
                unlabeled = _with_boxes({"img": images}, *_no_boxes(images))
            terms = self.distiller(student.of_images(part), t_view, unlabeled, assigned)
            weighted.append(({f"{k}_u": v for k, v in terms.items()}, n - n_labeled))
        return loss, items, weighted

    def pseudo_boxes(
        self, teacher: DetectorView, images: torch.Tensor, conf: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher's detections scoring at least ``conf`` as Ultralytics batch labels ``(batch_idx, cls,
        bboxes)``: student class indices (classes the student lacks dropped), normalised xywh boxes."""
        h, w = images.shape[-2:]
        found = teacher_detections(self.teacher, teacher, images, conf)
        to_student = self._to_student.to(images.device)
        idx, cls, xyxy = [], [], []
        for i, d in enumerate(found):
            labels = to_student[d["labels"].long()]
            known = labels >= 0
            idx.append(torch.full((int(known.sum()),), i, device=images.device))
            cls.append(labels[known])
            xyxy.append(d["boxes"][known])
        xyxy = torch.cat(xyxy).float()
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
        size = torch.tensor([w, h, w, h], device=images.device, dtype=xyxy.dtype)
        xywh = torch.cat(((xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]), 1) / size
        return torch.cat(idx).float(), torch.cat(cls).float().view(-1, 1), xywh

    def __getattr__(self, name):  # update(), loss_names, one2many ... of the wrapped criterion
        if name == "task":
            raise AttributeError(name)
        return getattr(self.task, name)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (type(None), ())


def teacher_detections(
    teacher: DetectorAdapter, view: DetectorView, images: torch.Tensor, conf: float
) -> list[dict[str, torch.Tensor]]:
    """The teacher's final detections on a batch, those scoring at least ``conf``: per image ``boxes`` (xyxy input
    pixels), ``scores``, ``labels`` (the teacher's class indices).

    A dense head's come from its view as Ultralytics' predictor makes them (one class per box, the best; NMS per
    class at IoU 0.7; at most 300), without a second forward; a two-stage teacher gives its own (its second stage,
    score threshold and NMS, :meth:`~detkd.adapters.torchvision.TorchvisionAdapter.detections`)."""
    if not teacher.dense_head:
        return [{k: v[d["scores"] >= conf] for k, v in d.items()} for d in teacher.detections(images)]
    scores, labels = view.cls_logits.detach().float().sigmoid().max(-1)
    boxes = view.boxes_xyxy(pixels=True).detach().float()
    found = []
    for b, s, c in zip(boxes, scores, labels):
        keep = s >= conf
        b, s, c = b[keep], s[keep], c[keep]
        keep = torchvision.ops.batched_nms(b, s, c, NMS_IOU)[:MAX_DET]
        found.append({"boxes": b[keep], "scores": s[keep], "labels": c[keep]})
    return found


def with_missed_boxes(
    batch: dict, pseudo: tuple[torch.Tensor, torch.Tensor, torch.Tensor], iou: float = MISSED_IOU
) -> tuple[dict, int]:
    """``batch`` with the pseudo-boxes (Ultralytics labels ``(batch_idx, cls, bboxes)``, normalised xywh) that
    overlap none of their image's labels by IoU ``iou`` or more appended to its labels, and how many were. Labels of
    every class count: a box the annotators drew under another class is not a missed one. (IoU of normalised boxes
    is their IoU in pixels: both axes scale every area alike.)"""
    idx, cls, xywh = pseudo
    labels = batch["bboxes"]
    if len(idx) and len(labels):
        overlap = torchvision.ops.box_iou(_xyxy(xywh), _xyxy(labels.to(xywh.dtype)))
        overlap = overlap * (idx.view(-1, 1) == batch["batch_idx"].view(1, -1).to(idx.dtype))  # same image only
        missed = overlap.amax(1) < iou
        idx, cls, xywh = idx[missed], cls[missed], xywh[missed]
    batch_idx = torch.cat((batch["batch_idx"].view(-1), idx.to(batch["batch_idx"].dtype)))
    order = batch_idx.argsort(stable=True)  # image by image, as Ultralytics' collate orders labels and its loss reads
    cls = torch.cat((batch["cls"].view(-1, 1), cls.to(batch["cls"].dtype)))
    return _with_boxes(batch, batch_idx[order], cls[order], torch.cat((labels, xywh.to(labels.dtype)))[order]), len(idx)


def _xyxy(xywh: torch.Tensor) -> torch.Tensor:
    return torchvision.ops.box_convert(xywh, "cxcywh", "xyxy")


def _no_boxes(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = images.device
    return torch.zeros(0, device=d), torch.zeros((0, 1), device=d), torch.zeros((0, 4), device=d)


def _with_boxes(batch: dict, batch_idx: torch.Tensor, cls: torch.Tensor, bboxes: torch.Tensor) -> dict:
    return {**batch, "batch_idx": batch_idx, "cls": cls, "bboxes": bboxes}
