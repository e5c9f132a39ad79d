"""Ultralytics detectors (YOLOv8, YOLO11, YOLO26, ... any size) seen through :class:`DetectorView`.

Everything comes from the Detect head's raw output (box distributions, class logits and the head's input features,
see :func:`~detkd.ultralytics_internals.dense_head_outputs`), which Ultralytics returns in training and eval mode:
no hooks, so nothing extra lives in the model and it still pickles and deep-copies as Ultralytics expects.
End-to-end heads (YOLO26) have ``one2many`` and ``one2one`` branches; the dense ``one2many`` branch is used.

The backbone's stage outputs that feed the neck (for ``from: backbone`` feature terms) are not in that output: a
forward keeps them only after :meth:`UltralyticsAdapter.record_backbone`, whose forward hooks the caller removes when
done. The distillation criterion installs them on the training student after Ultralytics made its EMA copy and
removes them at the end of training, so no checkpoint or copy of the student carries them.
"""

from __future__ import annotations

import os
from functools import cached_property, partial
from pathlib import Path

import torch
from torch import nn

from detkd import ultralytics_internals as internals
from detkd.adapters.view import DetectorView, grid_stride
from detkd.errors import DetkdError
from detkd.safe_load import pickled_strings


def detect_head(model: nn.Module) -> nn.Module:
    """The Detect module of an Ultralytics detection model."""
    from ultralytics.nn.modules.head import Detect

    head = model.model[-1] if hasattr(model, "model") else None
    if not isinstance(head, Detect):
        raise DetkdError(f"{type(model).__name__}: not an Ultralytics detection model (no Detect head)")
    return head


