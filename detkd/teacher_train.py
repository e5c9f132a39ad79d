"""Train a torchvision two-stage detector as a teacher (``detkd teacher train``), on the inputs it will teach on.

Users fine-tune their Faster R-CNN on their own labels before distilling it, and the benchmarks need one. This is
a plain loop in the style of torchvision's detection references (``references/detection/train.py``): SGD with
momentum and weight decay, a linear warm-up and a cosine decay, horizontal flips, gradient clipping, bf16 autocast
on CUDA, the loss torchvision's own ``model(images, targets)`` returns. What differs is the input: every image is
letterboxed to ``imgsz`` square (as Ultralytics letterboxes a student's batch, centred on grey 114) and the
model's own resize is made a no-op, so the teacher trains at exactly the scale and grid the distiller later feeds
it (:class:`~detkd.adapters.torchvision.TorchvisionAdapter` bypasses the resize).

With ``weights`` it fine-tunes instead of starting from scratch, as torchvision's fine-tuning tutorial does: a
detector's weights (COCO's, say), its box predictor (sized and ordered for the weights' own classes) replaced by a
new one for the data's classes. With ``backbone`` only the backbone starts trained: a torchvision ResNet
classifier's weights (ImageNet's, or :mod:`detkd.backbone_pretrain`'s on synthetic object crops, where none can be
downloaded), as torchvision's ``weights_backbone`` does. Either way the backbone's batch norms are kept as they are,
as torchvision's v1 builders freeze them (``FrozenBatchNorm2d``) when they load weights: statistics of a few
letterboxed images would be noise (its ``_v2`` builders keep them trainable, for their large-batch recipe). Unlike
torchvision, every other backbone layer trains (it freezes ``conv1`` and ``layer1`` by default).

``OUT`` receives ``weights/last.pt`` (the training state, written atomically after each epoch; running the same
command again resumes from it), ``results.csv`` (per epoch: time, losses, COCO AP on the val split through
:mod:`detkd.evaluation`), and at the end ``teacher.pt`` (a detkd teacher checkpoint,
:func:`~detkd.adapters.torchvision.save_torchvision_teacher`, which ``create_teacher``, ``detkd eval`` and
``detkd train`` take) with ``coco_metrics.json``, its 12-number COCO table.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from detkd import safe_load
from detkd.adapters.torchvision import (
    TorchvisionAdapter,
    build_model,
    check_architecture,
    fit_weights,
    num_classes_of,
    read_state_dict,
    save_torchvision_teacher,
)
from detkd.data import load_data
from detkd.data.dataset import DetectionDataset
from detkd.errors import DetkdError
from detkd.evaluation import coco_evaluate, predict_teacher
from detkd.utils import atomic_write, save_json, write_text

STATE_KEY = "detkd_teacher_training"  # marker of the training state file; its value: version
WARMUP_ITERATIONS = 500  # linear warm-up (torchvision's references: 1000 at batch 16 on COCO), at most one epoch
MIN_LR_FACTOR = 0.01  # the cosine decay ends at this fraction of the learning rate
GRAD_CLIP = 10.0  # max gradient norm: from scratch, early RPN/RoI losses can spike
# RoIs sampled per image for the box head's loss: 128, as Fast R-CNN (Girshick, ICCV 2015) sampled them (64 × 2
# images); torchvision's 512 is sized for 800 px COCO images and makes the box head most of a step at 64-160 px
ROIS_PER_IMAGE = 128


@dataclass(frozen=True)
class TeacherTraining:
    """What a training is; a run in ``out`` resumes only with the same settings."""

    arch: str
    data: str
    epochs: int
    imgsz: int
    batch: int = 8
    lr: float = 0.02  # SGD learning rate at batch 16 (torchvision's references), scaled linearly with the batch
    seed: int = 0
    weights: str | None = None  # the detector weights it fine-tunes from; None: from scratch
    backbone: str | None = None  # the classifier weights its backbone starts from

    def to_dict(self) -> dict:
        """The settings as saved; ``weights`` and ``backbone`` only when set, so that states saved before they
        existed still match."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in ("weights", "backbone")}


