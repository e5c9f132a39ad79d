"""Every place detkd relies on Ultralytics beyond its public API, so that a new release is fixed in this one file.

Public API (``YOLO``, ``DetectionTrainer`` and its hooks and callbacks, ``DetectionModel``, ``load_checkpoint``,
the layer classes such as ``Detect``) is used where it is needed. What is here is not promised by Ultralytics and
was read from its source: private names, module constants, output orders, formulas, and the monkey-patches detkd
applies. Each item says why it is needed; all were read from Ultralytics **8.4.190** (the tested version).

Importing this module checks the installed version against what detkd supports (:data:`SUPPORTED_RANGE`, as
pinned in pyproject.toml) and warns once, naming both, when it is outside. :func:`ultralytics_offline` applies the
patches; call it before any Ultralytics work (it is idempotent).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import ultralytics
from torch import nn

from detkd import safe_load
from detkd.runtime import default_threads
from detkd.utils import atomic_write

SUPPORTED_RANGE = ">=8.4.0,<8.5"  # the pin in pyproject.toml
TESTED_VERSION = "8.4.190"
_SUPPORTED_MINOR = (8, 4)
_log = logging.getLogger("detkd")

# --- version ---------------------------------------------------------------------------------------------------


def version_warning(version: str) -> str | None:
    """The warning for an installed Ultralytics ``version`` outside :data:`SUPPORTED_RANGE`; None inside it."""
    numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    if numbers == _SUPPORTED_MINOR:
        return None
    return (
        f"detkd: warning: Ultralytics {version} is installed; detkd supports {SUPPORTED_RANGE} and is tested with "
        f"{TESTED_VERSION}: the internals it relies on may have changed (see {Path(__file__).name})"
    )


def check_ultralytics_version() -> None:
    """Warn (once: this runs at import) when the installed Ultralytics is outside the supported range."""
    if message := version_warning(ultralytics.__version__):
        _log.warning(message)


check_ultralytics_version()

# --- making Ultralytics offline, quiet and safe ------------------------------------------------------------------

# Integrations Ultralytics enables from settings.json; each may open connections of its own.
_INTEGRATIONS = ("clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")
_FONTS = ("Arial.ttf", "Arial.Unicode.ttf")
_done = False


def ultralytics_offline() -> None:
    """Ultralytics with detkd's settings and patches; idempotent. Call before any Ultralytics work.

    - Offline: Ultralytics reads ``YOLO_OFFLINE``/``YOLO_AUTOINSTALL`` once, at import; when the user imported it
      before detkd set them, its module constants ``ONLINE``/``AUTOINSTALL`` (``ultralytics.utils``, ``.checks``,
      ``.events``) are brought in line. Hub sync and logger integrations are turned off in its settings.
    - Fonts: plotting calls ``check_font``, which looks for Arial in ``USER_CONFIG_DIR`` and downloads it when
      missing; matplotlib's DejaVu Sans is put there instead.
    - Threads: Ultralytics sets ``torch_utils.NUM_THREADS`` to min(8, cores - 1) (one thread on a 2-core machine);
      detkd trains on every core torch may use.
    - Checkpoints: every load goes through :mod:`detkd.safe_load` (:func:`_load_checkpoints_safely`), and model
      configs are built without ``eval`` (:func:`_build_configs_without_eval`).
    """
    global _done
    if _done:
        return
    import ultralytics.utils as uu
    import ultralytics.utils.checks as checks
    import ultralytics.utils.torch_utils as tu

    if uu.ONLINE and uu.env_bool("YOLO_OFFLINE"):  # imported before detkd set the environment
        import ultralytics.utils.events as events

        uu.ONLINE = checks.ONLINE = events.ONLINE = False
    if uu.AUTOINSTALL and not uu.env_bool("YOLO_AUTOINSTALL", True):
        uu.AUTOINSTALL = checks.AUTOINSTALL = False
    uu.SETTINGS.update({"sync": False, **{k: False for k in _INTEGRATIONS}})
    _install_fonts(uu.USER_CONFIG_DIR)
    # OMP_NUM_THREADS (set by detkd's runtime to every core unless given) wins, so that runs side by side can share
    # the cores (detkd benchmark --parallel)
    threads = default_threads()
    torch.set_num_threads(threads)
    tu.NUM_THREADS = threads
    _load_checkpoints_safely()
    _build_configs_without_eval()
    _done = True


def _install_fonts(ultralytics_dir: Path) -> None:
    """Put a font where ``check_font`` looks first, so plotting never tries to download Arial.

    Matplotlib (an Ultralytics dependency) ships DejaVu Sans; it covers the glyphs Ultralytics draws.
    """
    from matplotlib import font_manager

    source = Path(font_manager.findfont("DejaVu Sans", fallback_to_default=True))
    for name in _FONTS:
        target = ultralytics_dir / name
        if not target.exists() and source.exists():
            atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


@contextlib.contextmanager
def quiet_ultralytics():
    """Ultralytics' info lines (model summaries, data-set scans, its help text) off inside the block, warnings
    kept: for detkd's own reports (``detkd diagnose``, recipe checks), where they would bury the answer."""
    ultralytics_offline()
    from ultralytics.utils import LOGGER

    level = LOGGER.level
    LOGGER.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        LOGGER.setLevel(level)


