"""COCO instances json: the format pycocotools evaluates, so the one every other format round-trips through."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from detkd.data.dataset import Annotation, Category, DetectionDataset, ImageRecord, read_mapping, require
from detkd.errors import DetkdError
from detkd.utils import write_text

_SPLIT_WORDS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def load_coco(
    json_path: str | Path, images_dir: str | Path | None = None, split: str | None = None
) -> DetectionDataset:
    """Read a COCO instances json; ids are kept as they are (1..90 with gaps stays so).

    Images are looked up under ``images_dir`` if given, else beside the json or one folder up (the layout
    ``<root>/annotations/x.json`` + ``<root>/images/...`` that :func:`detkd.data.convert` writes).
    """
    path = Path(json_path)
    data = read_mapping(path, json.loads)
    raw_images = require(data, "images", path)
    raw_annotations = require(data, "annotations", path)
    raw_categories = require(data, "categories", path)
    root = Path(images_dir) if images_dir is not None else _image_root(path, raw_images)

    def image(e: dict) -> ImageRecord:
        name = str(e["file_name"])
        return ImageRecord(int(e["id"]), name, Path(os.path.abspath(root / name)), int(e["width"]), int(e["height"]))

    def annotation(e: dict) -> Annotation:
        bbox = [float(v) for v in e["bbox"]]
        if len(bbox) != 4:
            raise ValueError(f"bbox has {len(bbox)} values, expected 4")
        area = e.get("area")
        return Annotation(
            int(e["id"]),
            int(e["image_id"]),
            int(e["category_id"]),
            bbox,
            iscrowd=int(e.get("iscrowd", 0)),
            area=None if area is None else float(area),
        )

    return DetectionDataset(
        images=_parse_entries(path, "images", raw_images, image),
        annotations=_parse_entries(path, "annotations", raw_annotations, annotation),
        categories=_parse_entries(path, "categories", raw_categories, lambda e: Category(int(e["id"]), str(e["name"]))),
        source=path,
        split=split or guess_split(path.stem),
        info=data.get("info") if isinstance(data.get("info"), dict) else {},
    )


def write_coco(ds: DetectionDataset, json_path: str | Path) -> Path:
    """Write ``ds`` as a COCO instances json (``file_name`` as stored in the records)."""
    return write_text(json_path, json.dumps(ds.to_coco()))


def guess_split(stem: str) -> str:
    """The split a file name suggests (``instances_val2017`` -> ``val``), else ``val``."""
    for token in reversed(re.split(r"[^a-z0-9]+", stem.lower())):
        if word := _SPLIT_WORDS.get(token.rstrip("0123456789")):
            return word
    return "val"


def _image_root(json_path: Path, raw_images: Any) -> Path:
    first = raw_images[0].get("file_name") if isinstance(raw_images, list) and raw_images else None
    if isinstance(first, str):
        for root in (json_path.parent, json_path.parent.parent):
            if (root / first).exists():
                return root
    return json_path.parent


def _parse_entries(path: Path, key: str, entries: Any, make: Callable[[dict], Any]) -> list:
    if not isinstance(entries, list):
        raise DetkdError(f"{path}: '{key}' must be a list, found {type(entries).__name__}")
    out = []
    for i, entry in enumerate(entries):
        try:
            out.append(make(entry))
        except KeyError as e:
            raise DetkdError(f"{path}: {key}[{i}] missing key {e}") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise DetkdError(f"{path}: {key}[{i}] is malformed ({e})") from None
    return out
