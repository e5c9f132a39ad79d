"""The student's training criterion: Ultralytics' own loss plus the distillation terms.

It replaces ``student.criterion`` for the run, so Ultralytics' loop (AMP, accumulation, EMA, logging) runs
unchanged: each distillation term becomes a loss column (``results.csv``, progress bar). The teacher is held
here, outside the student's module tree, so it never reaches the optimizer, the EMA or a checkpoint; copies and
pickles of the student (EMA snapshots, ``last.pt``) get ``criterion = None`` and rebuild a plain one.
"""

from __future__ import annotations

import torch

from detkd import ultralytics_internals as internals
from detkd.adapters.ultralytics import UltralyticsAdapter
from detkd.adapters.view import DetectorAdapter
from detkd.distiller import Distiller


class DistillationCriterion:
    def __init__(self, task, student: UltralyticsAdapter, teacher: DetectorAdapter, distiller: Distiller):
        self.task = task  # Ultralytics' criterion (v8DetectionLoss, E2ELoss, ...)
        self.student = student
        self.teacher = teacher
        self.distiller = distiller
        self.factor = 1.0  # schedule multiplier, set by the trainer each batch
        self.nonfinite: dict[str, int] = {}  # term -> batches where it was not finite (reported each epoch)
        self._assigned: internals.Assignment | None = None  # the current batch's targets, from the task's assigner
        self._hook = internals.on_assignment(task, self._capture_assignment)

    def _capture_assignment(self, assigned: internals.Assignment) -> None:
        self._assigned = assigned

    def task_and_terms(self, preds, batch) -> tuple[torch.Tensor, dict, dict[str, torch.Tensor]]:
        """Ultralytics' loss (× batch size) with its items, and the weighted distillation terms (before the
        schedule and the non-finite check): what a training step combines, and what ``detkd diagnose`` weighs."""
        loss, items = self.task(preds, batch)  # runs the assigner: its targets are captured for the terms
        terms = self.distiller(self.student.view(preds), self.teacher(batch["img"]), batch, self._assigned)
        return loss, items, terms

    def __call__(self, preds, batch):
        names = self.distiller.term_names
        if not self.student.model.training or self.factor == 0.0:
            loss, items = self.task(preds, batch)
            zero = torch.zeros((), device=loss.device)
            return torch.cat([loss, zero.view(1)]), {**items, **dict.fromkeys(names, zero)}
        loss, items, terms = self.task_and_terms(preds, batch)
        zero = torch.zeros((), device=loss.device)
        total = zero
        for name in names:
            value = terms[name]
            if not torch.isfinite(value):  # keep one bad term from poisoning the step; counted and reported
                self.nonfinite[name] = self.nonfinite.get(name, 0) + 1
                value = zero
            items[name] = value.detach()
            total = total + value
        batch_size = batch["img"].shape[0]  # Ultralytics' criteria return loss × batch size
        return torch.cat([loss, (total * self.factor * batch_size).view(1)]), items

    def __getattr__(self, name):  # update(), loss_names, one2many ... of the wrapped criterion
        if name == "task":
            raise AttributeError(name)
        return getattr(self.task, name)

    def remove(self) -> None:
        self._hook.remove()

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (type(None), ())