def _load_checkpoints_safely() -> None:
    """Route every checkpoint Ultralytics opens through :func:`load_checkpoint_file`.

    ``ultralytics.utils.patches.torch_load`` is ``torch.load`` with ``weights_only=False`` by default, and every
    checkpoint Ultralytics reads passes through it: ``torch_safe_load`` (behind ``load_checkpoint``: ``YOLO(path)``,
    trainer set-up and resume, the ``distill_model=`` teacher), ``strip_optimizer`` (end of training), the DDP
    script. Modules bind it by name at import (``nn.tasks``, ``utils.torch_utils``), so each binding is replaced,
    and ``patches`` itself for modules imported later. Ultralytics' own opt-in restricted loading
    (``ULTRALYTICS_SAFE_LOAD``) is not used: it admits ``builtins.getattr`` and lets a file call model classes.
    """
    import ultralytics.utils.patches as patches
    from ultralytics.nn import tasks  # noqa: F401  (imported first: they bind torch_load, replaced below)
    from ultralytics.utils import torch_utils  # noqa: F401

    original = patches.torch_load
    for name, module in list(sys.modules.items()):
        if name.startswith("ultralytics") and getattr(module, "torch_load", None) is original:
            module.torch_load = _torch_load


def _torch_load(file, *args, weights_only=None, **kwargs):
    """Ultralytics' ``torch_load`` signature; the caller's ``weights_only`` is replaced by detkd's policy."""
    return load_checkpoint_file(file, *args, **kwargs)


def _build_configs_without_eval() -> None:
    """Make ``parse_model`` take its restricted path for every model config, not only during restricted loads.

    A model's config travels inside its checkpoint (``model.yaml``) and is built again whenever the model trains
    or is transferred. Unrestricted, ``parse_model`` runs ``eval`` on the config's ``activation`` string and looks
    layer names up in its module's globals, so a crafted config runs code. ``_SafeLoad.restricted()`` (``nn.tasks``)
    switches it to a literal parser and ``nn.Module`` layers only; every Ultralytics config builds either way.
    """
    from ultralytics.nn.tasks import _SafeLoad

    _SafeLoad.restricted = classmethod(lambda cls: True)


