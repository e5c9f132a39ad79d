"""Export a trained detector with Ultralytics' own exporter, then prove that the export still detects what the
PyTorch model detects (the parity check).

"The exported model gives different results" is the most frequent deployment complaint: preprocessing and letterbox
differ between backends (PyTorch pads to the smallest stride multiple, a fixed-shape export to its square input),
precision drops (fp16, int8), or the file is simply not the model one thinks it is. So both sides are run the way a
user runs them, through Ultralytics' predictor (``YOLO(path).predict`` loads every export kind with the same pre- and
post-processing), on real images, and their final detections are compared:

- each of the PyTorch model's top detections per image (by score) is matched to an export detection of the same
  class with IoU ≥ :data:`MATCH_IOU`; the matched pairs give the box difference (pixels) and the score difference;
- with a data set, both are evaluated on its val split through detkd's COCO evaluation, and the AP difference shown.

An fp32 export fails the check (:attr:`ParityReport.passed` false, ``detkd export`` exits 1) when a top detection has
no match, a box is off by more than :data:`BOX_TOLERANCE_PX` or the AP differs by more than :data:`AP_TOLERANCE`.
fp16 and int8 exports are expected to differ: their AP drop is reported, not judged.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from detkd.errors import DetkdError, first_line
from detkd.utils import save_json

FORMATS = ("onnx", "torchscript", "openvino", "engine")
PRECISIONS = ("fp32", "fp16", "int8")
_QUANTIZE = {"fp32": None, "fp16": 16, "int8": 8}  # Ultralytics' ``quantize`` export argument
_INT8_FORMATS = ("onnx", "openvino", "engine")

AP_TOLERANCE = 0.002  # COCO AP, absolute
BOX_TOLERANCE_PX = 1.0  # largest coordinate difference of a matched box, input-image pixels
MATCH_IOU = 0.9  # a PyTorch detection and an export detection of the same class are "the same" at this IoU
TOP_PER_IMAGE = 10  # the PyTorch detections compared per image, highest scores first
SYNTHETIC_IMAGES = 8  # built-in scenes the check runs on when no data set is given
# Ultralytics' validation settings (the ones AP is measured with), so that the check sees what evaluation sees
_PREDICT = {"conf": 0.001, "iou": 0.7, "max_det": 300}
# An export with NMS inside (--nms) keeps only scores above the exporter's default threshold: both sides are compared
# at it, or every PyTorch detection below it would count as missing
_PREDICT_NMS_INSIDE = {**_PREDICT, "conf": 0.25}


def export_model(
    model: str | os.PathLike,
    format: str = "onnx",
    imgsz: int = 640,
    precision: str = "fp32",
    data: str | os.PathLike | None = None,
    dynamic: bool = False,
    batch: int = 1,
    nms: bool = False,
    out: str | os.PathLike | None = None,
    device: str | None = None,
) -> Path:
    """Export a PyTorch checkpoint with ``YOLO(model).export`` (offline) and return the export's path.

    The export is written where Ultralytics writes it (beside the checkpoint: ``best.onnx``, ``best.torchscript``,
    ``best_openvino_model/``, ``best.engine``) and then moved to ``out`` when given. ``int8`` is calibrated on the
    train split of ``data`` (a YOLO data yaml, which Ultralytics' calibration loader reads).
    """
    from detkd.evaluation import load_yolo_checkpoint
    from detkd.ultralytics_internals import quiet_ultralytics

    model = Path(model)
    _check_request(model, format, precision, data)
    yolo = load_yolo_checkpoint(model)
    args = {"format": format, "imgsz": imgsz, "dynamic": dynamic, "batch": batch, "nms": nms, "device": device}
    if _QUANTIZE[precision]:
        args["quantize"] = _QUANTIZE[precision]
    if precision == "int8":
        # calibrated on the train images, so that the AP the parity check measures on val is on unseen images
        # (Ultralytics' calibration reads the ``split`` argument, val by default)
        args.update(data=str(data), split="train")
    try:
        with quiet_ultralytics(), _quiet_converters(calibrating=format == "openvino" and precision == "int8"):
            exported = Path(yolo.export(**args, verbose=False))
    except Exception as e:  # the exporter's own refusals (ValueError, AssertionError) and converter failures
        raise DetkdError(f"{model}: {format} {precision} export failed: {first_line(e)}") from e
    return _move(exported, Path(out)) if out else exported


@contextlib.contextmanager
def _quiet_converters(calibrating: bool):
    """The converters' chatter off during an export, their warnings and errors kept: NNCF's info lines (one per
    operation it leaves unquantized, dozens), torch's deprecation notice for the ``torch.jit.trace`` that OpenVINO's
    converter calls, and torch's note, when NNCF loads its extension helpers, that a CPU machine has no CUDA."""
    if calibrating:
        import nncf  # noqa: F401  (it sets its logger to INFO when imported: imported first, then turned down)
    levels = {"nncf": logging.WARNING, "torch.utils.cpp_extension": logging.ERROR}
    loggers = {logging.getLogger(name): level for name, level in levels.items()}
    previous = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.setLevel(max(logger.level, level))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace", category=FutureWarning)
            yield
    finally:
        for logger, level in previous.items():
            logger.setLevel(level)


def _check_request(model: Path, format: str, precision: str, data) -> None:
    """Refuse, in one line, what the exporter would fail on deep inside (or quietly ignore)."""
    if model.suffix != ".pt":
        raise DetkdError(f"{model}: export starts from a PyTorch checkpoint (.pt)")
    if format not in FORMATS:
        raise DetkdError(f"unknown export format {format!r}: choose from {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise DetkdError(f"unknown precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    if format == "engine":
        import torch

        if importlib.util.find_spec("tensorrt") is None:
            raise DetkdError("--format engine needs TensorRT and a CUDA GPU: the tensorrt package is not installed")
        if not torch.cuda.is_available():
            raise DetkdError("--format engine needs TensorRT and a CUDA GPU: no CUDA GPU is visible")
    if format == "openvino" and importlib.util.find_spec("openvino") is None:
        raise DetkdError("--format openvino needs the openvino package (pip install 'detkd[openvino]'): not installed")
    if precision == "int8":
        if format not in _INT8_FORMATS:
            raise DetkdError(f"--int8 applies to {', '.join(_INT8_FORMATS)} exports, not {format}")
        if data is None or Path(data).suffix not in {".yaml", ".yml"}:
            raise DetkdError("--int8 is calibrated on real images: give --data as a YOLO data yaml")
        if format == "openvino" and importlib.util.find_spec("nncf") is None:
            raise DetkdError("OpenVINO int8 is calibrated by nncf (pip install 'detkd[openvino]'): it is not installed")


def _move(exported: Path, out: Path) -> Path:
    """Move an export (a file, or OpenVINO's folder) to ``out``, replacing what is there; a file is renamed into
    place from beside it, so ``out`` is never half written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if exported.is_dir():
        if out.exists():
            shutil.rmtree(out)
        shutil.move(exported, out)
        return out
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    shutil.move(exported, tmp)
    os.replace(tmp, out)
    return out


@dataclass
class ParityReport:
    """How closely an export reproduces its PyTorch model; see the module docstring for what is compared."""

    model: str
    export: str
    precision: str
    imgsz: int
    conf: float  # score threshold both sides predicted with
    images: str  # where the images came from
    image_count: int
    compared: int  # PyTorch top detections compared
    matched: int  # of those, with a same-class export detection at IoU ≥ MATCH_IOU
    box_max_px: float | None  # over matched pairs: largest coordinate difference
    box_mean_px: float | None  # mean coordinate difference
    score_max: float | None
    score_mean: float | None
    ap_pytorch: float | None = None
    ap_export: float | None = None

    @property
    def ap_difference(self) -> float | None:
        """Export AP minus PyTorch AP (negative: the export lost accuracy)."""
        return None if self.ap_export is None else self.ap_export - self.ap_pytorch

    @property
    def failures(self) -> list[str]:
        """Why an fp32 export does not reproduce its model; empty when it does."""
        found = []
        if self.matched < self.compared:
            found.append(
                f"{self.compared - self.matched} of {self.compared} top detections have no match in the export "
                f"(same class, IoU >= {MATCH_IOU})"
            )
        if self.box_max_px is not None and self.box_max_px > BOX_TOLERANCE_PX:
            found.append(f"boxes differ by up to {self.box_max_px:.2f} px (> {BOX_TOLERANCE_PX:g} px)")
        if self.ap_difference is not None and abs(self.ap_difference) > AP_TOLERANCE:
            found.append(f"COCO AP differs by {self.ap_difference:+.4f} (> {AP_TOLERANCE})")
        return found

    @property
    def passed(self) -> bool:
        """fp32: no failure. fp16/int8 are reduced precision by choice: their drop is reported, never failed."""
        return self.precision != "fp32" or not self.failures

    def summary(self) -> str:
        """One line: the verdict and its reason."""
        if self.precision != "fp32":
            drop = "n/a (give --data)" if self.ap_export is None else f"{self.ap_pytorch - self.ap_export:+.4f}"
            return f"parity: {self.precision} export, AP drop {drop} (reported, not judged)"
        if self.compared == 0:
            return "parity: PASS (but the PyTorch model detected nothing on these images: nothing was compared)"
        return "parity: PASS" if self.passed else f"parity: FAIL: {'; '.join(self.failures)}"

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "export": self.export,
            "precision": self.precision,
            "imgsz": self.imgsz,
            "conf": self.conf,
            "images": {"source": self.images, "count": self.image_count},
            "top_detections": {"compared": self.compared, "matched": self.matched, "per_image": TOP_PER_IMAGE},
            "boxes_px": {"max_abs_diff": self.box_max_px, "mean_abs_diff": self.box_mean_px},
            "scores": {"max_abs_diff": self.score_max, "mean_abs_diff": self.score_mean},
            "ap": None
            if self.ap_export is None
            else {"pytorch": self.ap_pytorch, "export": self.ap_export, "difference": self.ap_difference},
            "tolerances": {"ap": AP_TOLERANCE, "box_px": BOX_TOLERANCE_PX, "match_iou": MATCH_IOU},
            "passed": self.passed,
            "summary": self.summary(),
        }


def check_parity(
    model: str | os.PathLike,
    exported: str | os.PathLike,
    imgsz: int = 640,
    precision: str = "fp32",
    data: str | os.PathLike | None = None,
    device: str | None = None,
    nms: bool = False,
) -> ParityReport:
    """Compare ``exported`` with the PyTorch checkpoint ``model`` on the val images of ``data`` (with their COCO AP),
    or on built-in synthetic scenes when no data is given; ``nms``: the export has NMS inside."""
    from detkd.evaluation import coco_evaluate, load_yolo_checkpoint, predict_ultralytics
    from detkd.ultralytics_internals import quiet_ultralytics

    reference, candidate = load_yolo_checkpoint(model), load_yolo_checkpoint(exported)
    with tempfile.TemporaryDirectory(prefix="detkd-parity-") as scratch:
        if data is not None:
            from detkd.data import load_data

            dataset, source = load_data(data), f"{data} (val)"
        else:
            from detkd.data.synth import SynthConfig, generate_split

            dataset = generate_split(scratch, "val", SYNTHETIC_IMAGES, cfg=SynthConfig(imgsz=imgsz))
            source = "built-in synthetic scenes"
        paths = [str(image.path) for image in dataset.images]
        settings = _PREDICT_NMS_INSIDE if nms else _PREDICT
        with quiet_ultralytics():
            pairs, compared = [], 0
            for start in range(0, len(paths), 16):
                chunk = paths[start : start + 16]
                ours = reference.predict(chunk, imgsz=imgsz, device=device, verbose=False, **settings)
                theirs = candidate.predict(chunk, imgsz=imgsz, device=device, verbose=False, **settings)
                for a, b in zip(ours, theirs):
                    image_pairs, image_compared = match_top_detections(a.boxes, b.boxes)
                    pairs += image_pairs
                    compared += image_compared
            ap = {}
            if data is not None:
                for name, yolo in (("pytorch", reference), ("export", candidate)):
                    detections = predict_ultralytics(yolo, dataset, imgsz=imgsz, device=device, **settings)
                    ap[name] = coco_evaluate(dataset, detections)["AP"]
    box_diffs = [box for box, _ in pairs]
    score_diffs = [score for _, score in pairs]
    return ParityReport(
        model=str(model),
        export=str(exported),
        precision=precision,
        imgsz=imgsz,
        conf=settings["conf"],
        images=source,
        image_count=len(paths),
        compared=compared,
        matched=len(pairs),
        box_max_px=max((max(d) for d in box_diffs), default=None),
        box_mean_px=sum(map(sum, box_diffs)) / (4 * len(box_diffs)) if box_diffs else None,
        score_max=max(score_diffs, default=None),
        score_mean=sum(score_diffs) / len(score_diffs) if score_diffs else None,
        ap_pytorch=ap.get("pytorch"),
        ap_export=ap.get("export"),
    )


def match_top_detections(reference, candidate) -> tuple[list[tuple[list[float], float]], int]:
    """Match the ``reference`` detections (Ultralytics ``Boxes``) with the :data:`TOP_PER_IMAGE` highest scores,
    greedily in score order, to unused ``candidate`` detections of the same class at IoU ≥ :data:`MATCH_IOU`.

    Returns ``([(|Δx0|, |Δy0|, |Δx1|, |Δy1|), |Δscore|) per matched pair], number compared)``. All candidates are
    searched, not only their top ones, so that a near tie that swaps two ranks is not counted as a mismatch."""
    from torchvision.ops import box_iou

    order = reference.conf.argsort(descending=True)[:TOP_PER_IMAGE]
    ref_boxes, ref_conf, ref_cls = reference.xyxy[order], reference.conf[order], reference.cls[order]
    if len(order) == 0 or len(candidate.conf) == 0:
        return [], len(order)
    iou = box_iou(ref_boxes, candidate.xyxy)
    iou[ref_cls[:, None] != candidate.cls[None, :]] = 0
    pairs = []
    for i in range(len(order)):
        j = int(iou[i].argmax())
        if iou[i, j] >= MATCH_IOU:
            iou[:, j] = 0  # each candidate matches once
            box = (ref_boxes[i] - candidate.xyxy[j]).abs().tolist()
            pairs.append((box, abs(float(ref_conf[i] - candidate.conf[j]))))
    return pairs, len(order)


def parity_path(exported: str | os.PathLike) -> Path:
    """``<export>.parity.json`` beside the export (for OpenVINO's folder, beside the folder)."""
    exported = Path(exported)
    return exported.with_name(exported.name + ".parity.json")


def check_and_record(
    model: str | os.PathLike,
    exported: str | os.PathLike,
    imgsz: int = 640,
    precision: str = "fp32",
    data: str | os.PathLike | None = None,
    device: str | None = None,
    nms: bool = False,
) -> tuple[ParityReport, Path]:
    """:func:`check_parity`, its report written to :func:`parity_path`; returns both."""
    report = check_parity(model, exported, imgsz=imgsz, precision=precision, data=data, device=device, nms=nms)
    return report, save_json(report.to_json(), parity_path(exported))
