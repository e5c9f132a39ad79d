"""COCO evaluation for every kind of model: the metric comes from pycocotools, detections from anywhere.

:func:`coco_evaluate` takes detections in COCO's result format (``image_id, category_id, bbox xywh, score``),
so an Ultralytics model (:func:`ultralytics_detections`), a torchvision teacher (:func:`torchvision_detections`)
or an ONNX session only need to produce that list; :func:`checkpoint_detections` picks the way for a checkpoint of
any family detkd knows (``detkd pseudo-label`` labels images with it). The twelve numbers are exactly
``COCOeval.stats``.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

from detkd.data.dataset import DetectionDataset
from detkd.errors import DetkdError
from detkd.utils import class_key, save_json


class Detections(NamedTuple):
    """One image's detections: boxes xyxy in the image's pixels (N, 4), scores (N,), the model's class indices (N,)."""

    xyxy: object  # torch.Tensor (torch is imported where detections are made)
    scores: object
    classes: object

    def above(self, conf: float) -> Detections:
        keep = self.scores >= conf
        return Detections(self.xyxy[keep], self.scores[keep], self.classes[keep])


COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
_METRIC_HELP = {
    "AP": "AP @[IoU=0.50:0.95 | area=all | maxDets=100]",
    "AP50": "AP @[IoU=0.50 | area=all | maxDets=100]",
    "AP75": "AP @[IoU=0.75 | area=all | maxDets=100]",
    "APs": "AP @[IoU=0.50:0.95 | area=small | maxDets=100]",
    "APm": "AP @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "APl": "AP @[IoU=0.50:0.95 | area=large | maxDets=100]",
    "AR1": "AR @[IoU=0.50:0.95 | area=all | maxDets=1]",
    "AR10": "AR @[IoU=0.50:0.95 | area=all | maxDets=10]",
    "AR100": "AR @[IoU=0.50:0.95 | area=all | maxDets=100]",
    "ARs": "AR @[IoU=0.50:0.95 | area=small | maxDets=100]",
    "ARm": "AR @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "ARl": "AR @[IoU=0.50:0.95 | area=large | maxDets=100]",
}


def coco_evaluate(ground_truth: DetectionDataset | dict, detections: list[dict]) -> dict[str, float]:
    """The 12 COCO numbers of ``detections`` against ``ground_truth`` (-1 where a bucket has no objects)."""
    return {k: float(v) for k, v in zip(COCO_METRICS, _cocoeval(ground_truth, detections).stats)}


def ap_per_class(ground_truth: DetectionDataset | dict, detections: list[dict]) -> dict[str, float]:
    """COCO AP (IoU 0.50:0.95, all areas, 100 detections) of each category, by name; -1 for a category with no
    object in the set. The mean over categories with objects is ``coco_evaluate``'s AP."""
    evaluator = _cocoeval(ground_truth, detections)
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # (IoU thresholds, recall points, categories)
    names = {c["id"]: c["name"] for c in evaluator.cocoGt.dataset["categories"]}
    out = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k]
        out[names[cat_id]] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
    return out


def _cocoeval(ground_truth: DetectionDataset | dict, detections: list[dict]):
    """pycocotools' COCOeval of the detections, evaluated, accumulated and summarised (its prints swallowed)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_dict = ground_truth.to_coco() if isinstance(ground_truth, DetectionDataset) else ground_truth
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress; the table is ours to print
        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
        if detections:
            coco_dt = coco_gt.loadRes([dict(d) for d in detections])  # loadRes adds keys in place: copy
        else:  # loadRes cannot take an empty list; no detections is a valid (zero) result
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt_dict["images"], "categories": gt_dict["categories"], "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """The COCO table with one column per model, rows in COCO's order."""
    names = list(results)
    labels = {key: f"{key:<6}{_METRIC_HELP[key]}" for key in COCO_METRICS}
    label_width = max(len(label) for label in labels.values())
    width = max(8, *(len(n) for n in names))
    lines = [f"{'metric':<{label_width}}" + "".join(f"{n:>{width + 2}}" for n in names)]
    for key in COCO_METRICS:
        lines.append(f"{labels[key]:<{label_width}}" + "".join(f"{results[n][key]:>{width + 2}.4f}" for n in names))
    return "\n".join(lines)