class UltralyticsAdapter:
    """Reads a :class:`DetectorView` off an Ultralytics ``DetectionModel``'s raw head output."""

    dense_head = True
    roi_head = False

    def __init__(self, model: nn.Module, branch: str = "one2many"):
        self.model = model
        self.head = detect_head(model)
        self.branch = branch
        self._stage_outputs: dict[int, torch.Tensor] | None = None  # layer -> output of the last forward, recording

    @property
    def names(self) -> dict[int, str]:
        return dict(self.model.names)

    @property
    def strides(self) -> list[int]:
        return [int(s) for s in self.head.stride.tolist()]

    @property
    def channels(self) -> list[int]:
        """Channels of the head's input features."""
        return internals.detect_input_channels(self.head)

    @property
    def reg_max(self) -> int:
        return int(self.head.reg_max)

    @property
    def backbone_channels(self) -> list[int]:
        """Channels of the backbone stage outputs the neck reads, by increasing stride."""
        return list(self._stages[1])

    @property
    def backbone_strides(self) -> list[int]:
        return list(self._stages[2])

    @cached_property
    def _stages(self) -> tuple[list[int], list[int], list[int]]:
        """(layers, channels, strides) of the backbone stage outputs the neck reads
        (:func:`~detkd.ultralytics_internals.neck_inputs`), one per stride (the last layer at it), by increasing
        stride; read off one small forward without gradients, in eval mode so that no BatchNorm statistic moves
        (each module's mode is restored after)."""
        layers, outputs = internals.neck_inputs(self.model), {}
        size = 2 * max(self.strides)
        modes = [(m, m.training) for m in self.model.modules()]
        handles = [self.model.model[i].register_forward_hook(partial(_keep_output, outputs, i)) for i in layers]
        try:
            p = next(self.model.parameters())
            with torch.no_grad():
                self.model.eval()(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
        finally:
            for h in handles:
                h.remove()
            for m, training in modes:
                m.training = training
        by_stride = {grid_stride(size, outputs[i]): i for i in layers}  # layers in order: the last at a stride wins
        strides = sorted(by_stride)
        kept = [by_stride[s] for s in strides]
        return kept, [outputs[i].shape[1] for i in kept], strides

    def record_backbone(self) -> list[_Recording]:
        """From now on each forward keeps its backbone stage outputs, which :meth:`view` returns as
        ``backbone_feats``: a forward hook on each of those layers, and a pre-hook on the first layer that forgets
        the forward before. Returns the recording's handle: the caller removes it when done (views then carry no
        backbone outputs again)."""
        outputs: dict[int, torch.Tensor] = {}
        layers = self.model.model
        handles = [layers[0].register_forward_pre_hook(lambda module, inputs: outputs.clear())]
        handles += [layers[i].register_forward_hook(partial(_keep_output, outputs, i)) for i in self._stages[0]]
        self._stage_outputs = outputs
        return [_Recording(self, handles)]

    def _backbone_feats(self) -> list[torch.Tensor] | None:
        if self._stage_outputs is None:
            return None
        layers = self._stages[0]
        if any(i not in self._stage_outputs for i in layers):  # hooks removed, or a view without its forward
            raise DetkdError(f"{type(self.model).__name__}: no backbone outputs recorded for this view's forward")
        return [self._stage_outputs[i] for i in layers]

    def view(self, preds) -> DetectorView:
        """The view of a forward's output, in training or eval mode."""
        boxes, scores, feats = internals.dense_head_outputs(preds, self.branch)
        n, a = scores.shape[0], scores.shape[-1]
        anchor_points, stride_tensor = internals.anchor_points(feats, self.head.stride)
        box = boxes.permute(0, 2, 1)  # (N, A, 4 * reg_max)
        if self.reg_max > 1:
            box_logits = box.reshape(n, a, 4, self.reg_max)
            bins = torch.arange(self.reg_max, device=box.device, dtype=box_logits.dtype)
            box_ltrb = box_logits.softmax(-1) @ bins  # DFL expectation, as Ultralytics' bbox_decode
        else:
            box_logits, box_ltrb = None, box
        return DetectorView(
            feats=feats,
            strides=self.strides,
            names=self.names,
            cls_logits=scores.permute(0, 2, 1),
            box_logits=box_logits,
            box_ltrb=box_ltrb,
            anchor_points=anchor_points,
            stride_tensor=stride_tensor,
            backbone_feats=self._backbone_feats(),
            backbone_strides=self.backbone_strides if self._stage_outputs is not None else None,
        )

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> DetectorView:
        """Forward (without gradients) and view; for teachers."""
        return self.view(self.model(images))


class _Recording:
    """The handle of :meth:`UltralyticsAdapter.record_backbone`: ``remove()`` ends it."""

    def __init__(self, adapter: UltralyticsAdapter, handles: list[torch.utils.hooks.RemovableHandle]):
        self.adapter, self.handles = adapter, handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.adapter._stage_outputs = None


def _keep_output(outputs: dict[int, torch.Tensor], layer: int, module, inputs, output) -> None:
    outputs[layer] = output


def load_ultralytics_model(
    path: str | os.PathLike, role: str = "model", device: torch.device | str = "cpu"
) -> nn.Module:
    """The model of a local Ultralytics checkpoint (float, eval mode), with a one-line error for anything else.

    Loading is restricted to what Ultralytics checkpoints hold (see :mod:`detkd.safe_load`)."""
    internals.ultralytics_offline()
    from ultralytics.nn.tasks import load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise DetkdError(f"{path}: {role} checkpoint not found (detkd never downloads weights: give a local file)")
    try:
        model, _ = load_checkpoint(str(path), device=device)
    except DetkdError:  # refused by the safe loader, with its reason
        raise
    except Exception as e:  # torch.load / unpickling / format errors: a foreign or damaged file
        first_line = next((line for line in str(e).splitlines() if line.strip()), "")
        raise DetkdError(f"{path}: not an Ultralytics checkpoint ({type(e).__name__}: {first_line})") from e
    return model.float().eval()


def load_teacher(path: str | os.PathLike, device: torch.device | str = "cpu") -> nn.Module:
    """A frozen detection model: eval mode, no gradients, never trained by anything that holds it."""
    model = load_ultralytics_model(path, role="teacher", device=device)
    try:
        detect_head(model)
    except DetkdError as e:
        raise DetkdError(f"{path}: the teacher must be a detection model ({e})") from None
    return model.requires_grad_(False)


def is_ultralytics_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``torch.save`` archive whose pickle refers to Ultralytics classes (read statically, see
    :func:`~detkd.safe_load.pickled_strings`: a checkpoint of another kind is recognised before any loader opens it).
    """
    return any(name.startswith("ultralytics.") for name in pickled_strings(path))


def teacher_adapter(path: str | os.PathLike, device: torch.device | str = "cpu") -> UltralyticsAdapter:
    """The frozen teacher of an Ultralytics checkpoint behind its adapter (:func:`detkd.adapters.create_teacher`)."""
    return UltralyticsAdapter(load_teacher(path, device))
