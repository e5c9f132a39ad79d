"""Distillation inside Ultralytics' own training loop.

:class:`DistillationTrainer` is Ultralytics' ``DetectionTrainer`` with three additions: it loads the frozen
teacher, builds the :class:`~detkd.distiller.Distiller` and puts its learned parts in the optimizer, and swaps
the student's criterion for :class:`~detkd.engine.criterion.DistillationCriterion`. Everything else —
augmentation, AMP, EMA, validation, ``results.csv``, plots, checkpoints — is Ultralytics' code path, so
``best.pt``/``last.pt`` stay plain student checkpoints. The distiller's weights and the recipe are saved beside
them (``weights/distiller.pt``, ``distill.yaml``) so that a killed run resumes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from detkd.adapters.ultralytics import UltralyticsAdapter, load_ultralytics_model
from detkd.config import Recipe, save_recipe
from detkd.distiller import Distiller, schedule_factor
from detkd.engine.criterion import DistillationCriterion
from detkd.runtime import ultralytics_offline

ultralytics_offline()
from ultralytics.models.yolo.detect import DetectionTrainer  # noqa: E402
from ultralytics.utils import LOGGER  # noqa: E402


class _StudentAndDistiller(nn.Module):
    """One module over everything trainable, so Ultralytics' optimizer groups the distiller's parameters too."""

    def __init__(self, student: nn.Module, distiller: nn.Module):
        super().__init__()
        self.student_model = student  # the name Ultralytics' MuSGD set-up looks for
        self.distiller = distiller


class DistillationTrainer(DetectionTrainer):
    """``DetectionTrainer`` + teacher + distiller. Bind a recipe with :func:`trainer_for`."""

    recipe: Recipe

    def _setup_train(self):
        self.teacher = UltralyticsAdapter(load_ultralytics_model(self.recipe.teacher, self.device))
        super()._setup_train()  # builds the optimizer through build_optimizer below
        student = self.model
        task = student.criterion if getattr(student, "criterion", None) is not None else student.init_criterion()
        self.criterion = DistillationCriterion(task, UltralyticsAdapter(student), self.teacher, self.distiller)
        student.criterion = self.criterion
        save_recipe(self.recipe, Path(self.save_dir) / "distill.yaml")
        self._batch_index = 0
        self.add_callback("on_train_epoch_start", _start_epoch)
        self.add_callback("on_train_batch_start", _update_schedule)

    def build_optimizer(self, model, *args, **kwargs):
        student = UltralyticsAdapter(model)
        self.distiller = Distiller(
            self.recipe.distill,
            student.channels,
            student.strides,
            dict(self.data["names"]),
            self.teacher.channels,
            self.teacher.strides,
            self.teacher.names,
        ).to(self.device)
        state = self.wdir / "distiller.pt"
        if self.args.resume and state.exists():
            self.distiller.load_state_dict(torch.load(state, map_location=self.device))
            LOGGER.info(f"detkd: distiller state restored from {state}")
        return super().build_optimizer(_StudentAndDistiller(model, self.distiller), *args, **kwargs)

    def save_model(self):
        saved = super().save_model()
        state = self.wdir / "distiller.pt"
        tmp = state.with_name(state.name + ".tmp")
        torch.save(self.distiller.state_dict(), tmp)
        os.replace(tmp, state)  # atomic: a kill mid-write leaves the previous state
        return saved

    def _do_train(self):
        try:
            return super()._do_train()
        finally:
            if getattr(self, "criterion", None) is not None:
                self.criterion.remove()
                self.model.criterion = None  # the student leaves training with a plain criterion


def _start_epoch(trainer: DistillationTrainer) -> None:
    trainer._batch_index = 0
    if trainer.criterion.nonfinite:  # from the epoch before
        LOGGER.warning(f"detkd: non-finite distillation terms skipped (term: batches): {trainer.criterion.nonfinite}")
        trainer.criterion.nonfinite.clear()


def _update_schedule(trainer: DistillationTrainer) -> None:
    progress = trainer.epoch + trainer._batch_index / max(len(trainer.train_loader), 1)
    trainer.criterion.factor = schedule_factor(trainer.recipe.distill.schedule, progress, trainer.epochs)
    trainer._batch_index += 1


def trainer_for(recipe: Recipe) -> type[DistillationTrainer]:
    """A trainer class bound to ``recipe`` (Ultralytics instantiates trainers from their class)."""
    return type("DistillationTrainer", (DistillationTrainer,), {"recipe": recipe})