def class_to_category(model_names: Mapping[int, str], dataset: DetectionDataset) -> dict[int, int]:
    """Map a model's class indices to the data set's category ids by name.

    Classes the data set lacks are left out (their detections are dropped). Names are compared
    case-insensitively with ``_`` and spaces treated alike (:func:`detkd.utils.class_key`), so ``traffic light``
    matches ``traffic_light``.
    """
    by_name = {class_key(c.name): c.id for c in dataset.categories}
    mapping = {i: by_name[class_key(n)] for i, n in model_names.items() if class_key(n) in by_name}
    if not mapping:
        raise DetkdError(
            f"{dataset.source}: none of the model's classes ({', '.join(list(model_names.values())[:8])}, ...) "
            f"is a category of the data set ({', '.join(c.name for c in dataset.categories[:8])}, ...)"
        )
    return mapping


def predict_ultralytics(
    model,
    dataset: DetectionDataset,
    imgsz: int = 640,
    batch: int = 16,
    device: str | None = None,
    conf: float = 0.001,
    iou: float = 0.7,
    max_det: int = 300,
) -> list[dict]:
    """COCO-format detections of an Ultralytics model (a path or a ``YOLO``) on every image of ``dataset``.

    ``conf``/``iou``/``max_det`` are Ultralytics' own validation settings, the ones mAP is reported with.
    """
    from detkd.ultralytics_internals import ultralytics_offline

    ultralytics_offline()
    from ultralytics import YOLO

    if not isinstance(model, YOLO):
        model = load_yolo_checkpoint(model)
    paths = [str(im.path) for im in dataset.images]
    found = ultralytics_detections(model, paths, imgsz, batch, device, conf=conf, iou=iou, max_det=max_det)
    return _to_coco(dataset, model.names, found)


def ultralytics_detections(
    model, paths: list[str], imgsz: int = 640, batch: int = 16, device=None, **settings
) -> Iterator[Detections]:
    """An Ultralytics ``YOLO``'s detections on each image file, in order (its ``predict`` with ``settings``)."""
    for start in range(0, len(paths), batch):
        chunk = paths[start : start + batch]
        for result in model.predict(chunk, imgsz=imgsz, device=device, verbose=False, **settings):
            yield Detections(result.boxes.xyxy, result.boxes.conf, result.boxes.cls)


def torchvision_detections(teacher, paths: list[str], imgsz: int = 640, batch: int = 16) -> Iterator[Detections]:
    """A detkd torchvision teacher's detections on each image file, in order.

    Each image is letterboxed to ``imgsz`` square as a student's batch is (Ultralytics' ``LetterBox``), seen by the
    teacher exactly as in distillation (:meth:`~detkd.adapters.torchvision.TorchvisionAdapter.detections`: its own
    score threshold, NMS and detections per image), and its boxes are mapped back to the image's pixels."""
    import cv2
    import numpy as np
    import torch

    from detkd.ultralytics_internals import ultralytics_offline

    ultralytics_offline()
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils.ops import scale_boxes

    device = next(teacher.model.parameters()).device
    letterbox = LetterBox((imgsz, imgsz), auto=False)
    for start in range(0, len(paths), batch):
        chunk = paths[start : start + batch]
        originals = [cv2.imread(path) for path in chunk]
        if unread := [path for path, pixels in zip(chunk, originals) if pixels is None]:
            raise DetkdError(f"{unread[0]}: image cannot be read")
        boxed = [letterbox(image=pixels)[..., ::-1] for pixels in originals]  # BGR -> RGB
        images = torch.from_numpy(np.stack(boxed)).permute(0, 3, 1, 2).to(device).float() / 255
        for pixels, found in zip(originals, teacher.detections(images)):
            xyxy = scale_boxes((imgsz, imgsz), found["boxes"].clone(), pixels.shape[:2])
            yield Detections(xyxy, found["scores"], found["labels"])


