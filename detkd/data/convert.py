"""Convert a checked data set between COCO and YOLO, images included, so the result stands on its own."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from detkd.data.check import check_dataset
from detkd.data.coco import load_coco, write_coco
from detkd.data.dataset import DetectionDataset, data_format
from detkd.data.yolo import load_yolo, read_data_yaml, write_yolo
from detkd.errors import DetkdError


def convert(
    path: str | Path, to: Literal["coco", "yolo"], out_dir: str | Path, images_dir: str | Path | None = None
) -> Path:
    """Write the data set at ``path`` (every split of a yaml) in format ``to`` under ``out_dir``.

    YOLO: ``out/data.yaml``, ``out/images/<split>/``, ``out/labels/<split>/``; returns the yaml.
    COCO: ``out/annotations/instances_<split>.json`` naming ``out/images/<split>/...``; returns the val json
    (else the first). Images are hard-linked when possible. Data that fails :func:`check_dataset` is refused
    with a DataError that carries the report.
    """
    source, out = Path(path), Path(out_dir)
    if to not in ("coco", "yolo"):
        raise DetkdError(f"{source}: cannot convert to {to!r}, expected 'coco' or 'yolo'")
    check_dataset(source, images_dir).raise_if_errors()
    splits = read_splits(source, images_dir)
    if to == "yolo":
        return write_yolo(splits, out)
    jsons = {
        split: write_coco(ds.with_images_in(out, f"images/{split}"), out / "annotations" / f"instances_{split}.json")
        for split, ds in splits.items()
    }
    return jsons.get("val") or next(iter(jsons.values()))


def read_splits(path: str | Path, images_dir: str | Path | None = None) -> dict[str, DetectionDataset]:
    """Every split of a data set: the one split of a COCO json, or each split a data.yaml lists."""
    path = Path(path)
    if data_format(path) == "coco":
        ds = load_coco(path, images_dir)
        return {ds.split: ds}
    return {split: load_yolo(path, split) for split in read_data_yaml(path).splits()}