# --- what checkpoints hold ----------------------------------------------------------------------------------------
# Found by scanning (torch.serialization.get_unsafe_globals_in_checkpoint) the best.pt, last.pt and mid-training
# last.pt (with optimizer state) that Ultralytics 8.4.190 writes for yolov8n, yolo11n, yolo26n, a yolov8n run with
# distill_model=, yolov8n-cls and yolo11n-cls, and what detkd.transfer and detkd's trainer write: model classes
# (ultralytics.nn.tasks), their layers (ultralytics.nn.modules.*, torch.nn.modules.*), IterableSimpleNamespace, and
# for classifiers their torchvision preprocessing. Added: NumPy scalars and dtypes, which Ultralytics' own allow-list
# (``_SafeLoad._build``) names for its official checkpoints. Nothing else: no getattr, no AutoBackend (it loads
# further files), no other callable.

# DetectionModel, ClassificationModel ...; DistillationModel: Ultralytics' built-in distillation (distill_model=)
# saves its student inside it
_MODEL_MODULES = ("ultralytics.nn.tasks", "ultralytics.nn.distill_model")
_HOOKS = {"ultralytics.nn.distill_model.FeatureHook"}  # that wrapper's picklable forward hook: it stores outputs
_LAYER_PACKAGES = ("ultralytics.nn.modules.", "torch.nn.modules.")
_CLASSIFIER_TRANSFORMS = {  # ClassificationModel.transforms: Compose(Resize, CenterCrop, ToTensor, Normalize)
    f"torchvision.transforms.transforms.{name}" for name in ("Compose", "Resize", "CenterCrop", "ToTensor", "Normalize")
}


def checkpoint_global(name: str) -> safe_load.Allowed | None:
    """The role a global named in a checkpoint may play, or None when no Ultralytics checkpoint holds it."""
    if name in _data_globals():
        return _data_globals()[name]
    if name == "torchvision.transforms.functional.InterpolationMode":  # an Enum: calling it looks a member up
        from torchvision.transforms.functional import InterpolationMode

        return safe_load.Allowed(InterpolationMode, callable=True)
    module, _, attr = name.rpartition(".")
    model_or_layer = module in _MODEL_MODULES or module.startswith(_LAYER_PACKAGES)
    if not model_or_layer and name not in _CLASSIFIER_TRANSFORMS | _HOOKS:
        return None
    try:
        cls = getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return None
    defined_here = isinstance(cls, type) and cls.__module__ == module  # not a name the module imported
    if not defined_here or (model_or_layer and name not in _HOOKS and not issubclass(cls, nn.Module)):
        return None
    return safe_load.Allowed(cls)  # rebuilt, never called


@functools.cache
def _data_globals() -> dict[str, safe_load.Allowed]:
    """Data types a checkpoint constructs by calling them; none does anything but build a value."""
    import numpy as np
    from ultralytics.utils import IterableSimpleNamespace  # train_args (a SimpleNamespace pickles as a call)

    scalar = np.float64(0).__reduce__()[0]  # numpy.core.multiarray.scalar (numpy._core in NumPy 2)
    dtypes = tuple({type(np.dtype(c)) for c in np.typecodes["AllFloat"] + np.typecodes["AllInteger"] + "?"})
    return {
        "ultralytics.utils.IterableSimpleNamespace": safe_load.Allowed(IterableSimpleNamespace, callable=True),
        "numpy.dtype": safe_load.Allowed(np.dtype, callable=True, builds=dtypes),
        "numpy.core.multiarray.scalar": safe_load.Allowed(scalar, callable=True),
        "numpy._core.multiarray.scalar": safe_load.Allowed(scalar, callable=True),
    }


def load_checkpoint_file(path, map_location=None, **kwargs):
    """``torch.load`` of an Ultralytics checkpoint, through :func:`detkd.safe_load.load` with its allow-list."""
    return safe_load.load(path, checkpoint_global, map_location=map_location, **kwargs)


def training_finished(last: Path) -> bool:
    """Whether the run that wrote ``last.pt`` ended (all epochs, or stopped early by ``patience``/``time``): when
    training ends, ``strip_optimizer`` sets the checkpoint's ``epoch`` to -1, and Ultralytics refuses to resume it."""
    return load_checkpoint_file(last).get("epoch") == -1


