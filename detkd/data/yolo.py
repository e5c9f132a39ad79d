"""Ultralytics YOLO data sets: a data.yaml, ``images/<split>/`` and ``labels/<split>/<stem>.txt`` beside them.

YOLO labels have no place for COCO category ids, image ids or crowd boxes, so :func:`write_yolo` keeps them in
the data.yaml under one extra key, which Ultralytics ignores::

    detkd:
      category_ids: [1, 3, 90]   # YOLO class i <-> category id category_ids[i]
      meta: detkd_meta.json      # beside the yaml: per split, per image file the image id, COCO areas, crowd boxes

and :func:`load_yolo` reads them back, so COCO -> YOLO -> COCO keeps everything but annotation ids. A plain
YOLO set (no ``detkd`` key) loads with category id = class index and image ids 1..N in sorted file order.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from detkd.data.dataset import Annotation, Category, DetectionDataset, ImageRecord, read_mapping, require
from detkd.errors import DetkdError
from detkd.utils import write_text

IMG_FORMATS = frozenset(
    {"avif", "bmp", "dng", "heic", "heif", "jp2", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp"}
)
SPLITS = ("train", "val", "test")
META_FILE = "detkd_meta.json"
_EXIF_ORIENTATION = 0x0112


@dataclass
class ImageMeta:
    """What the sidecar remembers about one image file (see the module docstring)."""

    id: int
    areas: list[float | None] = field(default_factory=list)  # COCO areas of the label lines, in line order
    crowd: list[tuple[int, list[float], float | None]] = field(default_factory=list)  # category id, bbox, area


@dataclass
class YoloSpec:
    """A parsed data.yaml: what loading and checking need before any image is opened."""

    source: Path  # the yaml as the user named it, for messages
    root: Path  # data root: the ``path:`` key, else the yaml's folder (resolved)
    names: dict[int, str]
    data: dict  # the whole yaml, for the split entries
    category_ids: list[int] | None = None  # from the ``detkd`` key
    meta: dict[str, dict[str, ImageMeta]] = field(default_factory=dict)  # split -> file (rel. to yaml dir) -> meta

    @property
    def yaml_dir(self) -> Path:
        return self.source.resolve().parent

    def splits(self) -> list[str]:
        """The standard splits the yaml lists."""
        return [s for s in SPLITS if self.data.get(s)]

    def category_id(self, cls: int) -> int | None:
        """The category id of YOLO class ``cls``; None for a class the names do not have."""
        if cls not in self.names:
            return None
        return self.category_ids[cls] if self.category_ids is not None else cls

    def image_files(self, split: str) -> list[Path]:
        """The split's image files, found as Ultralytics finds them (directories recursively, or .txt lists)."""
        value = require(self.data, split, self.source)
        files: list[Path] = []
        for entry in value if isinstance(value, list) else [value]:
            p = self.root / str(entry)
            if not p.exists() and str(entry).startswith("../"):  # Ultralytics' fallback, e.g. Roboflow exports
                p = self.root / str(entry)[3:]
            p = p.resolve()
            if p.is_dir():
                files += p.rglob("*")
            elif p.is_file():
                lines = p.read_text(encoding="utf-8-sig").splitlines()
                files += [Path(os.path.abspath(p.parent / line.strip())) for line in lines if line.strip()]
            else:
                raise DetkdError(f"{self.source}: '{split}' path {p} does not exist")
        return sorted((f for f in files if f.suffix[1:].lower() in IMG_FORMATS), key=str)


def read_data_yaml(yaml_path: str | Path) -> YoloSpec:
    """Parse and validate a data.yaml (and its detkd sidecar) without touching images."""
    source = Path(yaml_path)
    data = read_mapping(source, yaml.safe_load)
    names = _names(require(data, "names", source), source)
    spec = YoloSpec(source, source.resolve().parent, names, data)
    if data.get("path"):
        spec.root = (spec.yaml_dir / str(data["path"])).resolve()
    if data.get("detkd"):
        _read_detkd_key(spec)
    return spec


