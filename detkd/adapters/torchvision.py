"""torchvision two-stage detectors (any ``GeneralizedRCNN``: Faster R-CNN on ResNet or MobileNet FPNs) as teachers.

The teacher runs on the student's own letterboxed batch (RGB in 0-1): its normalisation is applied, its resize
(``GeneralizedRCNNTransform``) is bypassed, so every feature grid lines up with the student's input pixels and a
stride-8 teacher level pairs with the student's P3 cell for cell. What it offers, in :class:`DetectorView` form:

- FPN (neck) levels with their real strides (4 ... 64 for a ResNet FPN), and the backbone's stage outputs (C2-C5);
- RPN objectness, a dense class-agnostic map per level (one logit per anchor shape and cell);
- no dense class or box head: the second stage is evaluated at boxes the caller gives (:meth:`second_stage`; each
  view carries the adapter as ``view.two_stage``), or at the RPN's best proposal in every cell of given levels, a
  dense head made of the two stages (:meth:`dense_verdict`: the dense logit and box terms pair it with the
  student's anchors); its final detections come from :meth:`detections`.

A detkd torchvision teacher checkpoint is a plain ``torch.save`` dict (:func:`save_torchvision_teacher`): the
architecture's name in :data:`ARCHITECTURES`, the class names by class-logit column, the input size it was
trained at, and the weights as a state dict. It holds no class, so loading it admits nothing beyond tensors
(:mod:`detkd.safe_load`). torchvision never downloads here: a ``weights`` name is looked up where torchvision itself
caches the file, and an error says where to put it when it is missing.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from detkd import safe_load
from detkd.adapters.view import DetectorView, grid_stride
from detkd.errors import DetkdError
from detkd.utils import atomic_write

FORMAT_KEY = "detkd_torchvision_teacher"  # the checkpoint's marker key, recognised statically; its value: version
FORMAT_VERSION = 1
NAME_PREFIX = "torchvision:"  # a recipe's ``teacher: torchvision:ARCH`` (with ``teacher_weights``)
_BACKGROUND, _UNUSED = "__background__", "N/A"  # torchvision's COCO list: column 0 and the ids COCO left empty


def _resnet18_fpn(num_classes: int) -> nn.Module:
    """Faster R-CNN on a ResNet-18 FPN (torchvision has no builder for it): a small teacher for CPU work."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    return FasterRCNN(resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5), num_classes)


def _torchvision_builder(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        from torchvision.models import detection

        return getattr(detection, name)(weights=None, weights_backbone=None, num_classes=num_classes)

    return build


# name -> builder(num_classes including background), never loading weights itself
ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    name: _torchvision_builder(name)
    for name in (
        "fasterrcnn_resnet50_fpn",
        "fasterrcnn_resnet50_fpn_v2",
        "fasterrcnn_mobilenet_v3_large_fpn",
        "fasterrcnn_mobilenet_v3_large_320_fpn",
    )
} | {"fasterrcnn_resnet18_fpn": _resnet18_fpn}


@dataclass
class SecondStage:
    """The box head's verdict on given boxes, one row per box, images in order.

    ``class_logits`` (R, K+1): column 0 is background, the others follow the teacher's ``names`` keys; torchvision
    scores them with a softmax. ``boxes`` (R, K+1, 4): each box refined for each class (xyxy input pixels, clipped
    to the image), as torchvision decodes them before its NMS.
    """

    class_logits: Tensor
    boxes: Tensor