def checkpoint_dict(model: nn.Module, train_args: dict, **extra) -> dict:
    """A checkpoint that ``YOLO(path)`` loads and trains from, with the keys of ``BaseTrainer.save_model`` that
    matter for that: the model in half precision, ``epoch`` -1 (no training state to resume), ``train_args``, the
    version that wrote it; plus ``extra`` keys."""
    from copy import deepcopy
    from datetime import datetime

    return {
        "model": deepcopy(model).half(),
        "epoch": -1,
        "date": datetime.now().isoformat(),
        "version": ultralytics.__version__,
        "train_args": train_args,
        **extra,
    }


# --- model structure ----------------------------------------------------------------------------------------------


def model_source(model: nn.Module) -> str | None:
    """Where a model came from: ``load_checkpoint`` sets ``pt_path``; a model built from a config keeps the file
    name in ``yaml["yaml_file"]``."""
    return getattr(model, "pt_path", None) or getattr(model, "yaml", {}).get("yaml_file")


def detect_input_channels(head: nn.Module) -> list[int]:
    """Channels of the Detect head's input features: the first conv of each box branch (``cv2``; end-to-end-only
    heads keep ``one2one_cv2``), whose ``Conv`` wraps the ``nn.Conv2d`` as ``.conv``."""
    branch = head.cv2 if head.cv2 is not None else head.one2one_cv2
    return [seq[0].conv.in_channels for seq in branch]


def neck_inputs(model: nn.Module) -> list[int]:
    """Indices (in ``model.model``) of the backbone layers whose outputs the neck reads, in order.

    From ``parse_model``: layers are numbered in the yaml's order, its ``backbone`` list first, each layer's ``.f``
    naming the layers it reads (-1: the one before); ``model.save`` lists every layer read by another than the
    next. So the neck reads the backbone layers in ``save`` and the last backbone layer (read by the first neck
    layer, as -1): in YOLOv8 layers 4, 6, 9 (strides 8, 16, 32), in YOLO11/YOLO26 4, 6, 10."""
    n = len(model.yaml["backbone"])
    return sorted({i for i in model.save if i < n} | {n - 1})


def is_end_to_end(head: nn.Module) -> bool:
    """Whether a Detect head has the one-to-one (NMS-free) branches of YOLO26/YOLOv10."""
    return getattr(head, "one2one_cv2", None) is not None


def class_branches(head: nn.Module) -> list[tuple[str, nn.Sequential]]:
    """``(path under the head, layers)`` of each class branch: ``cv3.{level}``, and ``one2one_cv3.{level}`` in
    end-to-end heads. Each ends in the conv that predicts the ``nc`` class logits."""
    return [
        (f"{attr}.{i}", seq) for attr in ("cv3", "one2one_cv3") for i, seq in enumerate(getattr(head, attr, None) or ())
    ]


def class_branch_width(head: nn.Module) -> int:
    """The hidden width of the class branches, which ``Detect.__init__`` sets to ``c3 = max(ch[0], min(nc, 100))``:
    it changes with the number of classes. Read as the input width of the first branch's last conv."""
    return head.cv3[0][-1].in_channels


def dense_head_outputs(preds, branch: str = "one2many") -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``(boxes (N, 4·reg_max, A), scores (N, nc, A), feats)`` of a Detect head's raw output.

    The head returns a dict (``boxes``, ``scores``, ``feats`` = its inputs) in training and ``(detections, dict)`` in
    eval mode; end-to-end heads nest it as ``{"one2many": ..., "one2one": ...}``.
    """
    if isinstance(preds, (tuple, list)):
        preds = preds[1]
    if "one2many" in preds:
        preds = preds[branch]
    return preds["boxes"], preds["scores"], list(preds["feats"])


def anchor_points(feats: list[torch.Tensor], strides: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(anchor points (A, 2) in grid units, stride per anchor (A, 1))``: cell centres, as the head and the
    assigner lay anchors out (``ultralytics.utils.tal.make_anchors`` with offset 0.5)."""
    from ultralytics.utils.tal import make_anchors

    return make_anchors(feats, strides, 0.5)


