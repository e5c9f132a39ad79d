#!/usr/bin/env python
"""A ResNet backbone for Faster R-CNN teachers where no ImageNet weights can be downloaded: a torchvision ResNet
classifier trained on detkd's synthetic object crops (:func:`detkd.data.synth.generate_crops`), saved as the state
dict that ``detkd teacher train --backbone-weights`` takes.

From scratch a Faster R-CNN converges slowly (its detectors were made to start from an ImageNet backbone); a
backbone that already tells the scene's objects apart is the same knowledge transfer at small scale. The crops are
normalised as the detector will normalise its input (ImageNet's mean and std: torchvision's
``GeneralizedRCNNTransform``), so the backbone sees the same input distribution in both.

    python tools/crops_backbone.py --out runs/crops_resnet18.pt [--arch resnet18] [--epochs 10] [--per-class 400]
        [--imgsz 64] [--batch 64] [--workers 2] [--seed 0]

Prints the val top-1 accuracy after every epoch; the file is written (atomically) after every epoch too.
"""

import argparse
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from detkd.data.synth import CLASSES, generate_crops
from detkd.errors import DetkdError
from detkd.ultralytics_internals import progress_bar
from detkd.utils import atomic_write

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # GeneralizedRCNNTransform's defaults
ARCHS = ("resnet18", "resnet50")  # the ResNet bodies of detkd's Faster R-CNN architectures


def loaders(folder: Path, imgsz: int, batch: int, workers: int, seed: int):
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


def accuracy(model: nn.Module, loader) -> float:
    model.eval()
    right = seen = 0
    with torch.no_grad():
        for images, labels in loader:
            right += (model(images).argmax(1) == labels).sum().item()
            seen += len(labels)
    return right / max(seen, 1)


def train(args: argparse.Namespace) -> Path:
    import torchvision

    if args.arch not in ARCHS:
        raise DetkdError(f"--arch {args.arch}: one of {', '.join(ARCHS)}")
    if args.epochs < 1 or args.per_class < 1:
        raise DetkdError("--epochs and --per-class must be at least 1")
    crops = Path(args.out).with_suffix("") / "crops"  # beside the weights file, made anew: no stale crops
    shutil.rmtree(crops, ignore_errors=True)
    folder = generate_crops(crops, args.per_class, max(args.per_class // 5, 1), args.seed, args.imgsz)
    train_loader, val_loader = loaders(folder, args.imgsz, args.batch, args.workers, args.seed)
    torch.manual_seed(args.seed)
    model = getattr(torchvision.models, args.arch)(weights=None, num_classes=len(CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=args.epochs * len(train_loader))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    out = Path(args.out)
    for epoch in range(args.epochs):
        model.train()
        for images, labels in progress_bar(train_loader, desc=f"{args.arch} {epoch + 1}/{args.epochs}"):
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        top1 = accuracy(model, val_loader)
        atomic_write(out, lambda tmp: torch.save(model.state_dict(), tmp))
        print(f"epoch {epoch + 1}/{args.epochs}: val top-1 {top1:.3f} ({len(CLASSES)} classes); saved {out}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="state dict file for detkd teacher train --backbone-weights")
    p.add_argument("--arch", default="resnet18", help=f"{', '.join(ARCHS)} (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=10, help="(default: %(default)s)")
    p.add_argument("--per-class", type=int, default=400, help="training crops per class (default: %(default)s)")
    p.add_argument("--imgsz", type=int, default=64, help="crop size (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    args = p.parse_args(argv)
    try:
        train(args)
    except DetkdError as e:
        print(f"crops_backbone: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
