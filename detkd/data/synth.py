"""Synthetic traffic-camera scenes: a detection set that is generated, not downloaded.

Eight object classes drawn procedurally with random colours, sizes from a few pixels to half the image,
partial occlusion (by other objects and by occluders), distractor shapes that resemble parts of objects
(wheels, windows, octagons of the wrong colour), textured backgrounds, and photometric damage (lighting,
blur, noise, JPEG). Classes differ in shape and layout, not in colour alone, so that telling car from truck
from bus, or a person from a traffic light, takes capacity: a small model trails a large one at the same budget.

Every image is a pure function of ``(seed, split, index)``, so a set is reproducible and generated in parallel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np

from detkd.data.dataset import Annotation, Category, DetectionDataset, ImageRecord

CLASSES = ("car", "truck", "bus", "motorcycle", "bicycle", "person", "traffic_light", "stop_sign")
_SPLIT_SALT = {"train": 0, "val": 1, "test": 2}
_SS = 4  # supersampling factor for drawing objects (anti-aliasing of small ones)


@dataclass(frozen=True)
class SynthConfig:
    """What one generated scene may contain."""

    imgsz: int = 256
    min_objects: int = 3
    max_objects: int = 14
    min_size: float = 5.0  # smallest object's longer side, pixels
    max_size_frac: float = 0.55  # largest object's longer side, fraction of the image
    max_occlusion: float = 0.55  # an object keeps at least 45 % of its pixels visible
    distractors: tuple[int, int] = (3, 12)
    occluders: tuple[int, int] = (0, 3)


def _colour(rng: np.random.Generator, sat: tuple[float, float] = (0.2, 1.0), val: tuple[float, float] = (0.25, 1.0)):
    hsv = np.uint8([[[rng.integers(0, 180), rng.uniform(*sat) * 255, rng.uniform(*val) * 255]]])
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def _dark(rng):
    return tuple(int(v) for v in rng.integers(10, 60, 3))


def _glass(rng):
    base = rng.integers(120, 220)
    return (int(base + rng.integers(0, 35)), int(base), int(base - rng.integers(0, 30)))


def _wheel(img, c, r, rng, thin=False):
    if thin:  # bicycle: a ring with a hub
        cv2.circle(img, c, r, _dark(rng), max(1, r // 6), cv2.LINE_AA)
        cv2.circle(img, c, max(1, r // 6), _dark(rng), -1, cv2.LINE_AA)
    else:
        cv2.circle(img, c, r, _dark(rng), -1, cv2.LINE_AA)
        cv2.circle(img, c, max(1, r // 2), (150, 150, 150), -1, cv2.LINE_AA)


# Each drawer paints one object filling a (h, w) canvas; aspect is w / h of its box.
def _car(img, rng):
    h, w = img.shape[:2]
    body = _colour(rng)
    r = int(h * 0.2)
    cab = np.int32([[w * 0.22, h * 0.45], [w * 0.32, h * 0.05], [w * 0.68, h * 0.05], [w * 0.8, h * 0.45]])
    cv2.fillPoly(img, [cab], body, cv2.LINE_AA)
    win = np.int32([[w * 0.28, h * 0.42], [w * 0.35, h * 0.12], [w * 0.65, h * 0.12], [w * 0.73, h * 0.42]])
    cv2.fillPoly(img, [win], _glass(rng), cv2.LINE_AA)
    cv2.line(img, (w // 2, int(h * 0.1)), (w // 2, int(h * 0.45)), body, max(1, w // 40))
    cv2.rectangle(img, (0, int(h * 0.42)), (w - 1, int(h * 0.8)), body, -1)
    _wheel(img, (int(w * 0.22), h - r - 1), r, rng)
    _wheel(img, (int(w * 0.78), h - r - 1), r, rng)


def _truck(img, rng):
    h, w = img.shape[:2]
    r = int(h * 0.13)
    cargo = _colour(rng, sat=(0.0, 0.6))
    cab_w = int(w * 0.28)
    flip = rng.random() < 0.5
    x_cargo = (0, w - cab_w - 2) if not flip else (cab_w + 2, w - 1)
    x_cab = (w - cab_w, w - 1) if not flip else (0, cab_w)
    cv2.rectangle(img, (x_cargo[0], 0), (x_cargo[1], int(h * 0.82)), cargo, -1)
    cv2.rectangle(img, (x_cab[0], int(h * 0.3)), (x_cab[1], int(h * 0.82)), _colour(rng), -1)
    wx = (x_cab[0] + cab_w // 5, x_cab[1] - cab_w // 5)
    cv2.rectangle(img, (wx[0], int(h * 0.36)), (wx[1], int(h * 0.55)), _glass(rng), -1)
    for fx in (0.15, 0.32, 0.85) if not flip else (0.15, 0.68, 0.85):
        _wheel(img, (int(w * fx), h - r - 1), r, rng)


def _bus(img, rng):
    h, w = img.shape[:2]
    r = int(h * 0.12)
    cv2.rectangle(img, (0, 0), (w - 1, int(h * 0.85)), _colour(rng), -1)
    n = int(rng.integers(4, 8))
    glass = _glass(rng)
    step = w / (n + 0.5)
    for i in range(n):
        x0 = int(step * (i + 0.4))
        cv2.rectangle(img, (x0, int(h * 0.12)), (int(x0 + step * 0.75), int(h * 0.45)), glass, -1)
    cv2.rectangle(img, (0, int(h * 0.58)), (w - 1, int(h * 0.64)), _colour(rng), -1)
    _wheel(img, (int(w * 0.15), h - r - 1), r, rng)
    _wheel(img, (int(w * 0.82), h - r - 1), r, rng)


def _motorcycle(img, rng):
    h, w = img.shape[:2]
    r = int(h * 0.3)
    _wheel(img, (r, h - r - 1), r, rng)
    _wheel(img, (w - r - 1, h - r - 1), r, rng)
    body = _colour(rng)
    tank = np.int32([[w * 0.28, h * 0.55], [w * 0.38, h * 0.2], [w * 0.7, h * 0.25], [w * 0.72, h * 0.6]])
    cv2.fillPoly(img, [tank], body, cv2.LINE_AA)
    cv2.line(img, (int(w * 0.7), int(h * 0.3)), (int(w * 0.82), 0), _dark(rng), max(1, w // 25), cv2.LINE_AA)
    cv2.rectangle(img, (int(w * 0.2), int(h * 0.16)), (int(w * 0.5), int(h * 0.26)), _dark(rng), -1)


def _bicycle(img, rng):
    h, w = img.shape[:2]
    r = int(h * 0.32)
    _wheel(img, (r, h - r - 1), r, rng, thin=True)
    _wheel(img, (w - r - 1, h - r - 1), r, rng, thin=True)
    frame = _colour(rng)
    t = max(1, w // 30)
    rear, front = (r, h - r - 1), (w - r - 1, h - r - 1)
    seat, bar, crank = (int(w * 0.38), int(h * 0.12)), (int(w * 0.68), int(h * 0.08)), (int(w * 0.47), h - r - 1)
    for a, b in ((rear, seat), (seat, crank), (crank, rear), (seat, bar), (bar, crank), (bar, front)):
        cv2.line(img, a, b, frame, t, cv2.LINE_AA)


def _person(img, rng):
    h, w = img.shape[:2]
    skin = tuple(int(v) for v in rng.integers(60, 230) * np.array([0.75, 0.85, 1.0]))
    hr = int(min(w * 0.32, h * 0.1))
    cv2.circle(img, (w // 2, hr + 1), hr, skin, -1, cv2.LINE_AA)
    shirt, legs = _colour(rng), _colour(rng, val=(0.1, 0.7))
    torso = np.int32([[w * 0.15, h * 0.22], [w * 0.85, h * 0.22], [w * 0.75, h * 0.58], [w * 0.25, h * 0.58]])
    cv2.fillPoly(img, [torso], shirt, cv2.LINE_AA)
    lw = max(1, int(w * 0.22))
    stride = rng.uniform(-0.15, 0.15)
    cv2.line(img, (int(w * 0.38), int(h * 0.56)), (int(w * (0.3 + stride)), h - lw // 2 - 1), legs, lw, cv2.LINE_AA)
    cv2.line(img, (int(w * 0.62), int(h * 0.56)), (int(w * (0.7 - stride)), h - lw // 2 - 1), legs, lw, cv2.LINE_AA)
    aw = max(1, int(w * 0.14))
    cv2.line(img, (int(w * 0.18), int(h * 0.25)), (aw, int(h * 0.52)), shirt, aw, cv2.LINE_AA)
    cv2.line(img, (int(w * 0.82), int(h * 0.25)), (w - aw - 1, int(h * 0.52)), shirt, aw, cv2.LINE_AA)


def _traffic_light(img, rng):
    h, w = img.shape[:2]
    cv2.rectangle(img, (0, 0), (w - 1, h - 1), _dark(rng), -1)
    lit = int(rng.integers(0, 3))
    for i, col in enumerate(((40, 40, 230), (40, 200, 240), (60, 220, 60))):
        c = col if i == lit else tuple(v // 4 for v in col)
        cv2.circle(img, (w // 2, int(h * (0.18 + 0.32 * i))), int(w * 0.32), c, -1, cv2.LINE_AA)


def _octagon(img, fill, rim):
    h, w = img.shape[:2]
    ang = np.pi / 8 + np.arange(8) * np.pi / 4
    pts = np.stack(
        [(np.cos(ang) / np.cos(np.pi / 8) * 0.5 + 0.5) * w, (np.sin(ang) / np.cos(np.pi / 8) * 0.5 + 0.5) * h], 1
    )
    pts = np.clip(pts, 0, [w - 1, h - 1])
    cv2.fillPoly(img, [np.int32(pts)], rim, cv2.LINE_AA)
    inner = (pts - [w / 2, h / 2]) * 0.85 + [w / 2, h / 2]
    cv2.fillPoly(img, [np.int32(inner)], fill, cv2.LINE_AA)


def _stop_sign(img, rng):
    red = (int(rng.integers(0, 50)), int(rng.integers(0, 50)), int(rng.integers(150, 240)))
    _octagon(img, red, (235, 235, 235))
    h, w = img.shape[:2]
    cv2.rectangle(img, (int(w * 0.22), int(h * 0.45)), (int(w * 0.78), int(h * 0.55)), (235, 235, 235), -1)


# class name -> (drawer, (min, max) aspect w/h)
_DRAWERS: dict[str, tuple[Callable, tuple[float, float]]] = {
    "car": (_car, (1.6, 2.2)),
    "truck": (_truck, (2.2, 3.0)),
    "bus": (_bus, (2.6, 3.6)),
    "motorcycle": (_motorcycle, (1.3, 1.8)),
    "bicycle": (_bicycle, (1.4, 1.9)),
    "person": (_person, (0.3, 0.45)),
    "traffic_light": (_traffic_light, (0.33, 0.45)),
    "stop_sign": (_stop_sign, (0.9, 1.1)),
}


def _draw_patch(draw: Callable, w: int, h: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Paint at ``_SS``× and downscale: gives objects of a few pixels soft, realistic edges."""
    big_w, big_h = max(8, w * _SS), max(8, h * _SS)
    canvas = np.zeros((big_h, big_w, 3), np.uint8)
    draw(canvas, rng)
    mask = (canvas.max(2) > 0).astype(np.float32)
    canvas = cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_AREA)
    return canvas, mask


