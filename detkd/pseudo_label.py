"""``detkd pseudo-label``: a teacher labels unlabeled footage, and the result is a YOLO data set a person can inspect,
fix and train on.

The frames come from :mod:`detkd.data.frames` (folders, globs, videos sampled every N frames with near-duplicates
skipped; unreadable files named and skipped). The teacher is any checkpoint detkd can load as a teacher (an
Ultralytics YOLO or a detkd torchvision teacher), run as ``detkd eval`` runs it
(:func:`~detkd.evaluation.checkpoint_detections`); its detections scoring at least ``conf`` become the labels.

Written to ``out``::

    images/000001_<name>.jpg ...    every frame taken (copied; video frames decoded once)
    labels/000001_<name>.txt ...    YOLO lines ``class cx cy w h``; an empty file: the teacher found nothing there
    data.yaml                       train and val: images/, names: the teacher's classes (in its order)
    pseudo_labels.json              the report: frames per source, boxes per class, score histograms per class,
                                    where each image came from
    scores.png                      the score histograms, one curve per class

Boxes are clipped to the image; a box with no area left is dropped and counted in the report.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from detkd.data.frames import DEDUPE_DEFAULT, FrameSet, collect_frames
from detkd.errors import DetkdError
from detkd.utils import atomic_write, save_json, write_text

BINS = 10  # score histogram: [0, 0.1), [0.1, 0.2) ... [0.9, 1.0]
REPORT = "pseudo_labels.json"
PLOT = "scores.png"


@dataclass
class PseudoLabelReport:
    out: Path
    teacher: str
    conf: float
    frames: FrameSet
    names: list[str]  # the data set's classes (index = YOLO class)
    boxes: dict[str, int] = field(default_factory=dict)  # per class
    histograms: dict[str, list[int]] = field(default_factory=dict)  # per class, BINS counts of scores
    empty_images: int = 0  # images where the teacher found nothing at ``conf``
    dropped: int = 0  # boxes with no area left inside the image

    def format(self) -> str:
        images = len(self.frames.files)
        lines = [
            f"{self.out / 'data.yaml'}: {images} images labeled by {self.teacher} at conf {self.conf:g}, "
            f"{sum(self.boxes.values())} boxes, {self.empty_images} images without any",
            self.frames.format(),
            "boxes per class, and their scores in 10 bins [0, 0.1) ... [0.9, 1]:",
        ]
        width = max(len(n) for n in self.names)
        lines += [
            f"  {n:<{width}} {self.boxes[n]:>7}  {' '.join(f'{c:>5}' for c in self.histograms[n])}" for n in self.names
        ]
        if self.dropped:
            lines.append(f"  {self.dropped} boxes dropped: no area left inside the image")
        lines.append(f"report: {self.out / REPORT}, plot: {self.out / PLOT}")
        return "\n".join(lines)

    def to_json(self, origins: list[dict]) -> dict:
        return {
            "teacher": self.teacher,
            "conf": self.conf,
            "images": len(self.frames.files),
            "empty_images": self.empty_images,
            "dropped_boxes": self.dropped,
            "sources": [part.summary() for part in self.frames.parts],
            "boxes": self.boxes,
            "score_bins": [round(i / BINS, 2) for i in range(BINS + 1)],
            "score_histograms": self.histograms,
            "origins": origins,
        }


def pseudo_label(
    teacher: str | os.PathLike,
    source: str | os.PathLike | list,
    out: str | os.PathLike,
    conf: float = 0.25,
    every: int = 1,
    imgsz: int = 640,
    dedupe: float = DEDUPE_DEFAULT,
    batch: int = 16,
    device: str | None = None,
) -> PseudoLabelReport:
    """Label the frames of ``source`` with ``teacher``'s detections scoring at least ``conf``, into the YOLO data
    set ``out`` (a new or empty folder); returns the report (also written, see the module docstring)."""
    from detkd.adapters import teacher_family
    from detkd.data.yolo import image_size
    from detkd.evaluation import checkpoint_detections
    from detkd.ultralytics_internals import progress_bar

    if not 0 < conf <= 1:
        raise DetkdError(f"--conf must be in (0, 1], got {conf}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DetkdError(f"{out}: not empty (pseudo-labels go into a new or empty folder)")
    teacher_family(teacher)  # a missing file or an unknown kind fails before any frame is decoded
    cache = out / ".frames"  # videos are decoded here once, then their frames join images/
    frames = collect_frames(source, every, dedupe, cache)
    origins, images = [], []
    for part in frames.parts:
        for file in map(Path, part.files):
            image = out / "images" / f"{len(images) + 1:06d}_{file.name}"
            image.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, image)
            images.append(image)
            origins.append({"image": str(image.relative_to(out)), "source": part.source, "file": str(file)})
    shutil.rmtree(cache, ignore_errors=True)

    names, found = checkpoint_detections(
        teacher, [str(p) for p in images], imgsz=imgsz, batch=batch, device=device, conf=conf
    )
    classes = sorted(names)  # teacher class index -> YOLO class = its rank (torchvision teachers' start at 1)
    yolo_class = {c: i for i, c in enumerate(classes)}
    report = PseudoLabelReport(out, str(teacher), conf, frames, [names[c] for c in classes])
    report.boxes = dict.fromkeys(report.names, 0)
    report.histograms = {n: [0] * BINS for n in report.names}
    for image, d in zip(
        images, progress_bar(found, total=len(images), desc=f"labeling with {Path(teacher).name}"), strict=True
    ):
        w, h = image_size(image)
        lines = []
        for (x0, y0, x1, y1), score, cls in zip(d.xyxy.tolist(), d.scores.tolist(), d.classes.int().tolist()):
            x0, x1 = min(max(x0, 0.0), w), min(max(x1, 0.0), w)
            y0, y1 = min(max(y0, 0.0), h), min(max(y1, 0.0), h)
            if x1 <= x0 or y1 <= y0:
                report.dropped += 1
                continue
            cx, cy, bw, bh = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h
            lines.append(f"{yolo_class[cls]} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}\n")
            name = names[cls]
            report.boxes[name] += 1
            report.histograms[name][min(int(score * BINS), BINS - 1)] += 1
        report.empty_images += not lines
        write_text(out / "labels" / image.with_suffix(".txt").name, "".join(lines))
    names_yaml = "".join(f"  {i}: {_yaml_text(n)}\n" for i, n in enumerate(report.names))
    write_text(
        out / "data.yaml",
        f"# pseudo-labels by {teacher} at conf {conf:g}\npath: .\ntrain: images\nval: images\nnames:\n{names_yaml}",
    )
    save_json(report.to_json(origins), out / REPORT)
    _plot(report, out / PLOT)
    return report


def _yaml_text(text: str) -> str:
    import json

    return json.dumps(text)  # a JSON string is a YAML string, whatever it holds


def _plot(report: PseudoLabelReport, path: Path) -> None:
    """One line per class with boxes: how many of its boxes fall in each score bin."""
    from matplotlib.figure import Figure  # no pyplot: no backend or global state touched

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    centres = [(i + 0.5) / BINS for i in range(BINS)]
    for name in report.names:
        if report.boxes[name]:
            ax.plot(centres, report.histograms[name], marker="o", label=f"{name} ({report.boxes[name]})")
    ax.axvline(report.conf, color="grey", linestyle="--", label=f"conf {report.conf:g}")
    ax.set(
        xlabel="teacher score", ylabel="boxes", xlim=(0, 1), title=f"pseudo-label scores ({Path(report.teacher).name})"
    )
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