def channel_groups(parent: nn.Module, conv: str, side: str) -> tuple[tuple[tuple[int, ...], ...], bool] | None:
    """How the ``side`` ("in"/"out") channels of the ``Conv`` named ``conv`` in module ``parent`` are grouped.

    Returns ``(groups, by_position)``: each group a tuple of segment widths, ``by_position`` when a smaller model keeps
    the first groups (else evenly spaced ones); None when the channels are not grouped. From the modules' source:

    - ``C2f.cv2`` reads ``2 + n`` concatenated blocks of ``c`` channels (``c = int(c2 * e)``, ``n`` bottlenecks ``m``).
    - ``Attention.qkv`` writes per head ``q, k, v`` of widths ``key_dim, key_dim, head_dim``; ``pe``'s output and
      ``proj``'s input are the ``v`` channels, head by head.
    """
    from ultralytics.nn.modules.block import Attention, C2f

    if isinstance(parent, C2f) and (conv, side) == ("cv2", "in"):
        return ((parent.c,),) * (2 + len(parent.m)), True
    if isinstance(parent, Attention):
        heads, kd, hd = parent.num_heads, parent.key_dim, parent.head_dim
        if (conv, side) == ("qkv", "out"):
            return ((kd, kd, hd),) * heads, False
        if (conv, side) in {("pe", "out"), ("proj", "in")}:
            return ((hd,),) * heads, False
    return None


# --- training -----------------------------------------------------------------------------------------------------

# Parameters Ultralytics keeps frozen in every run (``always_freeze_names`` in ``BaseTrainer._setup_train``).
ALWAYS_FROZEN = (".dfl",)


class Assignment(NamedTuple):
    """What Ultralytics' detection criterion assigned the student in one batch (its ``TaskAlignedAssigner``)."""

    fg_mask: torch.Tensor  # (N, A) bool: the positives
    scores: torch.Tensor  # (N, A, nc): the class targets, IoU-aware, 0 on background (what its BCE is taken against)
    boxes: torch.Tensor  # (N, A, 4): the target boxes, xyxy in input pixels


def on_assignment(criterion, callback: Callable[[Assignment], None]) -> torch.utils.hooks.RemovableHandle:
    """Call ``callback(Assignment)`` each time Ultralytics' detection criterion assigns targets to the student.

    Its ``TaskAlignedAssigner`` returns ``(target_labels, target_bboxes, target_scores, fg_mask, target_gt_idx)``,
    boxes in pixels (the criterion passes it anchors × stride); end-to-end criteria (``E2ELoss``, YOLO26) hold the
    dense branch's criterion as ``one2many``.
    """
    dense = getattr(criterion, "one2many", criterion)
    return dense.assigner.register_forward_hook(
        lambda module, inputs, outputs: callback(Assignment(outputs[3], outputs[2], outputs[1]))
    )


