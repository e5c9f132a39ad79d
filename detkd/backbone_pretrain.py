"""A ResNet backbone for Faster R-CNN teachers where no ImageNet weights can be had: a torchvision ResNet classifier
trained on detkd's synthetic object crops (:func:`detkd.data.synth.generate_crops`), saved as the state dict that
``detkd teacher train --backbone-weights`` takes.

Faster R-CNN was made to start from an ImageNet backbone, and from scratch it converges slowly (on an H200, 329
iterations of batch 32 on 1,200 synthetic scenes reached COCO AP 0.026). A backbone that already tells the scene's
objects apart is the same knowledge transfer at small scale: started from one (6 epochs of 300 crops per class,
val top-1 0.92), a ResNet-18 FPN reached AP 0.025 in its first 56 iterations of batch 8 on 450 scenes, and 0.195
after 224 (on this project's 2-core CPU, the `frcnn` profile's data). The crops are normalised as
the detector will normalise its input (ImageNet's mean and std: torchvision's ``GeneralizedRCNNTransform``), so the
backbone sees the same input distribution in both.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from detkd.data.synth import CLASSES, generate_crops
from detkd.errors import DetkdError
from detkd.utils import atomic_write

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # GeneralizedRCNNTransform's defaults
ARCHS = ("resnet18", "resnet50")  # the ResNet bodies of detkd's Faster R-CNN architectures


@dataclass(frozen=True)
class CropsPretraining:
    """What the classifier is trained with (its defaults measured: see the module's docstring)."""

    arch: str = "resnet18"
    epochs: int = 6
    per_class: int = 300  # training crops per class (a fifth of it for val)
    imgsz: int = 64
    batch: int = 64
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def resnet_of(detector_arch: str) -> str:
    """The ResNet classifier whose weights fit the backbone of the torchvision detector ``detector_arch``."""
    for name in ARCHS:
        if f"_{name}_" in f"_{detector_arch}_":
            return name
    raise DetkdError(
        f"torchvision:{detector_arch}: its backbone is not a ResNet ({', '.join(ARCHS)}): no crops backbone"
    )


def pretrain_backbone(
    out: str | Path, settings: CropsPretraining = CropsPretraining(), workers: int = 2, device: str | None = None
) -> Path:
    """Train ``settings.arch`` on synthetic object crops and write its state dict to ``out`` (atomically, once
    trained: a file there is a finished one). Prints the val top-1 accuracy after every epoch; returns ``out``."""
    import torchvision

    from detkd.ultralytics_internals import progress_bar, ultralytics_offline

    ultralytics_offline()
    from ultralytics.utils.torch_utils import select_device

    s = settings
    if s.arch not in ARCHS:
        raise DetkdError(f"crops backbone: arch {s.arch!r}: one of {', '.join(ARCHS)}")
    if min(s.epochs, s.per_class, s.imgsz, s.batch) < 1 or workers < 0:
        raise DetkdError(
            "crops backbone: epochs, crops per class, imgsz and batch must be at least 1, workers 0 or more"
        )
    dev = select_device(device or "", verbose=False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    crops = out.parent / f".{out.name}.crops"  # beside the weights file, made anew (no stale crops), then removed
    shutil.rmtree(crops, ignore_errors=True)
    folder = generate_crops(crops, s.per_class, max(s.per_class // 5, 1), s.seed, s.imgsz)
    train_loader, val_loader = _loaders(folder, s.imgsz, s.batch, workers, s.seed)
    torch.manual_seed(s.seed)
    model = getattr(torchvision.models, s.arch)(weights=None, num_classes=len(CLASSES)).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=s.epochs * len(train_loader))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    for epoch in range(s.epochs):
        model.train()
        for images, labels in progress_bar(train_loader, desc=f"crops {s.arch} {epoch + 1}/{s.epochs}"):
            loss = loss_fn(model(images.to(dev)), labels.to(dev))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"crops backbone epoch {epoch + 1}/{s.epochs}: val top-1 {_accuracy(model, val_loader, dev):.3f}")
    atomic_write(out, lambda tmp: torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp))
    shutil.rmtree(crops, ignore_errors=True)
    return out


def _loaders(folder: Path, imgsz: int, batch: int, workers: int, seed: int):
    from torchvision import datasets, transforms

    normalise = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    augment = [transforms.RandomResizedCrop(imgsz, scale=(0.6, 1.0)), transforms.RandomHorizontalFlip()]
    train = datasets.ImageFolder(folder / "train", transforms.Compose([*augment, *normalise]))
    val = datasets.ImageFolder(folder / "val", transforms.Compose([transforms.Resize((imgsz, imgsz)), *normalise]))
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.utils.data.DataLoader(train, batch, shuffle=True, num_workers=workers, generator=generator),
        torch.utils.data.DataLoader(val, batch, num_workers=workers),
    )


def _accuracy(model: nn.Module, loader, device: torch.device) -> float:
    model.eval()
    right = seen = 0
    with torch.no_grad():
        for images, labels in loader:
            right += (model(images.to(device)).argmax(1).cpu() == labels).sum().item()
            seen += len(labels)
    return right / max(seen, 1)
