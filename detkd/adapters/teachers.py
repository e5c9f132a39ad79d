"""The teacher factory: a recipe's ``teacher:`` checkpoint becomes the adapter of the detector family it holds.

Each family says how it recognises its checkpoints without loading them, and how it loads one as a frozen
teacher behind its adapter (:class:`~detkd.adapters.view.DetectorAdapter`). A new family is one adapter module and
one entry in :data:`TEACHER_FAMILIES`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from detkd.adapters import torchvision, ultralytics
from detkd.adapters.view import DetectorAdapter
from detkd.errors import DetkdError


@dataclass(frozen=True)
class TeacherFamily:
    kind: str  # how a user knows it, in the error for a checkpoint no family recognises
    recognises: Callable[[Path], bool]  # cheap and safe: must not run anything in the file
    load: Callable[[Path, torch.device | str], DetectorAdapter]  # the frozen teacher behind its adapter


TEACHER_FAMILIES: tuple[TeacherFamily, ...] = (
    TeacherFamily("Ultralytics YOLO checkpoint", ultralytics.is_ultralytics_checkpoint, ultralytics.teacher_adapter),
    TeacherFamily(
        "detkd torchvision teacher (detkd.adapters.torchvision.save_torchvision_teacher)",
        torchvision.is_torchvision_teacher,
        torchvision.teacher_adapter,
    ),
)


def create_teacher(checkpoint: str | os.PathLike, device: torch.device | str = "cpu") -> DetectorAdapter:
    """The frozen teacher in ``checkpoint`` (eval mode, no gradients), read by the family that recognises it."""
    return teacher_family(checkpoint).load(Path(checkpoint), device)


def teacher_family(checkpoint: str | os.PathLike) -> TeacherFamily:
    """The family whose checkpoint this is, without loading it (a run checks its teacher before it builds models)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise DetkdError(f"{path}: teacher checkpoint not found (detkd never downloads weights: give a local file)")
    family = next((f for f in TEACHER_FAMILIES if f.recognises(path)), None)
    if family is None:
        known = "; ".join(f.kind for f in TEACHER_FAMILIES)
        raise DetkdError(f"{path}: not a teacher checkpoint of a kind detkd knows (known kinds: {known})")
    return family