def _distractor(img, rng):
    """Things that are not objects but share their parts: wheels, window rows, wrong-colour octagons, poles."""
    h, w = img.shape[:2]
    kind = rng.integers(0, 6)
    if kind == 0:
        _wheel(img, (w // 2, h // 2), min(w, h) // 2 - 1, rng, thin=bool(rng.random() < 0.5))
    elif kind == 1:
        cv2.rectangle(img, (0, 0), (w - 1, h - 1), _colour(rng), -1)
    elif kind == 2:
        _octagon(img, _colour(rng, sat=(0.0, 0.5)), _colour(rng, sat=(0.0, 0.3)))
    elif kind == 3:
        cv2.ellipse(img, (w // 2, h // 2), (w // 2 - 1, h // 2 - 1), 0, 0, 360, _colour(rng), -1, cv2.LINE_AA)
    elif kind == 4:
        n = int(rng.integers(2, 5))
        for i in range(n):
            x0 = int(w * i / n)
            cv2.rectangle(img, (x0, 0), (int(x0 + w / n * 0.7), h - 1), _glass(rng), -1)
    else:
        tri = np.int32([[w / 2, 0], [w - 1, h - 1], [0, h - 1]])
        cv2.fillPoly(img, [tri], _colour(rng), cv2.LINE_AA)


def background(s: int, rng) -> np.ndarray:
    """An ``s``×``s`` empty scene: sky/road gradient, low-frequency blotches, lane stripes and fine texture."""
    top, bottom = (
        np.array(_colour(rng, sat=(0, 0.4), val=(0.3, 0.95)), np.float32),
        np.array(_colour(rng, sat=(0, 0.3), val=(0.15, 0.7)), np.float32),
    )
    t = np.linspace(0, 1, s, dtype=np.float32)[:, None, None]
    img = top * (1 - t) + bottom * t + np.zeros((1, s, 3), np.float32)
    low = cv2.resize(rng.normal(0, 25, (6, 6, 3)).astype(np.float32), (s, s), interpolation=cv2.INTER_CUBIC)
    img += low
    for _ in range(int(rng.integers(0, 4))):  # lane markings
        y = int(rng.uniform(0.4, 1.0) * s)
        x0, x1 = sorted(rng.integers(0, s, 2))
        cv2.line(img, (int(x0), y), (int(x1), y + int(rng.integers(-s // 8, s // 8))), (200, 200, 200), 2)
    img += rng.normal(0, rng.uniform(2, 10), (s, s, 1)).astype(np.float32)  # fine grain, same on all channels
    return np.clip(img, 0, 255).astype(np.uint8)


def _object_size(rng, cfg: SynthConfig) -> float:
    """Longer side in pixels, log-uniform: as many tiny as large objects per octave."""
    return float(math.exp(rng.uniform(math.log(cfg.min_size), math.log(cfg.max_size_frac * cfg.imgsz))))


def object_sprite(cls: int, rng, cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """One object of class ``cls`` as ``(BGR patch, alpha)``, its box exactly the patch: the aspect from the class's
    range, the size as :func:`render_scene` draws it. Shared by scenes and footage, so both show the same objects."""
    draw, (lo, hi) = _DRAWERS[CLASSES[cls]]
    aspect, size = rng.uniform(lo, hi), _object_size(rng, cfg)
    bw, bh = (size, size / aspect) if aspect >= 1 else (size * aspect, size)
    return _draw_patch(draw, max(2, int(round(bw))), max(2, int(round(bh))), rng)


def _place(s: int, bw: int, bh: int, rng) -> tuple[int, int]:
    return int(rng.integers(0, max(1, s - bw))), int(rng.integers(0, max(1, s - bh)))


def render_scene(seed: int, split: str, index: int, cfg: SynthConfig = SynthConfig()):
    """One scene: the BGR image and its boxes ``[(class_id, x, y, w, h), ...]`` in pixels."""
    rng = np.random.default_rng([seed, _SPLIT_SALT.get(split, 9), index])
    s = cfg.imgsz
    img = background(s, rng).astype(np.float32)
    owner = np.full((s, s), -1, np.int32)  # which object each pixel shows (-1: none)
    pixels: list[int] = []  # each object's own pixel count
    boxes: list[tuple[int, int, int, int, int]] = []

    def paste(patch, alpha, x, y, obj: int | None):
        ph, pw = alpha.shape
        region = img[y : y + ph, x : x + pw]
        a = alpha[..., None]
        region[:] = region * (1 - a) + patch * a
        covered = alpha > 0.5
        owner[y : y + ph, x : x + pw][covered] = -1 if obj is None else obj
        return covered

    for _ in range(int(rng.integers(*cfg.distractors))):  # background clutter
        d = _object_size(rng, cfg) * 0.6
        bw, bh = max(3, int(d * rng.uniform(0.4, 1.0))), max(3, int(d * rng.uniform(0.4, 1.0)))
        patch, alpha = _draw_patch(_distractor, bw, bh, rng)
        paste(patch, alpha, *_place(s, bw, bh, rng), None)

    for _ in range(int(rng.integers(cfg.min_objects, cfg.max_objects + 1))):
        cls = int(rng.integers(0, len(CLASSES)))
        patch, alpha = object_sprite(cls, rng, cfg)
        bh, bw = alpha.shape
        for _attempt in range(5):  # find a place that leaves every earlier object visible enough
            x, y = _place(s, bw, bh, rng)
            hit = owner[y : y + bh, x : x + bw][alpha > 0.5]
            visible = np.bincount(owner[owner >= 0], minlength=len(pixels))
            lost = np.bincount(hit[hit >= 0], minlength=len(pixels))
            if all(v - lo_ >= (1 - cfg.max_occlusion) * p for v, lo_, p in zip(visible, lost, pixels)):
                covered = paste(patch, alpha, x, y, len(pixels))
                pixels.append(int(covered.sum()) or 1)
                boxes.append((cls, x, y, bw, bh))
                break

    for _ in range(int(rng.integers(*cfg.occluders))):  # poles and posts in front, within the occlusion limit
        bw, bh = max(2, int(s * rng.uniform(0.01, 0.04))), int(s * rng.uniform(0.3, 0.9))
        x, y = _place(s, bw, bh, rng)
        hit = owner[y : y + bh, x : x + bw]
        visible = np.bincount(owner[owner >= 0], minlength=len(pixels))
        lost = np.bincount(hit[hit >= 0], minlength=len(pixels))
        if all(v - lo_ >= (1 - cfg.max_occlusion) * p for v, lo_, p in zip(visible, lost, pixels)):
            paste(
                np.full((bh, bw, 3), _colour(rng, val=(0.1, 0.6)), np.float32),
                np.ones((bh, bw), np.float32),
                x,
                y,
                None,
            )

    # photometric damage: lighting gradient and gamma, blur, sensor noise
    gain = rng.uniform(0.55, 1.35) + rng.uniform(-0.3, 0.3) * np.linspace(-1, 1, s, dtype=np.float32)[None, :, None]
    img = 255.0 * (np.clip(img * gain, 0, 255) / 255.0) ** rng.uniform(0.7, 1.4)
    if rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 1.2))
    img += rng.normal(0, rng.uniform(1, 8), img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), boxes


def _render_to_file(job):
    seed, split, index, cfg, path, quality = job
    img, boxes = render_scene(seed, split, index, cfg)
    cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return boxes


def generate_split(
    out_dir: str | Path, split: str, n: int, seed: int = 0, cfg: SynthConfig = SynthConfig(), workers: int = 0
) -> DetectionDataset:
    """Render ``n`` scenes into ``out_dir/images/<split>/`` and return them as a data set (ids 1..n)."""
    from detkd.runtime import cpu_threads

    image_dir = Path(out_dir) / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    quality = 90
    jobs = [(seed, split, i, cfg, image_dir / f"{split}_{i:06d}.jpg", quality) for i in range(n)]
    workers = workers or cpu_threads()
    if workers > 1 and n >= 32:
        with Pool(workers) as pool:
            results = pool.map(_render_to_file, jobs, chunksize=16)
    else:
        results = [_render_to_file(j) for j in jobs]

    images, annotations = [], []
    for i, ((*_, path, _q), boxes) in enumerate(zip(jobs, results)):
        images.append(ImageRecord(i + 1, f"images/{split}/{path.name}", path.resolve(), cfg.imgsz, cfg.imgsz))
        for cls, x, y, w, h in boxes:
            annotations.append(Annotation(len(annotations) + 1, i + 1, cls, [float(x), float(y), float(w), float(h)]))
    categories = [Category(i, name) for i, name in enumerate(CLASSES)]
    return DetectionDataset(images, annotations, categories, source=Path(out_dir), split=split)


def generate_synthetic(
    out_dir: str | Path, train: int = 1000, val: int = 200, seed: int = 0, cfg: SynthConfig = SynthConfig()
) -> Path:
    """Write a train/val synthetic set in both layouts: YOLO (``data.yaml``) and COCO (``annotations/``).

    Returns the data.yaml path. The COCO jsons name images relative to ``out_dir``, so
    ``load_coco(out_dir / "annotations/instances_val.json")`` finds them.
    """
    from detkd.data.coco import write_coco
    from detkd.data.yolo import write_yolo

    out_dir = Path(out_dir)
    splits = {
        "train": generate_split(out_dir, "train", train, seed, cfg),
        "val": generate_split(out_dir, "val", val, seed, cfg),
    }
    for split, ds in splits.items():
        ds.info = {"generator": "detkd synth", "seed": seed, "imgsz": cfg.imgsz}
        write_coco(ds, out_dir / "annotations" / f"instances_{split}.json")
    return write_yolo(splits, out_dir)


# Object crops: the same eight classes as a classification set, the "source task" a classifier is pretrained on
# before its backbone is transferred to a detector (an ImageNet stand-in that is generated, not downloaded).
_MIN_CROP_SIDE = 12  # objects smaller than this (longer side, pixels) are mostly blur at any crop size
_CROP_MARGIN = 0.2  # context around the box on each side, as a fraction of its longer side
_PAD_COLOUR = (114, 114, 114)  # Ultralytics' letterbox grey, where a crop runs off the scene


def _square_crop(img: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """A square around the box (so the object's aspect ratio, a class cue, survives), resized to ``size``."""
    x, y, w, h = box
    side = int(round(max(w, h) * (1 + 2 * _CROP_MARGIN)))
    x0, y0 = int(round(x + (w - side) / 2)), int(round(y + (h - side) / 2))
    padded = cv2.copyMakeBorder(img, side, side, side, side, cv2.BORDER_CONSTANT, value=_PAD_COLOUR)
    crop = padded[y0 + side : y0 + 2 * side, x0 + side : x0 + 2 * side]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if side > size else cv2.INTER_LINEAR)


def _object_crops(seed: int, split: str, size: int, cfg: SynthConfig = SynthConfig()):
    """Every large-enough labelled object of scenes 0, 1, 2, ... as ``(class_id, crop)``, endlessly."""
    index = 0
    while True:
        img, boxes = render_scene(seed, split, index, cfg)
        for cls, *box in boxes:
            if max(box[2:]) >= _MIN_CROP_SIDE:
                yield cls, _square_crop(img, tuple(box), size)
        index += 1


def generate_crops(out_dir: str | Path, train: int = 200, val: int = 40, seed: int = 0, imgsz: int = 64) -> Path:
    """Write an Ultralytics classification folder of object crops: ``out_dir/{train,val}/<class>/*.jpg``.

    ``train``/``val`` are crops per class, so every class has a folder in both splits (Ultralytics indexes classes
    by folder, per split) and the set is balanced. Crops come from :func:`render_scene` scenes in order, so a set is
    a pure function of its arguments. Returns ``out_dir``, which ``YOLO("yolov8n-cls.yaml").train(data=out_dir)``
    takes as is.
    """
    out_dir = Path(out_dir)
    for split, per_class in (("train", train), ("val", val)):
        counts = [0] * len(CLASSES)
        for name in CLASSES:
            (out_dir / split / name).mkdir(parents=True, exist_ok=True)
        crops = _object_crops(seed, split, imgsz)
        while min(counts) < per_class:
            cls, crop = next(crops)
            if counts[cls] < per_class:
                path = out_dir / split / CLASSES[cls] / f"{split}_{counts[cls]:05d}.jpg"
                cv2.imwrite(str(path), crop, [cv2.IMWRITE_JPEG_QUALITY, 90])
                counts[cls] += 1
    return out_dir