def task_aligned_targets(
    scores: torch.Tensor,
    boxes: torch.Tensor,
    points: torch.Tensor,
    labels: list[torch.Tensor],
    objects: list[torch.Tensor],
    strides: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ultralytics' task-aligned assignment (TOOD's TAL), configured as its YOLOv8 detection criterion configures
    it (``v8DetectionLoss``: ``tal_topk`` 10, α 0.5, β 6.0, the head's strides), for objects that are not labels.

    ``scores`` (N, A, C) probabilities and ``boxes`` (N, A, 4) xyxy pixels at ``points`` (A, 2) pixels; per image,
    ``labels`` (M_i,) class indices and ``objects`` (M_i, 4) xyxy pixels. Returns ``(target_scores (N, A, C), fg_mask
    (N, A), owner (N, A))``: at each assigned anchor its object's class with the IoU-aligned score the criterion trains
    the class sigmoids towards (the alignment p^α·IoU^β normalised so that each object's best anchor gets its best
    IoU), 0 elsewhere; and the index of the object it was given (in ``objects`` of its image; 0 where none)."""
    from ultralytics.utils.tal import TaskAlignedAssigner

    n, most = scores.shape[0], max((len(o) for o in objects), default=0)
    gt_labels, gt_boxes, gt_mask = (scores.new_zeros(n, most, k) for k in (1, 4, 1))
    for i, (label, box) in enumerate(zip(labels, objects)):
        gt_labels[i, : len(label), 0], gt_boxes[i, : len(box)], gt_mask[i, : len(box)] = label.to(scores), box, 1
    assigner = TaskAlignedAssigner(topk=10, num_classes=scores.shape[-1], alpha=0.5, beta=6.0, stride=list(strides))
    _, _, target_scores, fg_mask, owner = assigner(scores, boxes.to(scores), points, gt_labels, gt_boxes, gt_mask)
    return target_scores, fg_mask, owner.long()


class StudentAndDistiller(nn.Module):
    """One module over everything trainable, so that ``build_optimizer`` groups the distiller's parameters (its
    connectors) by module type too. Under MuSGD it looks the student's head up as ``model.student_model`` (the
    attribute of its own ``DistillationModel``), hence the name."""

    def __init__(self, student: nn.Module, distiller: nn.Module):
        super().__init__()
        self.student_model = student
        self.distiller = distiller


# --- unlabeled images in training (detkd.engine.trainer) ---------------------------------------------------------


def unlabeled_dataset(args, image_list: Path, data: dict, batch: int, stride: int):
    """Ultralytics' training ``YOLODataset`` over the images listed in ``image_list`` (a text file, one absolute path a
    line: how it takes a list of images) with every image's label list empty, whatever label files
    lie beside them: unlabeled images must never be read as labeled (a folder of a labeled set's images, used as
    unlabeled footage, has its ``labels/`` next to it). ``get_labels`` is its method that reads label files (and
    writes a ``.cache`` beside them); here it returns, per image, the label dict its own scan returns for an image
    without labels (``YOLODataset.result_to_label``), so nothing is read or written. The arguments are those of
    ``build_yolo_dataset`` in training mode, so augmentation is the trainer's: its mosaic and mixup then only ever
    combine unlabeled images with unlabeled images, and no partly labeled image can pass as fully labeled."""
    import numpy as np
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.utils import colorstr

    def shape(file: str) -> tuple[int, int]:  # (h, w) from the header; Ultralytics reads it for rectangular batches
        with pil_image_open(Path(file)) as im:
            return im.size[::-1]

    class UnlabeledDataset(YOLODataset):
        def get_labels(self) -> list[dict]:
            return [
                {
                    "im_file": f,
                    "shape": shape(f),
                    "cls": np.zeros((0, 1), dtype=np.float32),
                    "bboxes": np.zeros((0, 4), dtype=np.float32),
                    "segments": [],
                    "keypoints": None,
                    "normalized": True,
                    "bbox_format": "xywh",
                }
                for f in self.im_files
            ]

    return UnlabeledDataset(
        img_path=str(image_list),
        imgsz=args.imgsz,
        batch_size=batch,  # sizes the mosaic's image buffer
        augment=True,
        hyp=args,
        rect=False,
        cache=args.cache or None,
        single_cls=args.single_cls or False,
        stride=stride,
        pad=0.0,
        prefix=colorstr("unlabeled: "),
        task=args.task,
        classes=args.classes,
        data=data,
    )


def build_dataloader(dataset, batch: int, workers: int, rank: int, device):
    """Ultralytics' training dataloader (``ultralytics.data.build_dataloader``: its ``InfiniteDataLoader``, workers
    kept across passes, a distributed sampler under DDP, the dataset's own ``collate_fn``), shuffled, for the
    unlabeled images beside the labeled loader.

    Ultralytics seeds every loader's generator from ``torch.initial_seed()``, and the workers' random and numpy
    seeds come from that generator: built as is, worker k of this loader would draw the same augmentation (flip,
    HSV, scale, mosaic centre) as worker k of the labeled one, image for image, until their streams drift apart. So
    it is built under another seed, the global generator's state put back after. The offset is the same on every
    rank (their samplers stay in step) and far larger than a world size: Ultralytics' seeds differ by the rank, so
    an offset of 1 would give rank r the labeled loader's generator of rank r + 1."""
    from ultralytics.data import build_dataloader

    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed((torch.initial_seed() + 2**32) % 2**64)  # an unseeded one may be ≈ 2**64
        return build_dataloader(dataset, batch=batch, workers=workers, shuffle=True, rank=rank, device=device)