class TorchvisionAdapter:
    """A frozen torchvision ``GeneralizedRCNN`` run on letterboxed batches and read as a :class:`DetectorView`."""

    dense_head = False  # no per-anchor class/box outputs: the distiller refuses dense logit/box terms with it
    roi_head = True  # its second stage judges given boxes: the distiller's second_stage terms

    def __init__(self, model: nn.Module, names: Mapping[int, str]):
        from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

        if not isinstance(model, GeneralizedRCNN):
            raise DetkdError(f"{type(model).__name__}: not a torchvision two-stage detector (GeneralizedRCNN)")
        self.model = model
        self._names = dict(names)
        with torch.no_grad():  # the levels' names, channels and strides, read off one small forward
            probe = torch.zeros(1, 3, 64, 64, device=next(model.parameters()).device)
            stages, levels = self._features(probe)
        self.level_names = list(levels)
        self._channels = [f.shape[1] for f in levels.values()]
        self._strides = [grid_stride(64, f) for f in levels.values()]
        self.backbone_channels = [f.shape[1] for f in stages.values()]
        self.backbone_strides = [grid_stride(64, f) for f in stages.values()]

    @property
    def names(self) -> dict[int, str]:
        """Class names by class-logit column (1 ... K; column 0 is background)."""
        return dict(self._names)

    @property
    def strides(self) -> list[int]:
        return list(self._strides)

    @property
    def channels(self) -> list[int]:
        """Channels of the FPN levels."""
        return list(self._channels)

    def _features(self, images: Tensor) -> tuple[OrderedDict[str, Tensor], OrderedDict[str, Tensor]]:
        """(backbone stage outputs, FPN levels) of letterboxed RGB 0-1 images, normalised as the teacher was trained.

        A ``BackboneWithFPN`` (``body`` then ``fpn``) gives both; any other backbone gives its output as the levels
        and no stage outputs."""
        transform = self.model.transform  # holds the teacher's normalisation; its resize is skipped on purpose
        mean = images.new_tensor(transform.image_mean).view(1, -1, 1, 1)
        std = images.new_tensor(transform.image_std).view(1, -1, 1, 1)
        x = (images - mean) / std
        backbone = self.model.backbone
        if hasattr(backbone, "body") and hasattr(backbone, "fpn"):
            stages = backbone.body(x)
            return stages, backbone.fpn(stages)
        levels = backbone(x)
        return OrderedDict(), levels if isinstance(levels, dict) else OrderedDict([("0", levels)])

    def view(self, preds: tuple[OrderedDict[str, Tensor], OrderedDict[str, Tensor]]) -> DetectorView:
        """The view of :meth:`_features`' output: both feature sets, and this adapter as its ``two_stage`` (the second
        stage, the RPN's objectness and the dense verdict on demand, so that a training step does not pay for what
        no term reads)."""
        stages, levels = preds
        return DetectorView(
            feats=list(levels.values()),
            strides=self.strides,
            names=self.names,
            backbone_feats=list(stages.values()) or None,
            backbone_strides=self.backbone_strides or None,
            two_stage=self,
        )

    def record_backbone(self) -> list:
        """Nothing to install: every view carries the backbone's stage outputs (for ``from: backbone`` terms)."""
        return []

    @torch.no_grad()
    def objectness(self, view: DetectorView) -> list[Tensor]:
        """The RPN's class-agnostic objectness on the view's levels: (N, anchors per cell, H, W) raw logits each."""
        return self.model.rpn.head(view.feats)[0]

    @torch.no_grad()
    def __call__(self, images: Tensor) -> DetectorView:
        """Forward (without gradients) on letterboxed RGB 0-1 images (N, 3, H, W) and view."""
        return self.view(self._features(images))

    @torch.no_grad()
    def second_stage(self, view: DetectorView, boxes: list[Tensor], image_size: tuple[int, int]) -> SecondStage:
        """The box head evaluated at ``boxes`` (one (R_i, 4) xyxy pixel tensor per image of ``view``), exactly as
        torchvision's ``roi_heads`` evaluates its proposals: RoIAlign on the FPN (``box_roi_pool``), ``box_head``,
        ``box_predictor``, the box coder's decoding, clipped to ``image_size`` (H, W) of the letterboxed batch.

        Without gradients: RoIAlign gives none to box coordinates, so a term built on this teaches through its
        targets only."""
        from torchvision.ops import boxes as box_ops

        heads = self.model.roi_heads
        levels = OrderedDict(zip(self.level_names, view.feats))
        boxes = [b.detach().float() for b in boxes]
        sizes = [tuple(image_size)] * len(boxes)
        pooled = heads.box_roi_pool(levels, boxes, sizes)
        class_logits, regression = heads.box_predictor(heads.box_head(pooled))
        refined = heads.box_coder.decode(regression, boxes) if boxes else regression.view(0, class_logits.shape[1], 4)
        return SecondStage(class_logits, box_ops.clip_boxes_to_image(refined, tuple(image_size)))

    @torch.no_grad()
    def dense_verdict(self, view: DetectorView, strides: list[int], image_size: tuple[int, int]) -> SecondStage:
        """A dense head made of the two stages, on every cell of the levels of ``strides`` (the student's, each one
        of this teacher's FPN strides): at each cell, the RPN's proposal of highest objectness there (over its anchor
        shapes), judged by the second stage (:meth:`second_stage`). One row per cell, levels in ``strides`` order,
        cells row-major: the order of a YOLO head's anchors, so that row a pairs with the student's anchor a.

        What a dense teacher says at every anchor, whatever the student predicts there; the ``second_stage`` terms
        judge the student's own boxes instead, so early in training (boxes still poor) the teacher calls nearly all of
        them background."""
        from torchvision.models.detection.image_list import ImageList
        from torchvision.ops import boxes as box_ops

        rpn, n = self.model.rpn, view.feats[0].shape[0]
        levels = [self._strides.index(stride) for stride in strides]
        objectness, deltas = rpn.head([view.feats[i] for i in levels])  # the RPN's convolutions on those levels only
        # the anchors of every level (the generator pairs its sizes with all of them), the same for every image
        shell = ImageList(view.feats[0].new_empty(1, 3, *image_size), [tuple(image_size)])  # its sizes only
        shapes_per_level = rpn.anchor_generator.num_anchors_per_location()
        counts = [k * f.shape[-2] * f.shape[-1] for k, f in zip(shapes_per_level, view.feats)]
        anchors = rpn.anchor_generator(shell, view.feats)[0].split(counts)
        proposals = []
        for i, obj, delta in zip(levels, objectness, deltas):  # (N, S, H, W), (N, S*4, H, W); S anchor shapes a cell
            shapes, (h, w) = obj.shape[1], obj.shape[-2:]
            obj = obj.permute(0, 2, 3, 1).reshape(n, h * w, shapes)
            delta = delta.view(n, shapes, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, h * w, shapes, 4)
            best = obj.argmax(-1)  # (N, cells)
            chosen = delta.gather(2, best[..., None, None].expand(-1, -1, 1, 4)).squeeze(2)
            cell_anchors = anchors[i].view(h * w, shapes, 4)[torch.arange(h * w, device=best.device)[None], best]
            boxes = rpn.box_coder.decode_single(chosen.reshape(-1, 4), cell_anchors.reshape(-1, 4))
            proposals.append(boxes.view(n, h * w, 4))
        proposals = box_ops.clip_boxes_to_image(torch.cat(proposals, 1), tuple(image_size))
        return self.second_stage(view, list(proposals), image_size)

    def kept_detections(self, boxes: Tensor, scores: Tensor, labels: Tensor) -> Tensor:
        """Indices, best first, of the detections of one image (``boxes`` (R, 4), ``scores`` (R,), ``labels`` (R,): one
        class per box) that the RoI head's postprocessing keeps: score above its ``score_thresh``, no side under
        0.01 px, per-class NMS at its ``nms_thresh``, at most ``detections_per_img``. (torchvision's postprocessing
        also keeps a box once per other class that passes; a caller with one class per box does not need that.)"""
        from torchvision.ops import boxes as box_ops

        heads = self.model.roi_heads
        candidates = torch.where(scores > heads.score_thresh)[0]
        candidates = candidates[box_ops.remove_small_boxes(boxes[candidates], min_size=1e-2)]
        kept = box_ops.batched_nms(boxes[candidates], scores[candidates], labels[candidates], heads.nms_thresh)
        return candidates[kept[: heads.detections_per_img]]

    @torch.no_grad()
    def detections(self, images: Tensor) -> list[dict[str, Tensor]]:
        """torchvision's final detections (its RPN, second stage, score threshold and NMS) on letterboxed RGB 0-1
        images: per image ``boxes`` (xyxy input pixels), ``scores``, ``labels`` (class-logit columns)."""
        from torchvision.models.detection.image_list import ImageList

        _, levels = self._features(images)
        sizes = [tuple(images.shape[-2:])] * images.shape[0]
        proposals, _ = self.model.rpn(ImageList(images, sizes), levels)
        found, _ = self.model.roi_heads(levels, proposals, sizes)
        return found