def label_file(image: Path) -> Path:
    """Ultralytics' rule: the last ``/images/`` becomes ``/labels/``, the suffix ``.txt``."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(sb.join(str(image).rsplit(sa, 1))).with_suffix(".txt")


def read_labels(label: Path) -> list[tuple[int, str]] | None:
    """Non-blank lines of a label file with their 1-based numbers; None when there is no file (a background image)."""
    try:
        text = label.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise DetkdError(f"{label}: cannot read label file ({e})") from None
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def parse_label_line(line: str) -> tuple[int, float, float, float, float]:
    """``cls cx cy w h`` (normalised) from one label line; ValueError says what is wrong with it."""
    fields = line.split()
    if len(fields) != 5:
        raise ValueError(f"expected 5 fields 'cls cx cy w h', found {len(fields)}")
    try:
        cls, cx, cy, w, h = (float(v) for v in fields)
    except ValueError:
        raise ValueError(f"non-number in {line.strip()!r}") from None
    if not cls.is_integer() or cls < 0:
        raise ValueError(f"class {fields[0]!r} is not a class index")
    return int(cls), cx, cy, w, h


def open_image(path: Path) -> Image.Image:
    """PIL's own ``Image.open``, also where Ultralytics replaced it (a checker meets unreadable files on purpose;
    see :func:`~detkd.ultralytics_internals.pil_image_open`). Data tools do not import Ultralytics themselves."""
    if "ultralytics" not in sys.modules:
        return Image.open(path)
    from detkd.ultralytics_internals import pil_image_open

    return pil_image_open(path)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as Ultralytics sees the image: read from the header, EXIF rotation applied."""
    with open_image(path) as im:
        w, h = im.size
        return (h, w) if im.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8) else (w, h)


def load_yolo(yaml_path: str | Path, split: str = "val") -> DetectionDataset:
    """Read one split of a YOLO set; ids and crowd boxes come back from the detkd sidecar when there is one."""
    spec = read_data_yaml(yaml_path)
    split_meta = spec.meta.get(split, {})
    next_id = max((m.id for m in split_meta.values()), default=0) + 1  # for files the sidecar does not know
    images: list[ImageRecord] = []
    annotations: list[Annotation] = []
    for path in spec.image_files(split):
        meta = split_meta.get(relative_path(path, spec.yaml_dir))
        if meta is None:
            meta, next_id = ImageMeta(next_id), next_id + 1
        try:
            width, height = image_size(path)
        except OSError as e:
            raise DetkdError(f"{path}: cannot read image ({e})") from None
        images.append(ImageRecord(meta.id, relative_path(path, spec.root), path, width, height))
        rows = _label_rows(spec, label_file(path))
        areas = meta.areas if len(meta.areas) == len(rows) else [None] * len(rows)  # stale if labels were edited
        for (category_id, cx, cy, w, h), area in zip(rows, areas, strict=True):
            bbox = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
            annotations.append(Annotation(len(annotations) + 1, meta.id, category_id, bbox, area=area))
        for category_id, bbox, area in meta.crowd:
            annotations.append(Annotation(len(annotations) + 1, meta.id, category_id, bbox, iscrowd=1, area=area))
    categories = [Category(spec.category_id(cls), name) for cls, name in spec.names.items()]
    return DetectionDataset(images, annotations, categories, source=spec.source, split=split)


def write_yolo(splits: dict[str, DetectionDataset], out_dir: str | Path) -> Path:
    """Write splits as an Ultralytics set in ``out_dir`` (images hard-linked or copied); returns the data.yaml.

    The yaml has no ``path:`` key, so Ultralytics resolves it relative to its own folder and the set can move.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = _merged_names(splits)
    class_of = {category_id: i for i, category_id in enumerate(names)}
    meta = {split: _write_labels(ds.with_images_in(out, f"images/{split}"), class_of) for split, ds in splits.items()}
    write_text(out / META_FILE, json.dumps({"splits": meta}))
    data = {
        **{split: f"images/{split}" for split in splits},
        "names": {i: name for i, name in enumerate(names.values())},
        "detkd": {"category_ids": list(names), "meta": META_FILE},
    }
    # written last, atomically: a complete data.yaml marks a complete set (the quickstart and benchmark reuse one)
    return write_text(out / "data.yaml", yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def _label_rows(spec: YoloSpec, label: Path) -> list[tuple[int, float, float, float, float]]:
    """A label file's boxes with category ids; DetkdError at the first bad line (check_dataset reports them all)."""
    rows = []
    for n, line in read_labels(label) or []:
        try:
            cls, *box = parse_label_line(line)
        except ValueError as e:
            raise DetkdError(f"{label}:{n}: {e}") from None
        if (category_id := spec.category_id(cls)) is None:
            raise DetkdError(f"{label}:{n}: class {cls} is not in the names of {spec.source}")
        rows.append((category_id, *box))
    return rows