def close_mosaic(loader, args) -> None:
    """Turn mosaic (and mixup, copy-paste) off in a training loader's dataset, as
    ``BaseTrainer._close_dataloader_mosaic`` does for the labeled loader in the last ``close_mosaic`` epochs: the
    dataset's ``mosaic`` flag, its ``close_mosaic(hyp)`` (which rebuilds its transforms), and ``reset()`` so that
    workers see the change."""
    from copy import copy

    loader.dataset.mosaic = False
    loader.dataset.close_mosaic(hyp=copy(args))
    loader.reset()


def concat_batches(labeled: dict, unlabeled: dict) -> dict:
    """One collated batch (``YOLODataset.collate_fn``'s layout) of the labeled images followed by the unlabeled ones:
    tensors concatenated along the first dimension (images, and the box rows ``cls``/``bboxes``/``batch_idx``, whose
    ``batch_idx`` is the image's index in the batch, so the second part's is shifted), lists and tuples joined."""
    n = labeled["img"].shape[0]
    out = {}
    for key, first in labeled.items():
        second = unlabeled[key]
        if key == "batch_idx":
            second = second + n
        if isinstance(first, torch.Tensor):
            out[key] = torch.cat((first, second.to(first.dtype)), 0)
        else:
            out[key] = type(first)([*first, *second])
    return out


def head_outputs_of_images(preds, images: slice):
    """The Detect head's raw output (see :func:`dense_head_outputs`) for some of the batch's images: every tensor in
    it (``boxes``, ``scores``, each of ``feats``, in both branches of end-to-end heads) has the image as its first
    dimension."""
    if isinstance(preds, torch.Tensor):
        return preds[images]
    if isinstance(preds, dict):
        return {k: head_outputs_of_images(v, images) for k, v in preds.items()}
    if isinstance(preds, (list, tuple)):
        return type(preds)(head_outputs_of_images(v, images) for v in preds)
    return preds


# --- elsewhere ----------------------------------------------------------------------------------------------------


def pil_image_open(path: Path):
    """PIL's own ``Image.open``. Importing Ultralytics replaces it (``ultralytics.utils.patches``) with one that, for
    every file PIL cannot identify, tries to install a HEIF plugin and logs a warning; the original stays there as
    ``_image_open``."""
    from PIL import Image

    return getattr(sys.modules.get("ultralytics.utils.patches"), "_image_open", Image.open)(path)


def cpu_name() -> str:
    """The CPU's model name, as Ultralytics reports it (``torch_utils.get_cpu_info``)."""
    from ultralytics.utils.torch_utils import get_cpu_info

    return get_cpu_info()


def progress_bar(iterable=None, **kwargs):
    """Ultralytics' own progress bar (``ultralytics.utils.TQDM``: tqdm's interface, a rate in units per second),
    shown on stderr whatever Ultralytics' log level: detkd's long commands (video, frame extraction,
    pseudo-labelling) look like Ultralytics' and need no tqdm dependency (Ultralytics 8.4 no longer installs tqdm)."""
    ultralytics_offline()
    from ultralytics.utils import TQDM

    return TQDM(iterable, **{"file": sys.stderr, "disable": False, **kwargs})


