"""Check a data set before anything trains on it: a broken image or label found here costs seconds, not a run."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from detkd.data.coco import load_coco
from detkd.data.dataset import data_format
from detkd.data.yolo import label_file, open_image, parse_label_line, read_data_yaml, read_labels, relative_path
from detkd.errors import DataError, DetkdError

# Problem kinds, in report order.
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
DUPLICATE_IMAGE = "image listed twice"
EMPTY_SPLIT = "split without images"
DUPLICATE_IMAGE_ID = "duplicate image id"
DUPLICATE_ANNOTATION_ID = "duplicate annotation id"
DUPLICATE_CATEGORY_ID = "duplicate category id"
UNKNOWN_IMAGE_ID = "annotation of unknown image id"
UNKNOWN_CLASS = "unknown class"
MALFORMED_LINE = "malformed label line"
DEGENERATE_BOX = "degenerate box"
OUT_OF_RANGE = "box outside the image"
MISSING_LABEL = "missing label file (background image)"
ERROR_KINDS = (
    MISSING_IMAGE,
    UNREADABLE_IMAGE,
    DUPLICATE_IMAGE,
    EMPTY_SPLIT,
    DUPLICATE_IMAGE_ID,
    DUPLICATE_ANNOTATION_ID,
    DUPLICATE_CATEGORY_ID,
    UNKNOWN_IMAGE_ID,
    UNKNOWN_CLASS,
    MALFORMED_LINE,
    DEGENERATE_BOX,
    OUT_OF_RANGE,
)
WARNING_KINDS = (MISSING_LABEL,)

TOLERANCE = 0.01  # how far (fraction of the image) a box may stick out: Ultralytics' own tolerance
_LISTED = 10  # file names shown per problem


@dataclass
class Problem:
    kind: str
    count: int
    files: list[str]  # every offending file (with line or annotation where that helps), in data order

    def describe(self, limit: int = _LISTED) -> str:
        more = f" and {len(self.files) - limit} more" if len(self.files) > limit else ""
        return f"{self.kind} ({self.count}): {', '.join(self.files[:limit])}{more}"


@dataclass
class DataReport:
    path: Path
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    images: int = 0  # images checked
    boxes: int = 0  # label lines / annotations checked

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def error_count(self) -> int:
        return sum(p.count for p in self.errors)

    def format(self) -> str:
        """The report for people: a headline naming the data file, then one line per problem."""
        status = "OK" if self.ok else _plural(self.error_count, "error")
        warned = f", {_plural(sum(p.count for p in self.warnings), 'warning')}" if self.warnings else ""
        lines = [f"{self.path}: {status}{warned} ({self.images} images, {self.boxes} boxes checked)"]
        lines += [f"  error: {p.describe()}" for p in self.errors]
        lines += [f"  warning: {p.describe()}" for p in self.warnings]
        return "\n".join(lines)

    def raise_if_errors(self) -> None:
        if self.errors:
            first = self.errors[0].describe(limit=1)
            raise DataError(f"{self.path}: {self.error_count} data errors (first: {first})", self)


def check_dataset(
    path: str | Path, images_dir: str | Path | None = None, splits: list[str] | None = None
) -> DataReport:
    """Check a COCO json or a YOLO data.yaml (``splits``, default all it lists), decoding every image.

    Problems of the files are collected into the report; a data file that cannot be read at all (missing,
    unparsable, lacking keys) raises DetkdError instead.
    """
    path = Path(path)
    found: dict[str, list[str]] = defaultdict(list)
    if data_format(path) == "coco":
        images, boxes = _check_coco(path, images_dir, found)
    else:
        images, boxes = _check_yolo(path, splits, found)
    return DataReport(
        path,
        errors=[Problem(k, len(found[k]), found[k]) for k in ERROR_KINDS if found.get(k)],
        warnings=[Problem(k, len(found[k]), found[k]) for k in WARNING_KINDS if found.get(k)],
        images=images,
        boxes=boxes,
    )


def _check_coco(path: Path, images_dir: str | Path | None, found: dict[str, list[str]]) -> tuple[int, int]:
    ds = load_coco(path, images_dir)
    _duplicates(found, DUPLICATE_IMAGE_ID, ((im.id, f"{im.file_name} (id {im.id})") for im in ds.images))
    _duplicates(found, DUPLICATE_IMAGE, ((im.path, im.file_name) for im in ds.images))
    _duplicates(found, DUPLICATE_ANNOTATION_ID, ((a.id, f"annotation {a.id}") for a in ds.annotations))
    _duplicates(found, DUPLICATE_CATEGORY_ID, ((c.id, f"category {c.id} '{c.name}'") for c in ds.categories))
    by_id = {im.id: im for im in ds.images}
    category_ids = {c.id for c in ds.categories}
    for a in ds.annotations:
        im = by_id.get(a.image_id)
        where = f"{im.file_name} (annotation {a.id})" if im else f"annotation {a.id}"
        if im is None:
            found[UNKNOWN_IMAGE_ID].append(f"{where}: image id {a.image_id}")
        if a.category_id not in category_ids:
            found[UNKNOWN_CLASS].append(f"{where}: category id {a.category_id}")
        size = (im.width, im.height) if im else (None, None)
        if kind := _box_problem(*a.bbox, *size):
            found[kind].append(where)
    unique = {im.path: im.file_name for im in ds.images}
    _check_images(found, unique)
    return len(unique), len(ds.annotations)


def _check_yolo(path: Path, splits: list[str] | None, found: dict[str, list[str]]) -> tuple[int, int]:
    spec = read_data_yaml(path)
    splits = splits or spec.splits()
    if not splits:
        raise DetkdError(f"{path}: missing key 'val' (no train, val or test split listed)")
    images: dict[Path, str] = {}
    boxes = 0
    for split in splits:
        files = spec.image_files(split)
        if not files:
            found[EMPTY_SPLIT].append(f"{split}: {spec.data[split]}")
        shown = {f: relative_path(f, spec.root) for f in files}
        _duplicates(found, DUPLICATE_IMAGE, ((f, shown[f]) for f in files))
        for image in shown:  # each file once, even if listed twice
            label = label_file(image)
            lines = read_labels(label)
            if lines is None:
                found[MISSING_LABEL].append(relative_path(label, spec.root))
            for n, line in lines or []:
                where = f"{relative_path(label, spec.root)}:{n}"
                try:
                    cls, cx, cy, w, h = parse_label_line(line)
                except ValueError:
                    found[MALFORMED_LINE].append(where)
                    continue
                boxes += 1
                if spec.category_id(cls) is None:
                    found[UNKNOWN_CLASS].append(f"{where}: class {cls}")
                if kind := _box_problem(cx - w / 2, cy - h / 2, w, h, 1.0, 1.0):
                    found[kind].append(where)
        images.update(shown)
    _check_images(found, images)
    return len(images), boxes


def _box_problem(x: float, y: float, w: float, h: float, width: float | None, height: float | None) -> str | None:
    """What is wrong with box ``x, y, w, h`` (top-left corner) in an image of that size (None: size unknown)."""
    if w <= 0 or h <= 0:
        return DEGENERATE_BOX
    if width is None or height is None:
        return None
    tx, ty = TOLERANCE * width, TOLERANCE * height
    if x < -tx or y < -ty or x + w > width + tx or y + h > height + ty:
        return OUT_OF_RANGE
    return None


def _check_images(found: dict[str, list[str]], images: dict[Path, str]) -> None:
    """Decode every image (threads: PIL decodes without the GIL)."""
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) + 4)) as pool:
        for name, kind in zip(images.values(), pool.map(image_problem, images), strict=True):
            if kind:
                found[kind].append(name)


def image_problem(path: Path) -> str | None:
    """What is wrong with an image file (missing, unreadable: a full decode), or None."""
    if not path.is_file():
        return MISSING_IMAGE
    try:
        with open_image(path) as im:
            im.load()  # a full decode: the header alone passes truncated files
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ... for bad files
        return UNREADABLE_IMAGE
    return None


def _duplicates(found: dict[str, list[str]], kind: str, keyed: Iterable[tuple[Hashable, str]]) -> None:
    """Record every repeat of a key after its first occurrence."""
    seen = set()
    for key, name in keyed:
        if key in seen:
            found[kind].append(name)
        seen.add(key)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
