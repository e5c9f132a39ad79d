"""Frames of a video file, a folder of frames, a camera or a network stream, one at a time, with what happened to each.

Frames are read here with OpenCV, one at a time (memory does not grow with the length of the stream), so that what
video decoders do quietly is counted instead: a frame that fails to decode is skipped and counted as unreadable (a
damaged stretch of a file, the frames a truncated file lists but no longer holds, an image of a folder that does
not load), and each frame's decode time is measured. A live source (camera, RTSP/HTTP URL) is read in a thread that
keeps only the newest frame: when the consumer is slower than the camera, stale frames are dropped (and counted),
not queued. A file or folder can be read ahead in a thread (``read_ahead`` frames at most), so that decoding
overlaps the consumer's work instead of adding to it; nothing is dropped there. The one reader of videos in
detkd: ``detkd video`` (:mod:`detkd.video`) and the unlabeled frames of a recipe or of ``detkd pseudo-label``
(:mod:`detkd.data.frames`).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Generator, Iterator
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
    """What a source gave; ``read`` = processed + ``skipped`` + ``dropped`` (+ the frames in hand or read ahead when
    interrupted)."""

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


def open_source(
    source: str | os.PathLike | int, stride: int = 1, live: bool | None = None, read_ahead: int = 0
) -> FrameSource:
    """Open a video file, a folder of frames (sorted by name), a camera index or an RTSP/HTTP URL.

    ``stride``: process every ``stride``-th frame (the others are grabbed without decoding). ``live``: read in a
    thread keeping only the newest frame; by default for cameras and URLs. ``read_ahead``: a file or folder (not
    live) is read in a thread up to this many frames ahead of the consumer (0: read in the consumer's thread)."""
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
        source = FrameSource(str(path), _folder_frames(files, stride, counts), counts, None, len(files), False)
        return _in_thread(source, read_ahead) if read_ahead else source
    if not path.exists():
        raise DetkdError(f"{path}: no such video file or folder (a camera is a number, a stream a URL)")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise DetkdError(
            f"{path}: cannot be opened as a video (not a format OpenCV reads, or damaged: an MP4 cut short loses "
            "the index at its end)"
        )
    return _capture_source(str(path), cap, stride, counts, live=bool(live), read_ahead=read_ahead)


def _capture_source(name: str, cap, stride: int, counts: SourceCounts, live: bool, read_ahead=0) -> FrameSource:
    fps = cap.get(cv2.CAP_PROP_FPS)
    fps = fps if math.isfinite(fps) and 0 < fps < 1000 else None
    listed = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    listed = listed if listed > 0 and not live else None
    frames = _capture_frames(cap, stride, counts, fps, listed, clock=time.perf_counter() if live else None)
    source = FrameSource(name, frames, counts, fps, listed, live)
    if live or read_ahead:  # the reader thread releases the capture when it ends (it may be inside a read)
        return _in_thread(source, depth=1 if live else read_ahead)
    source._close.append(cap.release)
    return source


def _in_thread(source: FrameSource, depth: int) -> FrameSource:
    reader = _ReaderThread(source._frames, source.counts, depth, drop_stale=source.live)
    source._frames = iter(reader)
    source._close.append(reader.stop)
    return source


def _capture_frames(cap, stride, counts, fps, listed, clock) -> Iterator[Frame]:
    """Frames of an OpenCV capture. A failed read is retried (decoders recover at the next key frame) and, when a
    frame follows, counted unreadable; :data:`GIVE_UP_AFTER` failures in a row end the stream. A file's container
    lists its frames: those it lists but that never decoded are unreadable too (a truncated file). The capture is
    released when the frames end or the generator is closed."""
    try:
        yield from _capture_reads(cap, stride, counts, fps, listed, clock)
    finally:
        cap.release()


def _capture_reads(cap, stride, counts, fps, listed, clock) -> Iterator[Frame]:
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


class _ReaderThread:
    """Reads frames in a thread into a buffer of ``depth`` frames. ``drop_stale`` (a live source): a full buffer
    gives up its oldest frame for the new one, counted dropped; otherwise the reader waits for room, so a file's
    frames all come, in order, while the consumer works on the previous ones."""

    def __init__(self, frames: Generator[Frame, None, None], counts: SourceCounts, depth: int, drop_stale: bool):
        self._frames, self._counts, self._depth, self._drop_stale = frames, counts, depth, drop_stale
        self._buffer: deque[Frame] = deque()
        self._ended = self._stopped = False
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, name="detkd-video-reader", daemon=True)

    def _read(self) -> None:
        try:
            for frame in self._frames:
                with self._changed:
                    if not self._drop_stale:
                        self._changed.wait_for(lambda: len(self._buffer) < self._depth or self._stopped)
                    if self._stopped:
                        return
                    if len(self._buffer) >= self._depth:
                        self._buffer.popleft()
                        self._counts.dropped += 1
                    self._buffer.append(frame)
                    self._changed.notify_all()
        except Exception as e:  # handed to the consumer, which raises it where it reads
            self._error = e
        finally:
            self._frames.close()  # here, not in the consumer's thread: a capture is released between reads
            with self._changed:
                self._ended = True
                self._changed.notify_all()

    def __iter__(self) -> Iterator[Frame]:
        self._thread.start()
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._buffer or self._ended)
                frame = self._buffer.popleft() if self._buffer else None
                self._changed.notify_all()
            if frame is None:
                if self._error is not None:
                    raise self._error
                return
            yield frame

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            if self._drop_stale:  # read, never processed
                self._counts.dropped += len(self._buffer)
            self._buffer.clear()
            self._changed.notify_all()
        if self._thread.ident is None:  # never started: nothing reads
            self._frames.close()
        else:  # a reader inside a slow read (a stalled network stream) is left to end, and release, on its own
            self._thread.join(timeout=5)