def prediction_backend(yolo, image, imgsz: int, device=None) -> tuple[nn.Module, torch.Tensor]:
    """The inference stage of ``YOLO.predict`` on its own: ``(backend, input)``, where ``backend(input)`` is exactly
    the model call the predictor times as "inference" and ``input`` is ``image`` (BGR) after the predictor's own
    preprocessing (letterbox, RGB, CHW, /255, fp16 where the backend runs in it).

    The backend is the predictor's ``AutoBackend`` (``yolo.predictor.model``), which runs each format with its own
    runtime: PyTorch for ``.pt``, ONNX Runtime for ``.onnx``, OpenVINO, TensorRT, TorchScript; a fixed-batch export
    given a larger batch is run in chunks of its batch. Both are set up by one ``predict`` call."""
    yolo.predict(image, imgsz=imgsz, device=device, verbose=False)
    predictor = yolo.predictor
    return predictor.model, predictor.preprocess([image])


# Options of the ONNX Runtime sessions detkd runs frame by frame: its intra-op workers sleep between calls instead of
# spin-waiting (ONNX Runtime's default), which holds a core the frame loop needs for decoding, NMS, tracking, drawing.
ORT_SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}
TORCH_FORMATS = ("pt", "torchscript")  # AutoBackend formats whose model call runs on torch's own threads


@contextlib.contextmanager
def runtime_threads(yolo, model: str | os.PathLike, threads: int | None = None):
    """Inside the block, predictions of ``yolo`` (loaded from ``model``) use ``threads`` threads (None: detkd's
    default, :func:`detkd.runtime.default_threads`) in ONE thread pool: the model's runtime. Torch's intra-op threads
    are restored at the end.

    Measured on 2 cores (README, "Deploying a student"): detkd gives torch every core (for training), and an export's
    pre- and post-processing (letterbox to tensor, /255, NMS: torch ops on one frame) then ran on torch's OpenMP pool
    while ONNX Runtime's pool spun between calls, two pools on the same cores: preprocess took 45 ms instead of 0.2.

    - PyTorch model or TorchScript export: torch's intra-op threads = ``threads`` (they run the model call).
    - Another export: torch's = 1 (per-frame work on one small image, faster serially than waking a pool), and for ONNX
      Runtime on CPU the session is rebuilt from the same file with ``intra_op_num_threads = threads`` and
      :data:`ORT_SESSION_CONFIG`: ``AutoBackend`` builds ``InferenceSession(weight, None, providers)`` and passes no
      session options through (``ONNXBackend``'s ``session_options`` argument is not given by ``AutoBackend``), so
      its ``backend.session`` is replaced. Other runtimes (OpenVINO, TensorRT) keep their own pools.

    Applied by an ``on_predict_start`` callback (public API): after the predictor's set-up, whose ``select_device``
    sets torch's threads to ``torch_utils.NUM_THREADS`` on CPU, and before its warm-up and first frame."""
    threads = threads or default_threads()
    previous = torch.get_num_threads()
    configured = []  # the AutoBackend set up, once

    def configure(predictor) -> None:
        backend = predictor.model
        if configured and configured[0] is backend:
            return
        configured[:] = [backend]
        torch.set_num_threads(threads if backend.format in TORCH_FORMATS else 1)
        session = getattr(backend.backend, "session", None)
        if backend.format == "onnx" and session is not None and session.get_providers() == ["CPUExecutionProvider"]:
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            for key, value in ORT_SESSION_CONFIG.items():
                options.add_session_config_entry(key, value)
            providers = session.get_providers()
            backend.backend.session = onnxruntime.InferenceSession(str(model), options, providers=providers)

    yolo.add_callback("on_predict_start", configure)
    try:
        yield
    finally:
        yolo.callbacks["on_predict_start"].remove(configure)
        torch.set_num_threads(previous)


def fixed_batch(backend) -> int | None:
    """The batch an export is fixed to (its metadata ``batch``, ``dynamic`` false), which ``AutoBackend`` runs a
    larger batch in chunks of; None for PyTorch models and dynamic exports."""
    if backend.format == "pt" or backend.metadata.get("dynamic"):
        return None
    return int(backend.batch)