# checkpoints


def coco_names() -> dict[int, str]:
    """torchvision's COCO classes by class-logit column (91 columns; background and the unused ids left out)."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights  # every COCO detector's list

    categories = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    return {i: name for i, name in enumerate(categories) if name not in (_BACKGROUND, _UNUSED)}


def check_architecture(arch: str) -> str:
    if arch not in ARCHITECTURES:
        raise DetkdError(f"torchvision:{arch}: unknown architecture (known: {', '.join(ARCHITECTURES)})")
    return arch


def build_model(arch: str, num_classes: int) -> nn.Module:
    """An untrained ``arch`` with ``num_classes`` class-logit columns (background included)."""
    return ARCHITECTURES[check_architecture(arch)](num_classes)


def read_state_dict(weights: str | os.PathLike, arch: str) -> dict[str, Tensor]:
    """A torchvision state dict from a local file, or from a torchvision weights name (``DEFAULT``,
    ``COCO_V1``, ``FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1``) whose file is in torchvision's cache. Never
    downloads: a name without its file is an error saying where to put it."""
    path = weights_file(weights, arch)
    state = _load_plain(path, "torchvision state dict")
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DetkdError(f"{path}: not a state dict (a mapping of names to tensors)")
    return dict(state)


def weights_file(weights: str | os.PathLike, arch: str) -> Path:
    """The file ``weights`` means: itself, or the cached file of a torchvision weights name of ``arch``."""
    path = Path(weights)
    return path if path.is_file() else _cached_weights_file(str(weights), arch)


def _cached_weights_file(name: str, arch: str) -> Path:
    """Where torchvision caches the weights ``name`` of ``arch`` (``torch.hub``'s folder), when the file is there."""
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(arch)
    except ValueError:  # an architecture torchvision has no weights for (detkd's own resnet18 one)
        raise DetkdError(f"{name}: weights file not found (detkd never downloads weights: give a local file)") from None
    member = name.rsplit(".", 1)[-1]  # COCO_V1 or FasterRCNN_ResNet50_FPN_Weights.COCO_V1
    if member not in enum.__members__:  # DEFAULT is one of them, an alias
        known = ", ".join(enum.__members__)
        raise DetkdError(f"{name}: neither a file nor a weights name of {arch} (names: {known})")
    url = enum[member].url
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not path.is_file():
        raise DetkdError(f"{name}: detkd never downloads weights; put the file from {url} at {path} (torch hub cache)")
    return path


def fit_weights(model: nn.Module, state: Mapping[str, Tensor], where: str) -> nn.Module:
    """Load ``state`` into ``model``, or one line on what does not fit. Batch-norm step counters may be missing or
    extra: torchvision's COCO weights come from frozen batch norms, which have none, and its builders without
    weights use plain ones, which do; in eval mode the two compute the same."""
    expected = model.state_dict()
    counter = "num_batches_tracked"
    missing = [k for k in expected if k not in state and not k.endswith(counter)]
    unexpected = [k for k in state if k not in expected and not k.endswith(counter)]
    wrong = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    for problem, keys in (("lacks", missing), ("has keys the architecture lacks", unexpected), ("misfits", wrong)):
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            if problem == "misfits":
                k = keys[0]
                shown += f" (e.g. {k}: {tuple(state[k].shape)} where {tuple(expected[k].shape)} fits)"
            raise DetkdError(f"{where}: weights do not fit the architecture: {problem} {shown}")
    model.load_state_dict(state, strict=False)
    return model


def num_classes_of(state: Mapping[str, Tensor], where: str) -> int:
    """Class-logit columns (background included) of a Faster R-CNN state dict, read off its predictor."""
    key = "roi_heads.box_predictor.cls_score.weight"
    if key not in state:
        raise DetkdError(f"{where}: weights do not fit a Faster R-CNN: no {key}")
    return int(state[key].shape[0])


def save_torchvision_teacher(
    out: str | os.PathLike,
    arch: str,
    weights: str | os.PathLike | Mapping[str, Tensor],
    names: Mapping[int, str] | None = None,
    imgsz: int = 640,
) -> Path:
    """Write a detkd torchvision teacher checkpoint (atomically) and return its path.

    ``weights``: a state dict, a file holding one, or a torchvision weights name (see :func:`read_state_dict`).
    ``names``: class names by class-logit column (1 ... K); by default torchvision's COCO names when the weights
    have COCO's 91 columns. The weights are checked against the architecture here, so a written file loads."""
    check_architecture(arch)  # before any weights are read
    where = str(weights) if not isinstance(weights, Mapping) else f"torchvision:{arch}"
    state = dict(weights) if isinstance(weights, Mapping) else read_state_dict(weights, arch)
    num_classes = num_classes_of(state, where)
    names = _class_names(names, num_classes, where)
    fit_weights(build_model(arch, num_classes), state, where)
    checkpoint = {FORMAT_KEY: FORMAT_VERSION, "arch": arch, "names": names, "imgsz": int(imgsz), "model": state}
    return atomic_write(out, lambda tmp: torch.save(checkpoint, tmp))


def _class_names(names: Mapping[int, str] | None, num_classes: int, where: str) -> dict[int, str]:
    """Class names by class-logit column, checked against the predictor's ``num_classes`` columns; by default
    torchvision's COCO names, which only weights with COCO's 91 columns can have."""
    if names is None:
        if num_classes != 91:
            raise DetkdError(f"{where}: {num_classes - 1} classes, not COCO's 90 columns: give their names")
        names = coco_names()
    names = {int(k): str(v) for k, v in names.items()}
    if not names or min(names) < 1 or max(names) >= num_classes:
        raise DetkdError(f"{where}: class names must be keyed by class-logit columns 1 ... {num_classes - 1}")
    return names


def is_torchvision_teacher(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a detkd torchvision teacher checkpoint (its marker key, read statically)."""
    return FORMAT_KEY in safe_load.pickled_strings(path)


def read_torchvision_teacher(path: str | os.PathLike) -> tuple[dict, nn.Module]:
    """(the checkpoint's fields, its model with the weights: float, eval mode, frozen)."""
    checkpoint = _load_plain(path, "detkd torchvision teacher checkpoint")
    fields = ("arch", "names", "imgsz", "model")
    if not isinstance(checkpoint, dict) or checkpoint.get(FORMAT_KEY) != FORMAT_VERSION:
        raise DetkdError(f"{path}: not a detkd torchvision teacher checkpoint (version {FORMAT_VERSION})")
    if lacking := [k for k in fields if k not in checkpoint]:
        raise DetkdError(f"{path}: torchvision teacher checkpoint lacks {', '.join(lacking)}")
    state = checkpoint["model"]
    model = fit_weights(build_model(checkpoint["arch"], num_classes_of(state, str(path))), state, str(path))
    return checkpoint, model.float().eval().requires_grad_(False)


def teacher_adapter(path: str | os.PathLike, device: torch.device | str = "cpu") -> TorchvisionAdapter:
    """The frozen teacher of a detkd torchvision checkpoint behind its adapter (for ``create_teacher``)."""
    checkpoint, model = read_torchvision_teacher(path)
    return TorchvisionAdapter(model.to(device), checkpoint["names"])


def check_named_teacher(arch: str, weights: str | os.PathLike | None) -> Path:
    """The weights file of ``teacher: torchvision:ARCH``, checked without reading it (a known architecture, weights
    given, their file present), so that a run refuses a bad teacher before it builds any model."""
    check_architecture(arch)
    if weights is None:
        raise DetkdError(
            f"teacher: {NAME_PREFIX}{arch} needs teacher_weights: FILE (a torchvision state dict; detkd never "
            "downloads weights)"
        )
    return weights_file(weights, arch)


def named_teacher_adapter(
    arch: str, weights: str | os.PathLike | None, device: torch.device | str = "cpu"
) -> TorchvisionAdapter:
    """The frozen teacher of a recipe's ``teacher: torchvision:ARCH`` with ``teacher_weights: FILE``: a torchvision
    state dict (a file, or a weights name whose file is in torch hub's cache) of COCO's 91 class columns, named by
    COCO's class list. Weights of other classes carry no names: write a detkd teacher checkpoint for them
    (``detkd teacher train`` or :func:`save_torchvision_teacher`)."""
    state = read_state_dict(check_named_teacher(arch, weights), arch)
    num_classes = num_classes_of(state, str(weights))
    try:
        names = _class_names(None, num_classes, str(weights))
    except DetkdError as e:
        raise DetkdError(f"{e}; for such weights write a detkd teacher checkpoint (save_torchvision_teacher)") from None
    model = fit_weights(build_model(arch, num_classes), state, str(weights))
    return TorchvisionAdapter(model.float().eval().requires_grad_(False).to(device), names)


def _load_plain(path: Path | str | os.PathLike, kind: str):
    """``torch.load`` of a file that holds only tensors and plain containers: no global is admitted."""
    try:
        return safe_load.load(path, lambda name: None, map_location="cpu", kind=kind)
    except DetkdError:
        raise
    except Exception as e:  # a damaged archive
        first_line = next((line for line in str(e).splitlines() if line.strip()), "")
        raise DetkdError(f"{path}: not a {kind} ({type(e).__name__}: {first_line})") from e
