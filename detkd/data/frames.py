"""Unlabeled images from a folder, a glob or video files: the frames a teacher labels or distils on.

A source is a folder (its images, recursively), a glob (``footage/*.mp4``, ``shots/**/*.jpg``), an image file or a
video file, or a list of those. Images are decoded once, as the data check decodes them; an unreadable one is
reported by name and skipped. A video is read by :func:`detkd.data.stream.open_source` (frames that do not decode
are counted and named) and one frame in ``every`` is a candidate; a candidate that is a near-duplicate of the last
frame taken is skipped (a parked camera films the same street for minutes: those frames teach nothing new and would
outweigh the rest). Near-duplicate means: the mean absolute
difference of the two frames' 32×32 grayscale thumbnails (area-averaged, so sensor noise averages out) is below
``dedupe`` gray levels (of 255); ``dedupe: 0`` keeps every candidate. Images from folders are the user's choice and are
never skipped as duplicates.

A video's frames are written once as JPEG files into a cache folder (``<video>.frames/`` beside the video, or under
``cache``), one subfolder per video and sampling, with a ``frames.json`` written last: a second run with the same
video (same size and modification time), ``every`` and ``dedupe`` reads that instead of decoding the video again.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from detkd.data.check import image_problem
from detkd.data.stream import open_source
from detkd.data.yolo import IMG_FORMATS
from detkd.errors import DetkdError
from detkd.utils import save_json

VIDEO_FORMATS = frozenset({"asf", "avi", "gif", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "ts", "webm", "wmv"})
DEDUPE_DEFAULT = 2.0  # gray levels (of 255): thumbnails closer than this are the same frame
THUMBNAIL = 32  # side of the grayscale thumbnail frames are compared on
MANIFEST = "frames.json"
_LISTED = 10  # unreadable files named per line of the report


@dataclass
class SourceFrames:
    """What one file or folder of the source gave."""

    source: str  # the folder, image or video, as found
    kind: str  # "images" (a folder's or a glob's image files, or one image) or "video"
    read: int = 0  # images decoded, or video frames decoded
    taken: int = 0  # images or frames kept
    duplicates: int = 0  # video frames skipped as near-duplicates of the frame before
    unreadable: list[str] = field(default_factory=list)  # files that could not be decoded (skipped)
    files: list[str] = field(default_factory=list)  # the kept images (video frames: in the cache folder)

    def format(self) -> str:
        line = f"{self.source}: {self.kind}, {self.read} read, {self.taken} taken"
        if self.kind == "video":
            line += f", {self.duplicates} skipped as near-duplicates"
        if self.unreadable:
            more = f" and {len(self.unreadable) - _LISTED} more" if len(self.unreadable) > _LISTED else ""
            line += f", {len(self.unreadable)} unreadable (skipped): {', '.join(self.unreadable[:_LISTED])}{more}"
        return line

    def summary(self) -> dict:
        """The counts and the unreadable files, without the list of kept files (for reports)."""
        return {k: v for k, v in asdict(self).items() if k != "files"}


@dataclass
class FrameSet:
    """The kept images of a whole source, and what each part of it gave."""

    parts: list[SourceFrames]

    @property
    def files(self) -> list[Path]:
        return [Path(f) for part in self.parts for f in part.files]

    @property
    def unreadable(self) -> list[str]:
        return [f for part in self.parts for f in part.unreadable]

    def format(self) -> str:
        total = f"unlabeled frames: {len(self.files)} taken from {len(self.parts)} source(s)"
        return "\n".join([total, *(f"  {part.format()}" for part in self.parts)])


def source_list(source: str | os.PathLike | list) -> list[str]:
    """The source as a list of entries (a single folder, glob or file may be given without the list)."""
    entries = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not entries:
        raise DetkdError("unlabeled source: empty (give a folder, a glob or video files)")
    return [str(e) for e in entries]


def expand_source(source: str | os.PathLike | list) -> list[tuple[str, list[Path]]]:
    """``(entry, files)`` per source entry: a folder's image and video files (recursively, sorted), a glob's
    matches, or the file itself. An entry that names nothing, or a file of another kind, is an error."""
    out = []
    for entry in source_list(source):
        path = Path(entry).expanduser()
        if path.is_dir():
            files = sorted((p for p in path.rglob("*") if _kind(p)), key=str)
        elif path.is_file():
            if not _kind(path):
                kinds = ", ".join(sorted(IMG_FORMATS | VIDEO_FORMATS))
                raise DetkdError(f"{path}: neither an image nor a video file (known suffixes: {kinds})")
            files = [path]
        elif glob.has_magic(entry):
            files = sorted(Path(p) for p in glob.glob(os.path.expanduser(entry), recursive=True) if _kind(Path(p)))
        else:
            raise DetkdError(f"{entry}: unlabeled source not found (a folder, a glob or a video file)")
        if not files:
            raise DetkdError(f"{entry}: no image or video files in the unlabeled source")
        out.append((entry, files))
    return out


def _kind(path: Path) -> str | None:
    suffix = path.suffix[1:].lower()
    return "images" if suffix in IMG_FORMATS else "video" if suffix in VIDEO_FORMATS and path.is_file() else None


def collect_frames(
    source: str | os.PathLike | list,
    every: int = 1,
    dedupe: float = DEDUPE_DEFAULT,
    cache: str | os.PathLike | None = None,
) -> FrameSet:
    """The usable images of ``source``: images decoded (unreadable ones reported and skipped), videos sampled into
    their cache folders (see the module docstring). Shows a progress bar."""
    if every < 1:
        raise DetkdError(f"unlabeled source: 'every' must be >= 1, got {every}")
    parts = []
    for entry, files in expand_source(source):
        images = [f for f in files if _kind(f) == "images"]
        if images:
            parts.append(_check_images(entry, images))
        for video in (f for f in files if _kind(f) == "video"):
            folder = Path(cache) if cache else video.parent
            parts.append(extract_video(video, folder / f"{video.name}.frames", every, dedupe))
    if not any(part.files for part in parts):
        unread = [f for part in parts for f in part.unreadable]
        raise DetkdError(
            f"{source_list(source)[0]}: no readable frames in the unlabeled source ({len(unread)} unreadable)"
        )
    return FrameSet(parts)


def _check_images(entry: str, images: list[Path]) -> SourceFrames:
    from concurrent.futures import ThreadPoolExecutor

    from detkd.ultralytics_internals import progress_bar

    part = SourceFrames(entry, "images")
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) + 4)) as pool:
        problems = progress_bar(pool.map(image_problem, images), total=len(images), desc=f"checking {entry}")
        for image, problem in zip(images, problems, strict=True):
            if problem:
                part.unreadable.append(str(image))
            else:
                part.read += 1
                part.files.append(str(image))
    part.taken = len(part.files)
    return part


def extract_video(video: Path, cache: Path, every: int = 1, dedupe: float = DEDUPE_DEFAULT) -> SourceFrames:
    """Frames ``0, every, 2·every ...`` of ``video`` as JPEG files in a subfolder of ``cache``, near-duplicates
    skipped (see the module docstring); reused when that subfolder's ``frames.json`` matches. A video that cannot
    be opened, or has no frame, is reported unreadable."""
    import cv2

    stat = video.stat()
    key = json.dumps([str(video.resolve()), stat.st_size, stat.st_mtime_ns, every, dedupe])
    folder = cache.resolve() / f"every{every}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    manifest = folder / MANIFEST
    if manifest.is_file():
        saved = json.loads(manifest.read_text())
        if saved.get("key") == key and all(Path(f).is_file() for f in saved["part"]["files"]):
            return SourceFrames(**saved["part"])
    part = SourceFrames(str(video), "video")
    try:
        stream = open_source(video, stride=every)
    except DetkdError:  # not a video OpenCV opens
        part.unreadable.append(str(video))
        return part
    from detkd.ultralytics_internals import progress_bar

    bar = progress_bar(total=math.ceil(stream.total / every) if stream.total else None, desc=f"frames of {video.name}")
    last = None
    try:
        for frame in stream:
            bar.update(1)
            thumb = cv2.resize(
                cv2.cvtColor(frame.image, cv2.COLOR_BGR2GRAY), (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA
            )
            if last is not None and dedupe > 0 and cv2.absdiff(thumb, last).mean() < dedupe:
                part.duplicates += 1
                continue
            last = thumb
            path = folder / f"{video.stem}_{frame.index:07d}.jpg"
            folder.mkdir(parents=True, exist_ok=True)
            if not cv2.imwrite(str(path), frame.image, [cv2.IMWRITE_JPEG_QUALITY, 95]):
                raise DetkdError(f"{path}: cannot write the frame (is the cache folder writable?)")
            part.files.append(str(path))
    finally:
        bar.close()
        stream.close()
    part.read = stream.counts.read
    if part.read == 0:
        part.unreadable.append(str(video))
    else:  # frames that did not decode, named (the first ones)
        part.unreadable += [f"{video}: frame {index}" for index in stream.counts.examples]
    part.taken = len(part.files)
    if part.files:
        save_json({"key": key, "part": asdict(part)}, manifest)
    return part
