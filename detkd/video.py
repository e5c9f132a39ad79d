"""Detection, and tracking, on a video stream: a file, a folder of frames, a camera or a network stream.

Frames are read here with OpenCV, one at a time (memory does not grow with the length of the stream), so that what
video decoders do quietly is counted instead: a frame that fails to decode is skipped and counted as unreadable (a
damaged stretch of a file, the frames a truncated file lists but no longer holds, an image of a folder that does
not load), and each frame's decode time is measured. A live source (camera, RTSP/HTTP URL) is read in a thread that
keeps only the newest frame: when the model is slower than the camera, stale frames are dropped (and counted), not
queued, so the output stays current and memory stays flat.

Each frame goes through Ultralytics' predictor (``YOLO.predict``, or ``YOLO.track`` with its ByteTrack/BoT-SORT
trackers and ``persist=True``), which times its preprocess, inference and postprocess stages; the tracker's update
is timed by two predictor callbacks around it. Outputs are written as frames come:

- an annotated MP4 (OpenCV ``mp4v``: boxes, class, score, track id, drawn by Ultralytics' ``Results.plot``);
- a JSONL file, one line per processed frame (``frame`` index in the source, ``time`` in seconds, ``boxes`` xyxy in
  pixels, ``scores``, ``classes``, ``track_ids`` when tracking), flushed line by line.

A frame's MP4 frame and JSONL line are written together: Ctrl-C (KeyboardInterrupt) is held back while they are
written and acted on after, and the video writer is released in ``finally``, so an interrupted run leaves a playable
MP4 and a JSONL with one complete line per frame in it. These two files are the stream's record so far, written in
place (not atomically, which would lose them on interruption); the summary (frame counts, latency per stage, frames
per second) is printed and saved atomically as ``<output stem>.summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from detkd.data.yolo import IMG_FORMATS
from detkd.errors import DetkdError, first_line
from detkd.runtime import default_threads
from detkd.utils import save_json

LIVE_PREFIXES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://")
GIVE_UP_AFTER = 25  # consecutive failed reads that end a stream (the end of a file, a lost camera)
TRACKERS = ("bytetrack", "botsort")  # Ultralytics' built-in tracker configs (<name>.yaml)
STAGES = ("decode", "preprocess", "inference", "postprocess", "tracking", "draw_write")
_DEFAULT_FPS = 30.0  # the output video's rate when the source does not tell (a folder of frames, some streams)
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


class _HeldInterrupts:
    """Ctrl-C held back inside :meth:`held` and raised at its end, so that a frame's outputs are written together.
    Only in the main thread (where Python delivers signals); elsewhere it does nothing."""

    def __init__(self):
        self._holding = self._pending = False

    def __enter__(self):
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_interrupt)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _on_interrupt(self, signum, frame):
        if self._holding:
            self._pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self):
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
        if self._pending:
            raise KeyboardInterrupt


@dataclass
class VideoSummary:
    source: str
    model: str
    outputs: dict[str, str | None]
    tracking: str | None
    counts: SourceCounts
    processed: int
    latency_ms: dict[str, list[float]]  # per stage, one value per processed frame
    wall_s: float
    threads: int  # of the model's runtime
    first_frame_s: float | None = None  # from the start until the first frame was written: set-up included
    interrupted: bool = False

    @property
    def fps(self) -> float:
        """Processed frames per second of wall time, reading and the first frame's set-up included."""
        return self.processed / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def steady_fps(self) -> float | None:
        """Frames per second after the first frame: what the stream sustains once the model, its runtime session
        and the tracker are set up (on a short clip the set-up, a second or more, would hide it)."""
        if self.first_frame_s is None or self.processed < 2 or self.wall_s <= self.first_frame_s:
            return None
        return (self.processed - 1) / (self.wall_s - self.first_frame_s)

    def stage_table(self) -> dict[str, dict[str, float]]:
        return {
            stage: {
                "p50": float(np.percentile(values, 50)),
                "p95": float(np.percentile(values, 95)),
                "mean": float(np.mean(values)),
            }
            for stage, values in self.latency_ms.items()
            if values
        }

    def to_json(self) -> dict:
        c = self.counts
        return {
            "source": self.source,
            "model": self.model,
            "outputs": self.outputs,
            "tracking": self.tracking,
            "frames": {
                "read": c.read,
                "processed": self.processed,
                "skipped_by_stride": c.skipped,
                "dropped_stale": c.dropped,
                "unreadable": c.unreadable,
            },
            "unreadable_examples": c.examples,
            "latency_ms": self.stage_table(),
            "wall_s": round(self.wall_s, 3),
            "fps": round(self.fps, 2),
            "first_frame_s": None if self.first_frame_s is None else round(self.first_frame_s, 3),
            "steady_fps": None if self.steady_fps is None else round(self.steady_fps, 2),
            "threads": self.threads,
            "interrupted": self.interrupted,
        }

    def format(self) -> str:
        c = self.counts
        lines = [
            f"{'interrupted: ' if self.interrupted else ''}frames: {c.read} read, {self.processed} processed, "
            f"{c.skipped} skipped (--vid-stride), {c.dropped} dropped (stale, live source), {c.unreadable} unreadable"
        ]
        if c.examples:
            more = " ..." if c.unreadable > len(c.examples) else ""
            lines.append(f"unreadable: {', '.join(map(str, c.examples))}{more}")
        table = self.stage_table()
        if table:
            lines.append(f"{'stage':<12}{'p50 ms':>9}{'p95 ms':>9}")
            lines += [f"{stage:<12}{v['p50']:>9.2f}{v['p95']:>9.2f}" for stage, v in table.items()]
        steady = "" if self.steady_fps is None else f"{self.steady_fps:.1f} frames/s after the first frame; "
        first = "" if self.first_frame_s is None else f", the first with set-up {self.first_frame_s:.2f} s"
        lines.append(
            f"throughput: {steady}{self.fps:.1f} frames/s overall ({self.processed} frames in {self.wall_s:.2f} s"
            f"{first}; {self.threads} runtime threads)"
        )
        return "\n".join(lines)


