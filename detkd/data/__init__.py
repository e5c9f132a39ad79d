"""Detection data sets: COCO json and Ultralytics YOLO, loaded into one in-memory form, checked and converted."""

from __future__ import annotations

from pathlib import Path

from detkd.data.check import DataReport, Problem, check_dataset
from detkd.data.coco import load_coco, write_coco
from detkd.data.convert import convert
from detkd.data.dataset import Annotation, Category, DetectionDataset, ImageRecord, data_format
from detkd.data.yolo import load_yolo, write_yolo

__all__ = [
    "Annotation",
    "Category",
    "DataReport",
    "DetectionDataset",
    "ImageRecord",
    "Problem",
    "check_dataset",
    "convert",
    "load_coco",
    "load_data",
    "load_yolo",
    "write_coco",
    "write_yolo",
]


def load_data(
    path: str | Path, split: str = "val", images_dir: str | Path | None = None, check: bool = True
) -> DetectionDataset:
    """Load a COCO instances json (``images_dir`` applies) or one ``split`` of a YOLO data.yaml.

    With ``check`` the data is checked first (images decoded) and a DataError carrying the report is raised
    on any error, so that nothing trains or evaluates on broken data.
    """
    path = Path(path)
    fmt = data_format(path)
    if check:
        check_dataset(path, images_dir, splits=[split] if fmt == "yolo" else None).raise_if_errors()
    return load_coco(path, images_dir) if fmt == "coco" else load_yolo(path, split)
