"""Frames of a video file, a folder of frames, a camera or a network stream, one at a time, with what happened to each.

Frames are read here with OpenCV, one at a time (memory does not grow with the length of the stream), so that what
video decoders do quietly is counted instead: a frame that fails to decode is skipped and counted as unreadable (a
damaged stretch of a file, the frames a truncated file lists but no longer holds, an image of a folder that does
not load), and each frame's decode time is measured. A live source (camera, RTSP/HTTP URL) is read in a thread that
keeps only the newest frame: when the consumer is slower than the camera, stale frames are dropped (and counted),
not queued. The one reader of videos in detkd: ``detkd video`` (:mod:`detkd.video`) and the unlabeled frames of a
recipe or of ``detkd pseudo-label`` (:mod:`detkd.data.frames`).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from detkd.data.yolo import IMG_FORMATS
from detkd.errors import DetkdError

LIVE_PREFIXES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://")
GIVE_UP_AFTER = 25  # consecutive failed reads that end a stream (the end of a file, a lost camera)
_EXAMPLES = 20  # unreadable frames named in the summary


@dataclass
class Frame:
    index: int  # position in the source, from 0 (frames skipped or dropped leave gaps)
    image: np.ndarray  # BGR
    time: float | None  # seconds: media time (index / fps) of a file; capture time since the start of a live source
    decode_ms: float


@dataclass
class SourceCounts:
    """What a source gave; ``read`` = processed + ``skipped`` + ``dropped`` (+ one frame in hand when interrupted)."""

    read: int = 0  # frames taken from the source
    skipped: int = 0  # by --vid-stride (taken but not decoded)
    dropped: int = 0  # live sources: a newer frame came before this one was processed
    unreadable: int = 0  # failed to decode, or listed by the container but missing
    examples: list = field(default_factory=list)  # the first unreadable frames (index or file name)

    def unreadable_at(self, where) -> None:
        self.unreadable += 1
        if len(self.examples) < _EXAMPLES:
            self.examples.append(where)


class FrameSource:
    """Frames of one source, in order, one at a time; :attr:`counts` says what happened to every frame."""

    def __init__(self, name: str, frames: Iterator[Frame], counts: SourceCounts, fps: float | None, total, live):
        self.name, self.fps, self.total, self.live = name, fps, total, live
        self.counts = counts
        self._frames = frames
        self._close = []

    def __iter__(self) -> Iterator[Frame]:
        return self._frames

    def close(self) -> None:
        for close in self._close:
            close()


def open_source(source: str | os.PathLike | int, stride: int = 1, live: bool | None = None) -> FrameSource:
    """Open a video file, a folder of frames (sorted by name), a camera index or an RTSP/HTTP URL.

    ``stride``: process every ``stride``-th frame (the others are grabbed without decoding). ``live``: read in a
    thread keeping only the newest frame; by default for cameras and URLs."""
    if stride < 1:
        raise DetkdError(f"--vid-stride must be at least 1 (got {stride})")
    spec = str(source)
    counts = SourceCounts()
    # FFmpeg's own log lines (a damaged packet, a missing index) would bury the progress bar and the one-line error:
    # what they report is counted here instead. Read by OpenCV when it first opens a capture; a user's value wins.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    if spec.isdigit() or spec.startswith(LIVE_PREFIXES):
        name = f"camera {spec}" if spec.isdigit() else spec
        cap = cv2.VideoCapture(int(spec) if spec.isdigit() else spec)
        if not cap.isOpened():
            raise DetkdError(f"{name}: cannot be opened (no such device, unreachable, or not a stream OpenCV reads)")
        return _capture_source(name, cap, stride, counts, live=True if live is None else live)
    path = Path(spec)
    if path.is_dir():
        files = sorted((f for f in path.iterdir() if f.suffix[1:].lower() in IMG_FORMATS), key=lambda f: f.name)
        if not files:
            raise DetkdError(f"{path}: no images in the folder ({', '.join(sorted(IMG_FORMATS)[:6])}, ...)")
        frames = _folder_frames(files, stride, counts)
        return FrameSource(str(path), frames, counts, fps=None, total=len(files), live=False)
    if not path.exists():
        raise DetkdError(f"{path}: no such video file or folder (a camera is a number, a stream a URL)")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise DetkdError(
            f"{path}: cannot be opened as a video (not a format OpenCV reads, or damaged: an MP4 cut short loses "
            "the index at its end)"
        )
    return _capture_source(str(path), cap, stride, counts, live=bool(live))


def _capture_source(name: str, cap, stride: int, counts: SourceCounts, live: bool) -> FrameSource:
    fps = cap.get(cv2.CAP_PROP_FPS)
    fps = fps if math.isfinite(fps) and 0 < fps < 1000 else None
    listed = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    listed = listed if listed > 0 and not live else None
    frames = _capture_frames(cap, stride, counts, fps, listed, clock=time.perf_counter() if live else None)
    source = FrameSource(name, frames, counts, fps, listed, live)
    if live:
        newest = _NewestFrame(frames, counts)
        source._frames = iter(newest)
        source._close.append(newest.stop)
    source._close.append(cap.release)
    return source


def _capture_frames(cap, stride, counts, fps, listed, clock) -> Iterator[Frame]:
    """Frames of an OpenCV capture. A failed read is retried (decoders recover at the next key frame) and, when a
    frame follows, counted unreadable; :data:`GIVE_UP_AFTER` failures in a row end the stream. A file's container
    lists its frames: those it lists but that never decoded are unreadable too (a truncated file)."""
    index, failures = -1, 0
    while True:
        index += 1
        keep = index % stride == 0
        start = time.perf_counter()
        ok = cap.grab()
        image = cap.retrieve()[1] if ok and keep else None
        ok = ok and (image is not None or not keep)
        decode_ms = (time.perf_counter() - start) * 1e3
        if not ok:
            failures += 1
            if failures >= GIVE_UP_AFTER or (listed is not None and index + 1 >= listed):
                break
            continue
        for missed in range(index - failures, index):
            counts.unreadable_at(missed)
        failures = 0
        counts.read += 1
        if not keep:
            counts.skipped += 1
            continue
        stamp = start - clock if clock is not None else index / fps if fps else None
        yield Frame(index, image, stamp, decode_ms)
    if listed is not None:  # the container's frames that never came
        for missed in range(counts.read + counts.unreadable, listed):
            counts.unreadable_at(missed)


def _folder_frames(files: list[Path], stride: int, counts: SourceCounts) -> Iterator[Frame]:
    for index, file in enumerate(files):
        if index % stride:
            counts.read += 1
            counts.skipped += 1
            continue
        start = time.perf_counter()
        image = cv2.imread(str(file))
        if image is None:
            counts.unreadable_at(file.name)
            continue
        counts.read += 1
        yield Frame(index, image, None, (time.perf_counter() - start) * 1e3)


class _NewestFrame:
    """Reads frames in a thread and hands over only the newest: a frame replaced before it was taken is dropped."""

    def __init__(self, frames: Iterator[Frame], counts: SourceCounts):
        self._frames, self._counts = frames, counts
        self._slot: Frame | None = None
        self._ended = self._stopped = False
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._read, name="detkd-video-reader", daemon=True)

    def _read(self) -> None:
        try:
            for frame in self._frames:
                with self._ready:
                    if self._stopped:
                        return
                    if self._slot is not None:
                        self._counts.dropped += 1
                    self._slot = frame
                    self._ready.notify()
        finally:
            with self._ready:
                self._ended = True
                self._ready.notify()

    def __iter__(self) -> Iterator[Frame]:
        self._thread.start()
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._slot is not None or self._ended)
                frame, self._slot = self._slot, None
            if frame is None:
                return
            yield frame

    def stop(self) -> None:
        with self._ready:
            self._stopped = True
            if self._slot is not None:  # read, never processed
                self._counts.dropped += 1
                self._slot = None
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=5)