def class_ids(tokens: list[str] | None, names: dict[int, str]) -> list[int] | None:
    """``--classes``: class indices or names of the model (``2``, ``car``, ``traffic light``)."""
    if not tokens:
        return None
    from detkd.utils import class_key

    by_name = {class_key(n): i for i, n in names.items()}
    ids = []
    for token in tokens:
        if token.isdigit() and int(token) in names:
            ids.append(int(token))
        elif class_key(token) in by_name:
            ids.append(by_name[class_key(token)])
        else:
            raise DetkdError(f"--classes {token}: not a class of the model ({', '.join(names.values())})")
    return ids


def summary_path(out: str | os.PathLike | None, jsonl: str | os.PathLike | None) -> Path:
    """``<stem>.summary.json`` beside the MP4 (else the JSONL)."""
    first = Path(out or jsonl)
    return first.with_name(f"{first.stem}.summary.json")


def run_video(
    source,
    model: str | os.PathLike,
    out: str | os.PathLike | None = None,
    jsonl: str | os.PathLike | None = None,
    track: str | None = None,
    imgsz: int = 640,
    conf: float | None = None,
    classes: list[str] | None = None,
    vid_stride: int = 1,
    device: str | None = None,
    live: bool | None = None,
    threads: int | None = None,
) -> VideoSummary:
    """Detect (``track``: and track, with ``"bytetrack"`` or ``"botsort"``) on every ``vid_stride``-th frame of
    ``source``; write the annotated MP4 ``out`` and the JSONL ``jsonl`` (at least one) as frames come; return the
    summary, also saved as :func:`summary_path`. ``conf`` None: Ultralytics' default (0.25; 0.1 when tracking, so
    that the tracker sees low-score detections). ``threads``: the model runtime's threads (None: every core, or
    ``OMP_NUM_THREADS``), in one pool (:func:`detkd.ultralytics_internals.runtime_threads`). Ctrl-C ends the stream
    with its outputs complete."""
    from detkd.adapters.torchvision import is_torchvision_teacher
    from detkd.evaluation import load_yolo_checkpoint
    from detkd.ultralytics_internals import progress_bar, quiet_ultralytics, runtime_threads

    if out is None and jsonl is None:
        raise DetkdError("give --out (annotated MP4) and/or --jsonl (detections per frame)")
    if threads is not None and threads < 1:
        raise DetkdError(f"--threads must be at least 1 (got {threads})")
    if track is not None and track not in TRACKERS:
        raise DetkdError(f"unknown tracker {track!r}: choose from {', '.join(TRACKERS)}")
    if Path(model).suffix == ".pt" and Path(model).is_file() and is_torchvision_teacher(model):
        raise DetkdError(f"{model}: a torchvision teacher; detkd video runs Ultralytics models and their exports")
    with quiet_ultralytics():  # an export's class names are read by loading it: its backend's set-up lines
        yolo = load_yolo_checkpoint(model)
        settings = {"imgsz": imgsz, "classes": class_ids(classes, yolo.names), "device": device, "verbose": False}
    if conf is not None:
        settings["conf"] = conf
    if track:
        settings.update(persist=True, tracker=f"{track}.yaml")
    call = yolo.track if track else yolo.predict
    # The tracker's update runs between these two predictor events (Ultralytics runs callbacks in the order added,
    # and YOLO.track adds its tracker's at its first call, after these)
    marks: dict[str, float] = {}
    yolo.add_callback("on_predict_postprocess_end", lambda predictor: marks.__setitem__("tracker", time.perf_counter()))
    yolo.add_callback("on_predict_batch_end", lambda predictor: marks.__setitem__("tracked", time.perf_counter()))

    stream = open_source(source, stride=vid_stride, live=live)
    latency: dict[str, list[float]] = {stage: [] for stage in STAGES if track or stage != "tracking"}
    writer, lines, processed, interrupted, first_frame_s = None, None, 0, False, None
    expected = math.ceil(stream.total / vid_stride) if stream.total else None
    bar = progress_bar(total=expected, desc=Path(stream.name).name or stream.name, unit="frame")
    start = time.perf_counter()
    try:
        with _HeldInterrupts() as interrupts, quiet_ultralytics(), runtime_threads(yolo, model, threads):
            if jsonl is not None:
                Path(jsonl).parent.mkdir(parents=True, exist_ok=True)
                lines = open(jsonl, "w", encoding="utf-8")  # noqa: SIM115 (closed in finally, also on Ctrl-C)
            for frame in stream:
                try:
                    (result,) = call(frame.image, **settings)
                except Exception as e:  # a model that does not run on these frames (input size, device, format)
                    raise DetkdError(f"{model}: inference failed on frame {frame.index}: {first_line(e)}") from e
                draw_start = time.perf_counter()
                annotated = result.plot() if out is not None else None
                if out is not None and writer is None:
                    writer = _open_writer(out, annotated.shape, (stream.fps or _DEFAULT_FPS) / vid_stride)
                record = _record(frame, result, tracked=track is not None)
                with interrupts.held():
                    if writer is not None:
                        height, width = writer.size
                        if annotated.shape[:2] != (height, width):  # VideoWriter drops frames of another size
                            annotated = cv2.resize(annotated, (width, height))
                        writer.video.write(annotated)
                    if lines is not None:
                        lines.write(json.dumps(record) + "\n")
                        lines.flush()
                    processed += 1
                done = time.perf_counter()
                if first_frame_s is None:
                    first_frame_s = done - start
                latency["decode"].append(frame.decode_ms)
                for stage in ("preprocess", "inference", "postprocess"):
                    latency[stage].append(result.speed[stage])
                if track:
                    latency["tracking"].append((marks["tracked"] - marks["tracker"]) * 1e3)
                latency["draw_write"].append((done - draw_start) * 1e3)
                bar.update(1)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        stream.close()
        if writer is not None:
            writer.video.release()
        if lines is not None:
            lines.close()
    summary = VideoSummary(
        source=stream.name,
        model=str(model),
        outputs={"video": None if out is None else str(out), "jsonl": None if jsonl is None else str(jsonl)},
        tracking=track,
        counts=stream.counts,
        processed=processed,
        latency_ms=latency,
        wall_s=time.perf_counter() - start,
        threads=threads or default_threads(),
        first_frame_s=first_frame_s,
        interrupted=interrupted,
    )
    save_json(summary.to_json(), summary_path(out, jsonl))
    return summary


@dataclass
class _Writer:
    video: cv2.VideoWriter
    size: tuple[int, int]  # height, width


def _open_writer(out, shape, fps: float) -> _Writer:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    height, width = shape[:2]
    video = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not video.isOpened():
        raise DetkdError(f"{out}: OpenCV cannot write an mp4v video there (give a path ending in .mp4)")
    return _Writer(video, (height, width))


def _record(frame: Frame, result, tracked: bool) -> dict:
    boxes = result.boxes
    record = {
        "frame": frame.index,
        "time": None if frame.time is None else round(frame.time, 4),
        "boxes": [[round(v, 2) for v in box] for box in boxes.xyxy.tolist()],
        "scores": [round(v, 4) for v in boxes.conf.tolist()],
        "classes": [int(v) for v in boxes.cls.tolist()],
    }
    if tracked:  # a frame where the tracker confirmed nothing keeps its detections, without ids
        record["track_ids"] = [int(v) for v in boxes.id.tolist()] if boxes.id is not None else [None] * len(boxes)
    return record