def predict_teacher(teacher, dataset: DetectionDataset, imgsz: int = 640, batch: int = 16) -> list[dict]:
    """COCO-format detections of a torchvision teacher (a
    :class:`~detkd.adapters.torchvision.TorchvisionAdapter`, on its device) on every image of ``dataset``: what the
    teacher trainer evaluates each epoch, on the model in memory."""
    paths = [str(im.path) for im in dataset.images]
    return _to_coco(dataset, teacher.names, torchvision_detections(teacher, paths, imgsz, batch))


def checkpoint_detections(
    checkpoint: str | os.PathLike, paths: list[str], imgsz: int = 640, batch: int = 16, device=None, conf: float = 0.001
) -> tuple[dict[int, str], Iterator[Detections]]:
    """The class names of a checkpoint of any family detkd knows (a detkd torchvision teacher, else Ultralytics,
    whose loader names what a foreign file is not), and its detections scoring at least ``conf`` on each image file,
    in order (lazily: a caller can show progress)."""
    from detkd.adapters.torchvision import is_torchvision_teacher

    if is_torchvision_teacher(checkpoint):
        from detkd.adapters.torchvision import teacher_adapter
        from detkd.ultralytics_internals import ultralytics_offline

        ultralytics_offline()
        from ultralytics.utils.torch_utils import select_device

        teacher = teacher_adapter(checkpoint, select_device(device or "", verbose=False))
        found = (d.above(conf) for d in torchvision_detections(teacher, paths, imgsz, batch))
        return teacher.names, found
    model = load_yolo_checkpoint(checkpoint)
    return model.names, ultralytics_detections(model, paths, imgsz, batch, device, conf=conf)


def predict_checkpoint(
    checkpoint: str | os.PathLike, dataset: DetectionDataset, imgsz: int = 640, batch: int = 16, device=None
) -> list[dict]:
    """COCO-format detections of a checkpoint of any family detkd knows (see :func:`checkpoint_detections`) on every
    image of ``dataset``, at Ultralytics' validation settings for its models."""
    paths = [str(im.path) for im in dataset.images]
    names, found = checkpoint_detections(checkpoint, paths, imgsz=imgsz, batch=batch, device=device)
    return _to_coco(dataset, names, found)


def _to_coco(dataset: DetectionDataset, names: Mapping[int, str], found: Iterable[Detections]) -> list[dict]:
    mapping = class_to_category(names, dataset)
    detections = []
    for image, d in zip(dataset.images, found):
        detections.extend(_to_coco_results(image.id, d.xyxy, d.scores, d.classes, mapping))
    return detections


def _to_coco_results(image_id: int, xyxy, scores, classes, mapping: Mapping[int, int]) -> Iterable[dict]:
    xyxy, scores, classes = xyxy.tolist(), scores.tolist(), classes.int().tolist()
    for (x0, y0, x1, y1), score, cls in zip(xyxy, scores, classes):
        if cls in mapping:
            yield {
                "image_id": image_id,
                "category_id": mapping[cls],
                "bbox": [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)],
                "score": round(score, 5),
            }


# Exported models ``YOLO(path)`` runs through Ultralytics' AutoBackend, by file suffix (OpenVINO: a folder)
EXPORT_SUFFIXES = {".onnx": "ONNX", ".torchscript": "TorchScript", ".engine": "TensorRT"}
OPENVINO_FOLDER = "_openvino_model"