def _write_labels(ds: DetectionDataset, class_of: dict[int, int]) -> dict[str, dict]:
    """Write one label file per image (empty for backgrounds); return the split's sidecar entries."""
    entries = {}
    by_image = ds.annotations_by_image()
    for im in ds.images:
        lines, areas, crowd = [], [], []
        for a in by_image[im.id]:
            if a.category_id not in class_of:
                raise DetkdError(f"{ds.source}: annotation {a.id} has category id {a.category_id}, not in categories")
            if a.iscrowd:
                crowd.append({"category_id": a.category_id, "bbox": a.bbox, "area": a.area})
                continue
            x, y, w, h = a.bbox
            cx, cy = (x + w / 2) / im.width, (y + h / 2) / im.height
            lines.append(f"{class_of[a.category_id]} {cx:.8f} {cy:.8f} {w / im.width:.8f} {h / im.height:.8f}\n")
            areas.append(a.area)
        label = label_file(im.path)
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("".join(lines), encoding="utf-8")
        entries[im.file_name] = {"id": im.id, "areas": areas, **({"crowd": crowd} if crowd else {})}
    return entries


def _merged_names(splits: dict[str, DetectionDataset]) -> dict[int, str]:
    """Category id -> name over all splits, in first-seen order (that order is the YOLO class order)."""
    names: dict[int, str] = {}
    for ds in splits.values():
        for c in ds.categories:
            if names.setdefault(c.id, c.name) != c.name:
                raise DetkdError(f"{ds.source}: category {c.id} is '{c.name}' here, '{names[c.id]}' in another split")
    return names


def _names(value: Any, source: Path) -> dict[int, str]:
    try:
        names = dict(enumerate(value)) if isinstance(value, list) else {int(k): v for k, v in value.items()}
    except (AttributeError, TypeError, ValueError):
        raise DetkdError(f"{source}: 'names' must be a list or a mapping of class index to name") from None
    if not names:
        raise DetkdError(f"{source}: 'names' is empty")
    return {k: str(v) for k, v in names.items()}


def _read_detkd_key(spec: YoloSpec) -> None:
    """Fill ``category_ids`` and ``meta`` from the yaml's ``detkd`` key and its sidecar file."""
    key = spec.data["detkd"]
    try:
        spec.category_ids = [int(i) for i in require(key, "category_ids", spec.source)]
        meta_path = spec.yaml_dir / str(require(key, "meta", spec.source))
    except (AttributeError, TypeError, ValueError):
        raise DetkdError(f"{spec.source}: malformed 'detkd' key (expected category_ids and meta)") from None
    if sorted(spec.names) != list(range(len(spec.category_ids))):
        raise DetkdError(
            f"{spec.source}: detkd.category_ids has {len(spec.category_ids)} ids for {len(spec.names)} names"
        )
    raw = read_mapping(meta_path, json.loads)
    try:
        spec.meta = {
            split: {file: _image_meta(m) for file, m in files.items()} for split, files in raw.get("splits", {}).items()
        }
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise DetkdError(f"{meta_path}: malformed detkd meta ({e!r})") from None


def _image_meta(m: dict) -> ImageMeta:
    crowd = [(int(c["category_id"]), [float(v) for v in c["bbox"]], c.get("area")) for c in m.get("crowd", [])]
    return ImageMeta(int(m["id"]), list(m.get("areas", [])), crowd)


def relative_path(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` in POSIX form, or absolute when it lies elsewhere."""
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)
