"""The teacher factory: a recipe's ``teacher:`` becomes the adapter of the detector family it names.

``teacher:`` is a checkpoint, or ``PREFIX:ARCH`` (``torchvision:fasterrcnn_resnet50_fpn_v2``) with the recipe's
``teacher_weights:`` for a family whose weights files carry no architecture (a torchvision state dict). Each family
says how it recognises its checkpoints without loading them, how it loads one as a frozen teacher behind its adapter
(:class:`~detkd.adapters.view.DetectorAdapter`), and, with a prefix, how it checks and builds a named architecture.
A new family is one adapter module and one entry in :data:`TEACHER_FAMILIES`.
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
    prefix: str | None = None  # ``teacher: PREFIX:ARCH`` with ``teacher_weights``, for the two callables below
    check_named: Callable[[str, str | None], object] | None = None  # (arch, weights): refuses bad ones, loads nothing
    load_named: Callable[[str, str | None, torch.device | str], DetectorAdapter] | None = None


TEACHER_FAMILIES: tuple[TeacherFamily, ...] = (
    TeacherFamily("Ultralytics YOLO checkpoint", ultralytics.is_ultralytics_checkpoint, ultralytics.teacher_adapter),
    TeacherFamily(
        "detkd torchvision teacher (detkd.adapters.torchvision.save_torchvision_teacher)",
        torchvision.is_torchvision_teacher,
        torchvision.teacher_adapter,
        prefix=torchvision.NAME_PREFIX,
        check_named=torchvision.check_named_teacher,
        load_named=torchvision.named_teacher_adapter,
    ),
)


def create_teacher(
    teacher: str | os.PathLike, device: torch.device | str = "cpu", weights: str | os.PathLike | None = None
) -> DetectorAdapter:
    """The frozen teacher (eval mode, no gradients) of a recipe's ``teacher:`` and ``teacher_weights:``: a checkpoint
    read by the family that recognises it, or a named architecture (``torchvision:ARCH``) built with ``weights``."""
    named = _named(teacher, weights)
    if named is not None:
        family, arch = named
        return family.load_named(arch, weights, device)
    return teacher_family(teacher).load(Path(teacher), device)


def check_teacher(teacher: str | os.PathLike, weights: str | os.PathLike | None = None) -> None:
    """Refuse a teacher that cannot load (a missing file, an unknown kind or architecture, missing weights) without
    loading it: a run checks its teacher before it builds models."""
    named = _named(teacher, weights)
    if named is not None:
        family, arch = named
        family.check_named(arch, weights)
    else:
        teacher_family(teacher)


def _named(teacher: str | os.PathLike, weights: str | os.PathLike | None) -> tuple[TeacherFamily, str] | None:
    """(family, architecture) of ``PREFIX:ARCH``; None for a checkpoint, which holds its own weights."""
    text = str(teacher)
    for family in TEACHER_FAMILIES:
        if family.prefix and text.startswith(family.prefix):
            return family, text[len(family.prefix) :]
    if weights is not None:
        prefixes = ", ".join(f"{f.prefix}ARCH" for f in TEACHER_FAMILIES if f.prefix)
        raise DetkdError(f"teacher_weights: {weights} is for a named teacher ({prefixes}); {text} is a checkpoint")
    return None


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