class LetterboxedDetections(torch.utils.data.Dataset):
    """Images of a :class:`DetectionDataset` letterboxed to ``size`` square, RGB 0-1, with torchvision targets
    (``boxes`` xyxy letterboxed pixels, ``labels`` 1 ... K by ``labels``: category id -> label); ``flip``: a
    horizontal flip with probability 1/2."""

    def __init__(self, dataset: DetectionDataset, labels: dict[int, int], size: int, flip: bool = False):
        self.images, self.size, self.flip, self.labels = dataset.images, size, flip, labels
        self.annotations = dataset.annotations_by_image()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        record = self.images[index]
        pixels = cv2.imread(str(record.path))
        if pixels is None:
            raise DetkdError(f"{record.path}: image cannot be read")
        h, w = pixels.shape[:2]
        r = min(self.size / h, self.size / w)
        new_w, new_h = round(w * r), round(h * r)
        left, top = (self.size - new_w) // 2, (self.size - new_h) // 2
        canvas = np.full((self.size, self.size, 3), 114, dtype=np.uint8)
        canvas[top : top + new_h, left : left + new_w] = cv2.resize(
            pixels, (new_w, new_h), interpolation=cv2.INTER_LINEAR
        )
        found = [a for a in self.annotations.get(record.id, []) if not a.iscrowd]
        xywh = torch.tensor([a.bbox for a in found], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat((xywh[:, :2], xywh[:, :2] + xywh[:, 2:]), 1)
        boxes = boxes * torch.tensor([new_w / w, new_h / h] * 2) + torch.tensor([left, top] * 2, dtype=torch.float32)
        image = torch.from_numpy(np.ascontiguousarray(canvas[..., ::-1])).permute(2, 0, 1).float() / 255
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
            boxes = torch.stack((self.size - boxes[:, 2], boxes[:, 1], self.size - boxes[:, 0], boxes[:, 3]), 1)
        labels = torch.tensor([self.labels[a.category_id] for a in found], dtype=torch.int64)
        return image, {"boxes": boxes, "labels": labels}


def _collate(batch):
    return tuple(zip(*batch))


def lr_factor(iteration: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier at ``iteration``: linear warm-up from 0.1 % over ``warmup`` iterations, then a cosine
    decay to :data:`MIN_LR_FACTOR` at ``total``."""
    if iteration < warmup:
        return 0.001 + (1 - 0.001) * iteration / warmup
    t = min((iteration - warmup) / max(total - warmup, 1), 1.0)
    return MIN_LR_FACTOR + (1 - MIN_LR_FACTOR) * 0.5 * (1 + math.cos(math.pi * t))


def train_teacher(
    arch: str,
    data: str | os.PathLike,
    epochs: int,
    imgsz: int,
    out: str | os.PathLike,
    batch: int = 8,
    device: str | None = None,
    workers: int = 2,
    lr: float = 0.02,
    seed: int = 0,
    weights: str | os.PathLike | None = None,
    backbone: str | os.PathLike | None = None,
) -> Path:
    """Train ``arch`` (a name of :data:`~detkd.adapters.torchvision.ARCHITECTURES`) on the YOLO data yaml or COCO
    json ``data`` at letterboxed ``imgsz``, from scratch or, with ``weights`` (a state dict file, or a weights name
    of ``arch`` in torchvision's cache: ``COCO_V1``), fine-tuning them, or with ``backbone`` (a torchvision ResNet
    classifier's state dict file) as its backbone's start; returns ``out/teacher.pt``. Resumes a cut run
    of the same settings in ``out``; a finished one is returned as it is."""
    from detkd.ultralytics_internals import progress_bar, ultralytics_offline

    ultralytics_offline()
    from ultralytics.utils.torch_utils import select_device

    check_architecture(arch)
    if epochs < 1 or batch < 1 or imgsz < 32 or imgsz % 32:
        raise DetkdError(f"teacher train: need epochs >= 1, batch >= 1, imgsz a multiple of 32 (got {imgsz})")
    if weights is not None and backbone is not None:
        raise DetkdError("teacher train: give --weights (a whole detector) or --backbone-weights, not both")
    # a weights name (COCO_V1) is kept as it is; a file by its absolute path, so that a resume without it still matches
    named = weights is not None and not Path(weights).suffix and os.sep not in str(weights) and "/" not in str(weights)
    source = None if weights is None else str(weights) if named else str(Path(weights).resolve())
    body = None if backbone is None else str(Path(backbone).resolve())
    settings = TeacherTraining(arch, str(Path(data).resolve()), epochs, imgsz, batch, lr, seed, source, body)
    out = Path(out)
    state_file, final = out / "weights" / "last.pt", out / "teacher.pt"
    state = _read_state(state_file, settings)
    if state is not None and state["epoch"] >= epochs and final.is_file():
        print(f"detkd: {final} is already trained with these settings")
        return final

    train_set, val_set = load_data(data, split="train"), load_data(data, split="val")
    categories = sorted(train_set.categories, key=lambda c: c.id)
    labels = {c.id: i + 1 for i, c in enumerate(categories)}  # column 0 is background
    names = {i + 1: c.name for i, c in enumerate(categories)}
    dev = select_device(device or "", verbose=False)
    torch.manual_seed(seed)
    if state is None and weights is not None:  # a resumed run's weights come from its own state
        model = _fine_tuned(arch, weights, len(names) + 1)
    else:
        model = build_model(arch, len(names) + 1)
        if state is None and backbone is not None:
            _load_backbone(model, backbone)
    pretrained = weights is not None or backbone is not None
    model.transform.min_size, model.transform.max_size = (imgsz,), imgsz  # its resize: a no-op on letterboxed input
    model.roi_heads.fg_bg_sampler.batch_size_per_image = ROIS_PER_IMAGE
    model.to(dev)
    if pretrained:
        _freeze_backbone_norms(model)  # before the optimizer is built: frozen parameters are not in it
    params = [p for p in model.parameters() if p.requires_grad]
    base_lr = lr * batch / 16
    optimizer = torch.optim.SGD(params, lr=base_lr, momentum=0.9, weight_decay=1e-4)
    history: list[dict] = []
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, start = state["history"], state["epoch"]
        print(f"detkd: resuming {out} at epoch {start + 1} of {epochs}")

    loader = torch.utils.data.DataLoader(
        LetterboxedDetections(train_set, labels, imgsz, flip=True),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        collate_fn=_collate,
        drop_last=len(train_set.images) > batch,  # a last batch of one image would make BatchNorm's statistics noise
        generator=torch.Generator().manual_seed(seed),
    )
    total = epochs * len(loader)
    warmup = min(WARMUP_ITERATIONS, len(loader))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    metrics = None
    for epoch in range(start, epochs):
        loader.generator.manual_seed(seed + epoch)  # the same shuffle and flips when an epoch is rerun on resume
        model.train()
        if pretrained:
            _freeze_backbone_norms(model)  # train() put them back in training mode
        began, sums, iteration = time.time(), {}, epoch * len(loader)
        bar = progress_bar(loader, desc=f"teacher {epoch + 1}/{epochs}", total=len(loader))
        for images, targets in bar:
            for group in optimizer.param_groups:
                group["lr"] = base_lr * lr_factor(iteration, warmup, total)
            images = [im.to(dev, non_blocking=True) for im in images]
            targets = [{k: v.to(dev) for k, v in t.items()} for t in targets]
            with autocast:
                parts = model(images, targets)
            loss = sum(parts.values())
            if not torch.isfinite(loss):
                raise DetkdError(
                    f"{out}: teacher loss is {loss.item()} at epoch {epoch + 1}, iteration {iteration + 1} "
                    f"({', '.join(f'{k} {v.item():.3g}' for k, v in parts.items())}): lower --lr"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            optimizer.step()
            iteration += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            bar.set_description(f"teacher {epoch + 1}/{epochs} loss {loss.item():.3f}")
        metrics = evaluate_teacher(model, names, val_set, imgsz, batch)
        seconds = time.time() - began
        row = {"epoch": epoch + 1, "time": round((history[-1]["time"] if history else 0.0) + seconds, 1)}
        row |= {f"train/{k}": round(v / max(len(loader), 1), 5) for k, v in sums.items()}
        row |= {
            "lr": optimizer.param_groups[0]["lr"],
            "metrics/mAP50-95(B)": metrics["AP"],
            "metrics/mAP50(B)": metrics["AP50"],
        }
        history.append(row)
        print(f"detkd: teacher epoch {epoch + 1}/{epochs}: AP {metrics['AP']:.4f}, AP50 {metrics['AP50']:.4f}")
        _write_results(out / "results.csv", history)
        _save_state(state_file, settings, model, optimizer, epoch + 1, history)

    if metrics is None:  # trained before, cut before its checkpoint was written
        metrics = evaluate_teacher(model, names, val_set, imgsz, batch)
    save_json(
        {"model": str(final), "data": str(data), "split": "val", "imgsz": imgsz, **metrics}, out / "coco_metrics.json"
    )
    return save_torchvision_teacher(final, arch, {k: v.cpu() for k, v in model.state_dict().items()}, names, imgsz)


def _fine_tuned(arch: str, weights: str | os.PathLike, num_classes: int) -> nn.Module:
    """``arch`` with the detector ``weights``, its box predictor replaced by a new one for ``num_classes``."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    state = read_state_dict(weights, arch)
    model = fit_weights(build_model(arch, num_classes_of(state, str(weights))), state, str(weights))
    features = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = FastRCNNPredictor(features, num_classes)
    return model


def _load_backbone(model: nn.Module, path: str | os.PathLike) -> None:
    """A torchvision ResNet classifier's weights (its ``fc`` dropped) into ``model``'s ResNet backbone, whose
    layers keep the classifier's names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``)."""
    body = model.backbone.body
    if not hasattr(body, "layer1"):
        raise DetkdError(
            f"{path}: --backbone-weights is for ResNet backbones (a ResNet classifier's weights); this is not one"
        )
    state = {k: v for k, v in read_state_dict(path, "resnet").items() if not k.startswith("fc.")}
    fit_weights(body, state, str(path))


def _freeze_backbone_norms(model: nn.Module) -> None:
    """The backbone's batch norms in eval mode with their affine parameters fixed: what ``FrozenBatchNorm2d``
    computes, without changing the modules (so a fine-tuned teacher's state dict is an ordinary one)."""
    for module in model.backbone.body.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)


def evaluate_teacher(model: nn.Module, names: dict[int, str], dataset: DetectionDataset, imgsz: int, batch: int):
    """The 12 COCO numbers of ``model`` (left in eval mode) on ``dataset``, seen as in distillation."""
    model.eval()
    return coco_evaluate(dataset, predict_teacher(TorchvisionAdapter(model, names), dataset, imgsz=imgsz, batch=batch))


def _write_results(path: Path, history: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in history for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    write_text(path, text.getvalue())


def _save_state(path: Path, settings: TeacherTraining, model, optimizer, epoch: int, history: list[dict]) -> None:
    state = {
        STATE_KEY: 1,
        "settings": settings.to_dict(),
        "epoch": epoch,
        "model": {k: v.cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "history": history,
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _read_state(path: Path, settings: TeacherTraining) -> dict | None:
    """The training state in ``path`` when it is one of these ``settings``; None when there is none; an error when
    it is another training's (nothing of it may be mixed in)."""
    if not path.is_file():
        return None
    state = safe_load.load(path, lambda name: None, map_location="cpu", kind="teacher training state")
    if not isinstance(state, dict) or state.get(STATE_KEY) != 1:
        raise DetkdError(f"{path}: not a detkd teacher training state; choose another --out")
    if state["settings"] != settings.to_dict():
        theirs = state["settings"]
        differ = ", ".join(
            f"{k} {theirs.get(k)!r} (now {v!r})" for k, v in asdict(settings).items() if theirs.get(k) != v
        )
        raise DetkdError(f"{path}: another teacher training ({differ}); choose another --out or delete it")
    return state
