"""``from: backbone`` feature terms: the backbone stages that feed the neck, paired by stride across any pair (a YOLO
teacher's stages, a ResNet teacher's C3-C5), through connectors, trained one step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detkd.adapters import TorchvisionAdapter, UltralyticsAdapter
from detkd.adapters.torchvision import build_model
from detkd.config import DistillConfig, FeatureLossConfig, load_recipe
from detkd.distiller import Distiller
from detkd.engine.criterion import DistillationCriterion
from detkd.errors import DetkdError
from detkd.ultralytics_internals import neck_inputs, ultralytics_offline

ultralytics_offline()
from ultralytics.cfg import get_cfg  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

NAMES = {0: "car", 1: "truck", 2: "bus"}
BACKBONE_CWD = DistillConfig(feature=[FeatureLossConfig(loss="cwd", from_="backbone")])


def _yolo(cfg: str, seed: int) -> DetectionModel:
    torch.manual_seed(seed)
    model = DetectionModel(cfg, nc=len(NAMES), verbose=False)
    model.names, model.args = dict(NAMES), get_cfg()
    return model


def _batch(n: int = 2, size: int = 64) -> dict:
    torch.manual_seed(1)
    return {
        "img": torch.rand(n, 3, size, size),
        "bboxes": torch.tensor([[0.5, 0.5, 0.5, 0.25], [0.25, 0.25, 0.125, 0.125]]),
        "batch_idx": torch.tensor([0.0, 1.0]),
        "cls": torch.tensor([[0.0], [2.0]]),
    }


def _one_step(student: DetectionModel, s: UltralyticsAdapter, teacher, cfg: DistillConfig) -> dict:
    """One SGD step of the student and the connectors on the task loss + the terms; returns what it measured."""
    distiller = Distiller(cfg, s, teacher)
    criterion = DistillationCriterion(student.init_criterion(), s, teacher, distiller)
    try:
        batch = _batch()
        params = [*student.parameters(), *distiller.parameters()]
        optimizer = torch.optim.SGD(params, lr=0.01)
        preds = student(batch["img"])
        view = s.view(preds)
        loss, items = criterion(preds, batch)
        # the term alone reaches the backbone and the connectors, never the neck or the head
        _, _, terms = criterion.task_and_terms(preds, batch)
        (term,) = terms.values()
        term.backward(retain_graph=True)
        first_neck = len(student.yaml["backbone"])
        measured = {
            "items": items,
            "loss": loss,
            "shapes": [tuple(f.shape) for f in view.backbone_feats],
            "backbone_grad": student.model[0].conv.weight.grad.abs().sum().item(),
            "neck_grad": sum(
                p.grad.abs().sum().item() for p in student.model[first_neck:].parameters() if p.grad is not None
            ),
            "connector_grad": min(p.grad.abs().sum().item() for p in distiller.parameters() if p.ndim == 4),
            "connectors": {k: tuple(m[0].weight.shape[:2]) for k, m in distiller.feature_parts[0].items()},
            "pairs": distiller.feature_pairs[0],
        }
        optimizer.zero_grad()
        loss.sum().backward()
        optimizer.step()
        assert all(torch.isfinite(p).all() for p in params)
        _, items_after = criterion(student(batch["img"]), batch)  # the hooks still record after a step
        measured["after"] = items_after
    finally:
        criterion.remove()
    return measured


def test_yolo_backbone_stages_are_the_layers_the_neck_reads():
    student = _yolo("yolov8n.yaml", 0)
    assert neck_inputs(student) == [4, 6, 9]
    s = UltralyticsAdapter(student.train())
    assert s.backbone_strides == [8, 16, 32] and s.backbone_channels == [64, 128, 256]
    assert student.training and all(m.training for m in student.modules())  # the probe left the modes as they were
    assert s.view(student(torch.rand(1, 3, 64, 64))).backbone_feats is None  # not recording: nothing extra kept
    handles = s.record_backbone()
    feats = s.view(student(torch.rand(2, 3, 64, 96))).backbone_feats
    assert [tuple(f.shape) for f in feats] == [(2, 64, 8, 12), (2, 128, 4, 6), (2, 256, 2, 3)]
    for h in handles:
        h.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in student.modules())
    assert s.view(student(torch.rand(1, 3, 64, 64))).backbone_feats is None


def test_a_backbone_cwd_term_between_two_yolos_trains_one_step():
    student = _yolo("yolov8n.yaml", 0).train()
    teacher = UltralyticsAdapter(_yolo("yolov8s.yaml", 1).eval().requires_grad_(False))
    m = _one_step(student, UltralyticsAdapter(student), teacher, BACKBONE_CWD)
    assert m["pairs"] == {0: 0, 1: 1, 2: 2}
    assert m["connectors"] == {"0": (128, 64), "1": (256, 128), "2": (512, 256)}  # yolov8n -> yolov8s widths
    assert m["shapes"] == [(2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2)]
    assert torch.isfinite(m["loss"]).all() and m["items"]["kd_cwd"] > 0 and torch.isfinite(m["after"]["kd_cwd"])
    assert m["backbone_grad"] > 0 and m["connector_grad"] > 0 and m["neck_grad"] == 0


def test_a_backbone_cwd_term_from_a_resnet_teacher_pairs_c3_to_c5_and_trains_one_step():
    student = _yolo("yolov8n.yaml", 0).train()
    teacher = TorchvisionAdapter(
        build_model("fasterrcnn_resnet18_fpn", 4).eval().requires_grad_(False), {1: "car", 2: "truck", 3: "bus"}
    )
    assert teacher.backbone_strides == [4, 8, 16, 32]  # C2-C5
    m = _one_step(student, UltralyticsAdapter(student), teacher, BACKBONE_CWD)
    assert m["pairs"] == {0: 1, 1: 2, 2: 3}  # the student's stride-8/16/32 stages with C3, C4, C5
    assert m["connectors"] == {"0": (128, 64), "1": (256, 128), "2": (512, 256)}
    assert torch.isfinite(m["loss"]).all() and m["items"]["kd_cwd"] > 0 and torch.isfinite(m["after"]["kd_cwd"])
    assert m["backbone_grad"] > 0 and m["connector_grad"] > 0 and m["neck_grad"] == 0


def test_a_teacher_without_backbone_stages_is_refused_in_one_line():
    """A two-stage detector on a plain backbone (no separate stages and neck): nothing to pair from: backbone."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=8, padding=1), nn.Conv2d(8, 16, 3, stride=4, padding=1))
    backbone.out_channels = 16
    plain = FasterRCNN(
        backbone,
        num_classes=4,
        rpn_anchor_generator=AnchorGenerator(((32,),), ((1.0,),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
    )
    teacher = TorchvisionAdapter(plain.eval().requires_grad_(False), {1: "car", 2: "truck", 3: "bus"})
    assert teacher.strides == [32] and teacher.backbone_strides == []
    s = UltralyticsAdapter(_yolo("yolov8n.yaml", 0))
    with pytest.raises(DetkdError, match=r"^recipe: distill.feature\[0\] from: backbone needs the teacher's backbone"):
        Distiller(BACKBONE_CWD, s, teacher)
    Distiller(DistillConfig(feature=[FeatureLossConfig(loss="cwd", levels=[2])]), s, teacher)  # from: neck pairs P5


def test_from_is_a_recipe_key_saved_only_when_it_is_not_the_default():
    recipe = load_recipe(None, {"distill": {"feature": [{"loss": "cwd", "from": "backbone"}, {"loss": "pkd"}]}})
    assert [f.from_ for f in recipe.distill.feature] == ["backbone", "neck"]
    saved = recipe.to_dict()["distill"]["feature"]
    assert saved[0]["from"] == "backbone" and "from" not in saved[1] and "from_" not in saved[0]
    assert load_recipe(recipe) == recipe  # a saved recipe reads back the same
    with pytest.raises(DetkdError, match=r"'distill.feature\[0\].from' must be one of neck, backbone, got 'head'"):
        load_recipe(None, {"distill": {"feature": [{"loss": "cwd", "from": "head"}]}})
