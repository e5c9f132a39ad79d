"""Detection, and tracking, on a video stream: a file, a folder of frames, a camera or a network stream.

A pipeline of three threads, so that a frame's decoding and writing overlap the model's work on its neighbours
instead of adding to it (the stream runs at the rate of its slowest stage, not of their sum):

1. reading: :func:`detkd.data.stream.open_source` decodes frames ahead of the model (a few at most; undecodable
   frames counted and skipped); a live source keeps only its newest frame, dropping stale ones instead of queueing
   them, so the output stays current and memory stays flat;
2. the model, in the calling thread: Ultralytics' predictor (``YOLO.predict``, or ``YOLO.track`` with its
   ByteTrack/BoT-SORT trackers and ``persist=True``), which times its preprocess, inference and postprocess stages;
   the tracker's update is timed by two predictor callbacks around it. Tracking stays here: its state is the
   predictor's, and each frame's update needs the previous one's;
3. writing (:class:`_Outputs`): an annotated MP4 (OpenCV ``mp4v``: boxes, class, score, track id, drawn by
   Ultralytics' ``Results.plot``) and a JSONL file, one line per processed frame (``frame`` index in the source,
   ``time`` in seconds, ``boxes`` xyxy in pixels, ``scores``, ``classes``, ``track_ids`` when tracking), flushed
   line by line.

The writing thread owns both files and writes a frame's MP4 frame and JSONL line together; Ctrl-C reaches only the
main thread (Python delivers signals there), which stops taking frames and lets the writer finish the frames already
through the model, then close the files: an interrupted run leaves a playable MP4 and a JSONL with one complete line
per frame in it. These two files are the stream's record so far, written in place (not atomically, which would lose
them on interruption); the summary (frame counts, latency per stage, frames per second) is printed and saved
atomically as ``<output stem>.summary.json``.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from detkd.data.stream import Frame, SourceCounts, open_source
from detkd.errors import DetkdError, first_line
from detkd.runtime import default_threads
from detkd.utils import save_json

TRACKERS = ("bytetrack", "botsort")  # Ultralytics' built-in tracker configs (<name>.yaml)
# each stage and the thread it runs in: the model thread's stages add up to a frame, the others overlap them
STAGES = {
    "decode": "reader",
    "preprocess": "model",
    "inference": "model",
    "postprocess": "model",
    "tracking": "model",
    "draw_write": "writer",
}
_DEFAULT_FPS = 30.0  # the output video's rate when the source does not tell (a folder of frames, some streams)
_AHEAD = 4  # frames decoded ahead of the model, and frames through the model waiting to be written, at most


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
            lines.append(f"{'stage':<12}{'thread':<8}{'p50 ms':>9}{'p95 ms':>9}")
            lines += [f"{stage:<12}{STAGES[stage]:<8}{v['p50']:>9.2f}{v['p95']:>9.2f}" for stage, v in table.items()]
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

    stream = open_source(source, stride=vid_stride, live=live, read_ahead=_AHEAD)
    latency: dict[str, list[float]] = {stage: [] for stage in STAGES if track or stage != "tracking"}
    expected = math.ceil(stream.total / vid_stride) if stream.total else None
    bar = progress_bar(total=expected, desc=Path(stream.name).name or stream.name, unit="frame")
    start, first_frame_s, processed, interrupted = time.perf_counter(), None, 0, False

    def written(stage_ms: dict[str, float]) -> None:  # in the writing thread, once a frame's outputs are out
        nonlocal first_frame_s, processed
        processed += 1
        if first_frame_s is None:
            first_frame_s = time.perf_counter() - start
        for stage, ms in stage_ms.items():
            latency[stage].append(ms)
        bar.update(1)

    try:
        outputs = _Outputs(out, jsonl, (stream.fps or _DEFAULT_FPS) / vid_stride, track is not None, written)
        try:
            with quiet_ultralytics(), runtime_threads(yolo, model, threads):
                for frame in stream:
                    try:
                        (result,) = call(frame.image, **settings)
                    except Exception as e:  # a model that does not run on these frames (input size, device, format)
                        raise DetkdError(f"{model}: inference failed on frame {frame.index}: {first_line(e)}") from e
                    stage_ms = {"decode": frame.decode_ms}
                    stage_ms.update(
                        (stage, result.speed[stage]) for stage in ("preprocess", "inference", "postprocess")
                    )
                    if track:
                        stage_ms["tracking"] = (marks["tracked"] - marks["tracker"]) * 1e3
                    outputs.put(frame, result, stage_ms)
        finally:
            outputs.close()  # the frames already through the model are written before the files close
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        stream.close()
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


class _Outputs:
    """The annotated MP4 (``out``) and the JSONL (``jsonl``), either may be None, written in a thread of their own.

    At most :data:`_AHEAD` frames wait (memory stays bounded: a slow disk slows the stream instead of filling
    memory). ``written`` is called in the thread with a frame's stage times once its outputs are out. An error in the
    thread (a full disk, a path OpenCV cannot write) is raised in the caller's thread at its next :meth:`put` or at
    :meth:`close`."""

    def __init__(self, out, jsonl, fps: float, tracked: bool, written: Callable[[dict[str, float]], None]):
        self._out, self._fps, self._tracked, self._written = out, fps, tracked, written
        self._video: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None  # height, width of the MP4
        self._lines = None
        if jsonl is not None:
            Path(jsonl).parent.mkdir(parents=True, exist_ok=True)
            self._lines = open(jsonl, "w", encoding="utf-8")  # noqa: SIM115 (closed by the thread, also on Ctrl-C)
        self._queue: queue.Queue = queue.Queue(maxsize=_AHEAD)
        self._closing = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="detkd-video-writer")  # not a daemon: files close
        self._thread.start()

    def put(self, frame: Frame, result, stage_ms: dict[str, float]) -> None:
        while True:
            self._raise_error()
            try:
                return self._queue.put((frame, result, stage_ms), timeout=0.1)
            except queue.Full:
                continue

    def close(self) -> None:
        """Write what is queued (a few frames: a Ctrl-C meanwhile is held until they are out, so that the files are
        complete), close the files, and raise the thread's error if it had one."""
        self._closing, interrupted = True, False
        while True:
            try:
                self._thread.join()
                break
            except KeyboardInterrupt:
                interrupted = True
        self._raise_error()
        if interrupted:
            raise KeyboardInterrupt

    def _raise_error(self) -> None:
        if self._error is not None:
            if isinstance(self._error, DetkdError):
                raise self._error
            raise DetkdError(f"writing {self._out or self._lines.name}: {first_line(self._error)}") from self._error

    def _run(self) -> None:
        try:
            while True:
                try:
                    item = self._queue.get(timeout=0.05)
                except queue.Empty:  # done once closed and drained (closing is set after the last put), or orphaned
                    if (self._closing or not threading.main_thread().is_alive()) and self._queue.empty():
                        return
                    continue
                self._write(*item)
        except Exception as e:
            self._error = e
        finally:
            if self._video is not None:
                self._video.release()
            if self._lines is not None:
                self._lines.close()

    def _write(self, frame: Frame, result, stage_ms: dict[str, float]) -> None:
        start = time.perf_counter()
        record = _record(frame, result, self._tracked) if self._lines is not None else None  # fails before a write
        if self._out is not None:
            annotated = result.plot()
            if self._video is None:
                self._open_video(annotated.shape)
            height, width = self._size
            if annotated.shape[:2] != (height, width):  # VideoWriter drops frames of another size
                annotated = cv2.resize(annotated, (width, height))
            self._video.write(annotated)
        if self._lines is not None:
            self._lines.write(json.dumps(record) + "\n")
            self._lines.flush()
        self._written({**stage_ms, "draw_write": (time.perf_counter() - start) * 1e3})

    def _open_video(self, shape) -> None:
        out = Path(self._out)
        out.parent.mkdir(parents=True, exist_ok=True)
        height, width = shape[:2]
        level = cv2.utils.logging.getLogLevel()  # OpenCV's own warning on failure would precede the line below
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        try:
            self._video = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), self._fps, (width, height))
        finally:
            cv2.utils.logging.setLogLevel(level)
        if not self._video.isOpened():
            raise DetkdError(f"{out}: OpenCV cannot write an mp4v video there (give a path ending in .mp4)")
        self._size = (height, width)


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
