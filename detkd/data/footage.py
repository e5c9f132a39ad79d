"""Synthetic traffic footage: the objects of :mod:`detkd.data.synth` set in motion, with ground truth per frame.

A static camera over one of the synthetic backgrounds. Vehicles drive across the frame along lanes and people walk,
each on a smooth path (constant velocity with a gentle sway); traffic lights and stop signs stand still. Movers
enter at one edge and leave at the other, some are already in view when the footage starts, and the one lower in
the frame (nearer the camera) passes in front: objects occlude each other as in traffic. The objects are drawn by
the same code as the synthetic data set's scenes, so a student trained on ``detkd synth`` data detects them.

Ground truth, for every object whose box is in the frame: its box clipped to the frame and its **visibility**, the
share of its own pixels that are seen (neither outside the frame nor behind a nearer object).

- ``<stem>.gt.txt``: MOTChallenge (MOT17) layout, one line per object and frame:
  ``frame, id, x, y, w, h, consider, class, visibility``, frames and ids from 1; ``consider`` is 1 when the object
  is at least :data:`VISIBLE` visible (what the data set's scenes guarantee for every labelled object), else 0;
  ``class`` is the category id of the synthetic data set.
- ``<stem>.coco.json``: COCO instances of the frames, image id = frame number, ``file_name`` ``<stem>/000001.jpg``
  (the frames extracted, e.g. ``ffmpeg -i <stem>.mp4 -start_number 1 <stem>/%06d.jpg``); the categories of the
  synthetic data set; objects less than :data:`VISIBLE` visible are ``iscrowd`` 1, which COCO evaluation ignores.

The footage is a pure function of ``(seed, frames, imgsz, fps)``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from detkd.data.coco import write_coco
from detkd.data.dataset import Annotation, Category, DetectionDataset, ImageRecord
from detkd.data.synth import CLASSES, SynthConfig, background, object_sprite
from detkd.errors import DetkdError
from detkd.utils import atomic_write, write_text

VISIBLE = 1 - SynthConfig().max_occlusion  # visible share below which an object is not required to be detected
_STANDING = ("traffic_light", "stop_sign")
_MOVERS = tuple(c for c in CLASSES if c not in _STANDING)
_SALT = 7  # keeps footage rngs apart from the data set's (seed, split, index) streams
_CROSSING_S = (2.0, 6.0)  # seconds a mover takes to cross the frame
_MIN_CROSSING = 8  # frames: even in a short clip a mover is seen for a few frames
_IN_VIEW = 4.0  # movers in view on average


@dataclass
class _Track:
    """One object and its path: its top-left corner at frame ``t`` is :meth:`corner`."""

    cls: int
    patch: np.ndarray  # BGR, float32
    alpha: np.ndarray
    start: int  # frame at which it is at (x0, y0); negative: it was moving before the footage began
    x0: float
    y0: float
    vx: float = 0.0  # pixels per frame
    vy: float = 0.0
    sway: float = 0.0  # amplitude (pixels) of a sinusoidal drift across the direction of travel
    period: float = 1.0  # frames
    phase: float = 0.0

    def corner(self, t: int) -> tuple[int, int]:
        dt = t - self.start
        drift = self.sway * math.sin(2 * math.pi * dt / self.period + self.phase)
        return round(self.x0 + self.vx * dt), round(self.y0 + self.vy * dt + drift)


@dataclass(frozen=True)
class FootageObject:
    """Ground truth of one object in one frame."""

    track_id: int
    cls: int
    box: tuple[int, int, int, int]  # x, y, w, h: the object's box clipped to the frame
    visibility: float


def _tracks(seed: int, frames: int, fps: float, imgsz: int) -> list[_Track]:
    rng = np.random.default_rng([seed, _SALT, frames, imgsz])
    cfg = SynthConfig(imgsz=imgsz, min_size=max(8.0, 0.12 * imgsz), max_size_frac=0.4)  # trackable sizes
    tracks = []
    for _ in range(int(rng.integers(0, 3))):  # standing objects, in the upper part of the frame
        cls = CLASSES.index(_STANDING[int(rng.integers(0, len(_STANDING)))])
        patch, alpha = object_sprite(cls, rng, cfg)
        h, w = alpha.shape
        tracks.append(_Track(cls, patch, alpha, 0, rng.uniform(0, imgsz - w), rng.uniform(0, max(1, imgsz * 0.6 - h))))
    longest = max(_MIN_CROSSING, min(_CROSSING_S[1] * fps, 0.8 * frames))
    shortest = max(_MIN_CROSSING, min(_CROSSING_S[0] * fps, 0.8 * frames))
    arrival_rate = _IN_VIEW / ((longest + shortest) / 2)  # movers per frame
    t = -longest + rng.exponential(1 / arrival_rate)  # arrivals from before the start: the road is busy at frame 0
    while t < frames:
        cls = CLASSES.index(_MOVERS[int(rng.integers(0, len(_MOVERS)))])
        patch, alpha = object_sprite(cls, rng, cfg)
        h, w = alpha.shape
        crossing = rng.uniform(shortest, longest)
        if CLASSES[cls] == "person":  # walkers: slower, any slant
            crossing *= 1.5
        rightward = rng.random() < 0.5
        vx = (imgsz + w) / crossing * (1 if rightward else -1)
        vy = rng.uniform(-0.3, 0.3) * abs(vx) if CLASSES[cls] == "person" else 0.0
        y0 = rng.uniform(imgsz * 0.25 - h / 2, imgsz - h)  # lanes below the horizon
        tracks.append(
            _Track(
                cls, patch, alpha, int(t), -w if rightward else imgsz, y0, vx, vy,
                sway=rng.uniform(0, 0.02 * imgsz), period=crossing * rng.uniform(0.5, 1.5), phase=rng.uniform(0, 6.3),
            )
        )  # fmt: skip
        t += rng.exponential(1 / arrival_rate)
    return tracks


def render_footage(seed: int = 0, frames: int = 300, imgsz: int = 160, fps: float = 15.0):
    """Yield ``(frame BGR uint8, [FootageObject, ...])`` for frames 1..``frames``; one frame in memory at a time.

    Track ids count, from 1, the objects that appear in some frame, in order of arrival."""
    tracks = _tracks(seed, frames, fps, imgsz)
    rng = np.random.default_rng([seed, _SALT, frames, imgsz, 1])
    scene = background(imgsz, rng).astype(np.float32) * rng.uniform(0.8, 1.2)
    pixels = [max(1, int((track.alpha > 0.5).sum())) for track in tracks]
    ids: dict[int, int] = {}  # track index -> track id, given at first appearance
    for t in range(frames):
        img, owner = scene.copy(), np.full((imgsz, imgsz), -1, np.int32)
        shown = []  # (track index, clipped box), painted far to near
        placed = sorted(
            ((k, *track.corner(t)) for k, track in enumerate(tracks)),
            key=lambda kxy: kxy[2] + tracks[kxy[0]].alpha.shape[0],  # lower edge: nearer the camera
        )
        for k, x, y in placed:
            alpha, patch = tracks[k].alpha, tracks[k].patch
            h, w = alpha.shape
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, imgsz), min(y + h, imgsz)
            if x1 <= x0 or y1 <= y0:
                continue
            a = alpha[y0 - y : y1 - y, x0 - x : x1 - x, None]
            region = img[y0:y1, x0:x1]
            region[:] = region * (1 - a) + patch[y0 - y : y1 - y, x0 - x : x1 - x] * a
            owner[y0:y1, x0:x1][a[..., 0] > 0.5] = k
            shown.append((k, (x0, y0, x1 - x0, y1 - y0)))
        seen = np.bincount(owner[owner >= 0], minlength=len(tracks))
        objects = []
        for k, box in shown:
            ids.setdefault(k, len(ids) + 1)
            objects.append(FootageObject(ids[k], tracks[k].cls, box, round(float(seen[k]) / pixels[k], 3)))
        img += rng.normal(0, 2.0, img.shape).astype(np.float32)  # sensor noise, new in every frame
        yield np.clip(img, 0, 255).astype(np.uint8), sorted(objects, key=lambda o: o.track_id)


def write_footage(
    video: str | os.PathLike, frames: int = 300, imgsz: int = 160, fps: float = 15.0, seed: int = 0
) -> tuple[Path, Path, Path]:
    """Write the footage as an MP4 (OpenCV's ``mp4v``) and its ground truth beside it (``<stem>.coco.json``,
    ``<stem>.gt.txt``); returns the three paths. Each file is written atomically."""
    video = Path(video)
    if video.suffix.lower() != ".mp4":
        raise DetkdError(f"{video}: footage is written as an MP4: give a path ending in .mp4")
    if frames < 1 or imgsz < 32 or fps <= 0:
        raise DetkdError(f"{video}: need frames >= 1, imgsz >= 32 and fps > 0 (got {frames}, {imgsz}, {fps})")
    truth: list[list[FootageObject]] = []

    def write_video(tmp: Path) -> None:
        named = tmp.with_name(tmp.name + video.suffix)  # VideoWriter picks the container by the file's suffix
        writer = cv2.VideoWriter(str(named), cv2.VideoWriter_fourcc(*"mp4v"), fps, (imgsz, imgsz))
        try:
            if not writer.isOpened():
                raise DetkdError(f"{video}: OpenCV cannot write an mp4v video here")
            for frame, objects in render_footage(seed, frames, imgsz, fps):
                writer.write(frame)
                truth.append(objects)
            writer.release()
            os.replace(named, tmp)
        finally:
            writer.release()
            named.unlink(missing_ok=True)

    atomic_write(video, write_video)
    rows = [
        f"{t},{o.track_id},{o.box[0]},{o.box[1]},{o.box[2]},{o.box[3]},{int(o.visibility >= VISIBLE)},{o.cls},"
        f"{o.visibility}"
        for t, objects in enumerate(truth, start=1)
        for o in objects
    ]
    gt = write_text(video.with_name(f"{video.stem}.gt.txt"), "".join(f"{row}\n" for row in rows))
    images = [
        ImageRecord(t, f"{video.stem}/{t:06d}.jpg", video.parent.resolve() / video.stem / f"{t:06d}.jpg", imgsz, imgsz)
        for t in range(1, frames + 1)
    ]
    labelled = [(t, o) for t, objects in enumerate(truth, start=1) for o in objects]
    annotations = [
        Annotation(i, t, o.cls, [float(v) for v in o.box], iscrowd=int(o.visibility < VISIBLE))
        for i, (t, o) in enumerate(labelled, start=1)
    ]
    dataset = DetectionDataset(images, annotations, [Category(i, name) for i, name in enumerate(CLASSES)], video)
    dataset.info = {"generator": "detkd synth --video", "seed": seed, "imgsz": imgsz, "fps": fps, "video": video.name}
    coco = write_coco(dataset, video.with_name(f"{video.stem}.coco.json"))
    return video, coco, gt