def is_exported_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an exported model (``.onnx``, ``.torchscript``, ``.engine``, ``*_openvino_model/``)."""
    path = Path(path)
    return path.suffix in EXPORT_SUFFIXES or path.name.endswith(OPENVINO_FOLDER)


def load_yolo_checkpoint(path: str | os.PathLike):
    """``YOLO(path)`` for a local checkpoint or exported model, with one-line errors instead of a download attempt
    or a traceback.

    A ``.pt`` checkpoint is a pickle: loading it is restricted to what Ultralytics checkpoints hold (see
    :mod:`detkd.safe_load`). Exported models are not pickles and that allow-list does not apply to them; what
    loading one means:

    - ``.onnx``: a graph of ONNX operators that ONNX Runtime executes; it runs no code of its own.
    - ``*_openvino_model/``: an OpenVINO IR (graph xml, weights bin, metadata yaml read as plain YAML).
    - ``.torchscript``: a serialised TorchScript *program* that ``torch.jit.load`` compiles and runs. It cannot run
      arbitrary Python, but it is code all the same (any TorchScript operator, with the file's author choosing
      which): load only files whose origin you trust, as you would a script.
    - ``.engine``: a TensorRT engine, native code built for one GPU and TensorRT version; trust it as a binary.
    """
    from detkd.ultralytics_internals import ultralytics_offline

    ultralytics_offline()
    from ultralytics import YOLO

    path = Path(path)
    if path.suffix in {".yaml", ".yml"}:
        raise DetkdError(f"{path}: a model config has no trained weights; give a checkpoint (.pt)")
    if path.name.endswith(OPENVINO_FOLDER) and not path.is_dir():
        raise DetkdError(f"{path}: OpenVINO model folder not found")
    if not path.name.endswith(OPENVINO_FOLDER) and not path.is_file():
        raise DetkdError(f"{path}: checkpoint not found (detkd never downloads weights: give a local file)")
    try:
        return YOLO(str(path))
    except DetkdError:  # refused by the safe loader, with its reason
        raise
    except Exception as e:  # torch.load / unpickling / format errors: a foreign or damaged file
        first_line = next((line for line in str(e).splitlines() if line.strip()), "")
        kind = "an exported YOLO model" if is_exported_model(path) else "an Ultralytics checkpoint"
        raise DetkdError(f"{path}: not {kind} ({type(e).__name__}: {first_line})") from e


def default_eval_out(model: str | os.PathLike) -> Path:
    """``runs/eval/<name>/metrics.json``: ``best`` for ``best.pt``, ``best_onnx`` for ``best.onnx``, so that a
    checkpoint and its exports do not overwrite each other's metrics."""
    path = Path(model)
    name = path.name.replace(".", "_") if is_exported_model(path) else path.stem
    return Path("runs/eval") / name / "metrics.json"


def evaluate_checkpoint(
    model: str | os.PathLike,
    data: str | os.PathLike,
    imgsz: int = 640,
    out: str | os.PathLike | None = None,
    images_dir: str | os.PathLike | None = None,
    split: str = "val",
    batch: int = 16,
    device: str | None = None,
) -> dict[str, float]:
    """Evaluate a checkpoint (Ultralytics, or a detkd torchvision teacher) or an exported model (see
    :func:`load_yolo_checkpoint`) on a COCO json or YOLO data yaml; write metrics and detections.

    Metrics go to ``out`` (default :func:`default_eval_out`), detections beside it as
    ``<out stem>.detections.json``, ready for ``COCO.loadRes``.
    """
    from detkd.data import load_data

    dataset = load_data(data, split=split, images_dir=images_dir)
    detections = predict_checkpoint(model, dataset, imgsz=imgsz, batch=batch, device=device)
    metrics = coco_evaluate(dataset, detections)
    out = Path(out) if out else default_eval_out(model)
    save_json(detections, out.with_name(out.stem + ".detections.json"))
    save_json({"model": str(model), "data": str(data), "split": split, "imgsz": imgsz, **metrics}, out)
    return metrics
