#!/usr/bin/env python
"""Train the source models for measuring transfer, since no pretrained weights can be downloaded here.

- ``cls``: a yolov8n-cls classifier on synthetic object crops (``generate_crops``): the ImageNet stand-in whose
  backbone a classifier transfer moves into a detection student;
- ``det_other``: a yolov8n detector on *other* scenes (another seed) with *another label set* (the 8 classes
  merged into 4: vehicle, two_wheeler, person, signal): the source of a detector transfer, whose class head
  cannot be reused.

    python tools/transfer_sources.py [--out runs/transfer_sources] [--cls-epochs 20] [--det-epochs 20]

Then ``detkd benchmark --profile transfer --teacher TEACHER.pt`` compares them at one budget.
"""

import argparse
from pathlib import Path

from detkd.data import load_yolo, write_yolo
from detkd.data.dataset import Category, DetectionDataset
from detkd.data.synth import CLASSES, SynthConfig, generate_crops, generate_synthetic
from detkd.ultralytics_internals import ultralytics_offline

MERGED = {
    "car": "vehicle",
    "truck": "vehicle",
    "bus": "vehicle",
    "motorcycle": "two_wheeler",
    "bicycle": "two_wheeler",
    "person": "person",
    "traffic_light": "signal",
    "stop_sign": "signal",
}


def merge_labels(dataset: DetectionDataset) -> DetectionDataset:
    """The same images with categories merged by :data:`MERGED` (ids 0..3 in first-seen order)."""
    names = list(dict.fromkeys(MERGED[c] for c in CLASSES))
    new_id = {c.id: names.index(MERGED[c.name]) for c in dataset.categories}
    for a in dataset.annotations:
        a.category_id = new_id[a.category_id]
    dataset.categories = [Category(i, n) for i, n in enumerate(names)]
    return dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/transfer_sources")
    p.add_argument("--cls-epochs", type=int, default=20)
    p.add_argument("--det-epochs", type=int, default=20)
    p.add_argument("--imgsz", type=int, default=160)
    args = p.parse_args()
    out = Path(args.out).resolve()
    ultralytics_offline()
    from ultralytics import YOLO

    same = {"seed": 0, "project": str(out), "exist_ok": True, "plots": False, "workers": 2}  # both trainings
    crops = out / "crops"
    if not (crops / "val").exists():
        generate_crops(crops, train=150, val=30, seed=1, imgsz=64)
    if not (out / "cls" / "weights" / "best.pt").exists():
        YOLO("yolov8n-cls.yaml").train(data=str(crops), epochs=args.cls_epochs, imgsz=64, batch=64, name="cls", **same)

    other = out / "other_scenes"
    if not (other / "data.yaml").exists():
        generate_synthetic(out / "other_raw", train=450, val=150, seed=1, cfg=SynthConfig(imgsz=args.imgsz))
        splits = {s: merge_labels(load_yolo(out / "other_raw" / "data.yaml", s)) for s in ("train", "val")}
        write_yolo(splits, other)
    if not (out / "det_other" / "weights" / "best.pt").exists():
        YOLO("yolov8n.yaml").train(
            data=str(other / "data.yaml"), epochs=args.det_epochs, imgsz=args.imgsz, batch=16, name="det_other", **same
        )
    for name in ("cls", "det_other"):
        print(f"{name}: {out / name / 'weights' / 'best.pt'}")


if __name__ == "__main__":
    main()
