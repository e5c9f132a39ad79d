"""In-memory detection data set: the one form every loader produces and every writer consumes.

Coordinates follow COCO: ``bbox`` is ``[x, y, w, h]`` in pixels of the original image, category ids are
whatever the source uses (COCO's 1..90 with gaps, a YOLO set's 0..K-1), so nothing is renumbered on the way
between formats.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from detkd.errors import DetkdError


@dataclass
class Category:
    id: int
    name: str


@dataclass
class ImageRecord:
    id: int
    file_name: str  # as stored in the source (COCO ``file_name`` or the path relative to the YOLO root)
    path: Path  # resolved absolute path of the image file
    width: int
    height: int


@dataclass
class Annotation:
    id: int
    image_id: int
    category_id: int
    bbox: list[float]  # x, y, w, h in pixels
    iscrowd: int = 0
    area: float | None = None  # COCO's segment area when known; box area otherwise

    def box_area(self) -> float:
        return float(self.bbox[2] * self.bbox[3])


@dataclass
class DetectionDataset:
    """One split of a detection data set."""

    images: list[ImageRecord]
    annotations: list[Annotation]
    categories: list[Category]
    source: Path  # the file it was loaded from (json or yaml), for messages
    split: str = "val"
    info: dict = field(default_factory=dict)

    @property
    def names(self) -> dict[int, str]:
        return {c.id: c.name for c in self.categories}

    def annotations_by_image(self) -> dict[int, list[Annotation]]:
        by_image: dict[int, list[Annotation]] = {im.id: [] for im in self.images}
        for a in self.annotations:
            by_image.setdefault(a.image_id, []).append(a)
        return by_image

    def to_coco(self) -> dict:
        """The COCO instances dict (what pycocotools' ``COCO`` expects)."""
        return {
            "info": {"description": f"detkd export of {self.source}", **self.info},
            "images": [
                {"id": im.id, "file_name": im.file_name, "width": im.width, "height": im.height} for im in self.images
            ],
            "annotations": [
                {
                    "id": a.id,
                    "image_id": a.image_id,
                    "category_id": a.category_id,
                    "bbox": [float(v) for v in a.bbox],
                    "area": float(a.area if a.area is not None else a.box_area()),
                    "iscrowd": int(a.iscrowd),
                }
                for a in self.annotations
            ],
            "categories": [{"id": c.id, "name": c.name, "supercategory": ""} for c in self.categories],
        }

    def with_images_in(self, root: Path, folder: str) -> DetectionDataset:
        """This split with its image files hard-linked (else copied) into ``root/folder``, as writers need them
        beside their labels or json; ``file_name`` becomes ``folder/<name>``. Files already there are kept."""
        dest = root / folder
        dest.mkdir(parents=True, exist_ok=True)
        images, taken = [], {}
        for im in self.images:
            name = Path(im.file_name).name
            if name in taken:
                raise DetkdError(
                    f"{self.source}: images {taken[name]} and {im.file_name} would both be {folder}/{name}"
                )
            taken[name] = im.file_name
            try:
                _link_or_copy(im.path, dest / name)
            except OSError as e:
                raise DetkdError(f"{im.path}: cannot copy image to {dest} ({e.strerror or e})") from None
            images.append(replace(im, file_name=f"{folder}/{name}", path=(dest / name).resolve()))
        return replace(self, images=images)


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        if dst.samefile(src):
            return
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def read_mapping(path: Path, parse: Callable[[str], Any]) -> dict:
    """Parse a JSON or YAML file that must hold a mapping; every failure becomes one DetkdError line."""
    try:
        data = parse(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DetkdError(f"{path}: file not found") from None
    except Exception as e:  # JSONDecodeError, YAMLError, IsADirectoryError, UnicodeDecodeError, ...
        raise DetkdError(f"{path}: cannot parse ({' '.join(str(e).split()) or type(e).__name__})") from None
    if not isinstance(data, dict):
        raise DetkdError(f"{path}: expected a mapping at the top level, found {type(data).__name__}")
    return data


def require(data: dict, key: str, source: Path) -> Any:
    """``data[key]``, or the one-line error that names the file and the missing key."""
    if key not in data or data[key] is None:
        raise DetkdError(f"{source}: missing key '{key}'")
    return data[key]


def data_format(path: Path) -> str:
    """``"coco"`` or ``"yolo"``, told by the suffix as users name their files."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "coco"
    if suffix in (".yaml", ".yml"):
        return "yolo"
    raise DetkdError(f"{path}: expected a COCO instances .json or a YOLO data .yaml")
