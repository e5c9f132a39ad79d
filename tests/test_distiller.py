"""The distiller pairs levels, anchors and classes correctly, and its terms behave as their definitions say."""

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from detkd import losses
from detkd.adapters.ultralytics import UltralyticsAdapter
from detkd.config import BoxLossConfig, DistillConfig, FeatureLossConfig, LogitLossConfig, ScheduleConfig
from detkd.distiller import (
    Distiller,
    class_pairs,
    gt_boxes_per_image,
    schedule_factor,
    teacher_better_boxes,
    teacher_better_classes,
)
from detkd.errors import DetkdError
from detkd.ultralytics_internals import Assignment, ultralytics_offline

ultralytics_offline()
from ultralytics.nn.tasks import DetectionModel  # noqa: E402
from ultralytics.utils import YAML  # noqa: E402
from ultralytics.utils.checks import check_yaml  # noqa: E402

COCO_NAMES = YAML.load(check_yaml("coco8.yaml"))["names"]
SYNTH = {0: "car", 1: "truck", 2: "bus", 3: "motorcycle", 4: "bicycle", 5: "person", 6: "traffic_light", 7: "stop_sign"}


def _model(cfg: str, names: dict[int, str], seed: int = 0) -> DetectionModel:
    torch.manual_seed(seed)
    m = DetectionModel(cfg, nc=len(names), verbose=False)
    m.names = dict(names)
    return m


def _batch(n=2, size=64):
    return {
        "img": torch.rand(n, 3, size, size),
        "bboxes": torch.tensor([[0.5, 0.5, 0.5, 0.25], [0.25, 0.25, 0.125, 0.125]]),
        "batch_idx": torch.tensor([0.0, 1.0]),
        "cls": torch.tensor([[0.0], [2.0]]),
    }


def test_classes_pair_by_name_across_label_sets():
    s_idx, t_idx = class_pairs(SYNTH, COCO_NAMES)
    assert s_idx == list(range(8))
    assert [COCO_NAMES[i] for i in t_idx] == [
        "car",
        "truck",
        "bus",
        "motorcycle",
        "bicycle",
        "person",
        "traffic light",
        "stop sign",
    ]
    s_idx, t_idx = class_pairs({0: "vehicle", 1: "person"}, COCO_NAMES, {"vehicle": "car"})
    assert (s_idx, t_idx) == ([0, 1], [2, 0])
    with pytest.raises(DetkdError, match="zebra crossing"):
        class_pairs({0: "road"}, COCO_NAMES, {"road": "zebra crossing"})


def test_schedule_warms_up_decays_and_stops():
    cfg = ScheduleConfig(warmup_epochs=2, decay="linear", stop_last_epochs=2)
    # 10 epochs: warm-up over [0, 2), linear decay from 1 at epoch 2 towards 0 at epoch 8, off for the last 2
    assert [schedule_factor(cfg, p, 10) for p in (0, 1, 2, 5, 8, 9.5)] == pytest.approx([0, 0.5, 1, 0.5, 0, 0])
    cosine = ScheduleConfig(decay="cosine")
    assert schedule_factor(cosine, 5, 10) == pytest.approx(0.5)
    assert schedule_factor(cosine, 2.5, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_gt_boxes_come_back_in_pixels_per_image():
    boxes = gt_boxes_per_image(_batch(), 2, (64, 64))
    torch.testing.assert_close(boxes[0], torch.tensor([[16.0, 24.0, 48.0, 40.0]]))
    torch.testing.assert_close(boxes[1], torch.tensor([[12.0, 12.0, 20.0, 20.0]]))


def test_teacher_equal_to_student_gives_zero_imitation_and_stationary_logit_terms():
    model = _model("yolov8n.yaml", SYNTH).eval()
    adapter = UltralyticsAdapter(model)
    cfg = DistillConfig(
        feature=[FeatureLossConfig(loss="cwd"), FeatureLossConfig(loss="pkd")],
        logit=LogitLossConfig(weight=1.0, locations="all"),
        box=BoxLossConfig(weight=1.0, locations="all"),
    )
    distiller = Distiller(cfg, adapter, adapter)
    with torch.no_grad():
        view = adapter.view(model(_batch()["img"]))
    assert distiller.term_names == ["kd_cwd", "kd_pkd", "kd_cls", "kd_box"]
    # PKD needs no connector for equal channels: identical features give exactly zero
    feats = [f.clone().requires_grad_(True) for f in view.feats]
    logits = view.cls_logits.clone().requires_grad_(True)
    boxes = view.box_logits.clone().requires_grad_(True)
    view_s = type(view)(**{**view.__dict__, "feats": feats, "cls_logits": logits, "box_logits": boxes})
    terms = distiller(view_s, view, _batch())
    assert terms["kd_pkd"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["kd_box"].item() == pytest.approx(0.0, abs=1e-6)  # LD: KL of equal distributions
    terms["kd_cls"].backward()
    assert logits.grad.abs().max().item() < 1e-6  # soft-target BCE is at its minimum when student == teacher


def test_gradients_reach_student_and_connectors_only():
    student, teacher = _model("yolov8n.yaml", SYNTH), _model("yolov8s.yaml", COCO_NAMES).eval()
    s, t = UltralyticsAdapter(student), UltralyticsAdapter(teacher)
    cfg = DistillConfig(
        feature=[
            FeatureLossConfig(loss="cwd"),
            FeatureLossConfig(loss="mgd"),
            FeatureLossConfig(loss="fgd"),
            FeatureLossConfig(loss="sl2", connector="mlp"),
        ],
        logit=LogitLossConfig(weight=1.0),
        box=BoxLossConfig(weight=1.0),
    )
    distiller = Distiller(cfg, s, t)
    batch = _batch()
    student.train()
    terms = distiller(s.view(student(batch["img"])), t(batch["img"]), batch)
    sum(terms.values()).backward()
    assert all(torch.isfinite(v) and v > 0 for v in terms.values()), terms
    assert all(p.grad is None for p in teacher.parameters())
    assert student.model[0].conv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in distiller.feature_parts[0].parameters())


def test_decoded_box_distillation_for_heads_without_distributions():
    student, teacher = _model("yolo26n.yaml", SYNTH), _model("yolov8s.yaml", COCO_NAMES).eval()
    s, t = UltralyticsAdapter(student), UltralyticsAdapter(teacher)
    distiller = Distiller(DistillConfig(box=BoxLossConfig(weight=1.0, locations="all")), s, t)
    batch = _batch()
    view_s = s.view(student.train()(batch["img"]))
    assert view_s.box_logits is None
    terms = distiller(view_s, t(batch["img"]), batch)
    assert terms["kd_box"] > 0 and torch.isfinite(terms["kd_box"])


def test_mismatched_strides_refuse_dense_terms():
    student = _model("yolov8n.yaml", SYNTH)
    s = UltralyticsAdapter(student)
    p2_teacher = SimpleNamespace(
        channels=[64, 128, 256, 512], strides=[4, 8, 16, 32], names=COCO_NAMES, dense_head=True
    )
    with pytest.raises(DetkdError, match="equal head strides"):
        Distiller(DistillConfig(logit=LogitLossConfig(weight=1.0)), s, p2_teacher)


def test_positives_weigh_only_the_anchors_the_student_assigner_chose():
    student, teacher = _model("yolov8n.yaml", SYNTH), _model("yolov8s.yaml", SYNTH, seed=1).eval()
    s, t = UltralyticsAdapter(student), UltralyticsAdapter(teacher)
    cfg = DistillConfig(
        logit=LogitLossConfig(weight=1.0, locations="positives"), box=BoxLossConfig(weight=1.0, locations="positives")
    )
    distiller = Distiller(cfg, s, t)
    batch = _batch()
    view_t = t(batch["img"])
    view_s = s.view(student.train()(batch["img"]))
    cls = view_s.cls_logits.detach().requires_grad_(True)
    box = view_s.box_logits.detach().requires_grad_(True)
    view_s = replace(view_s, cls_logits=cls, box_logits=box)
    fg_mask = torch.zeros(cls.shape[:2], dtype=torch.bool)
    fg_mask[0, [3, 70]] = True  # a P3 and a P4 anchor of the 84 at 64 px
    fg_mask[1, 50] = True

    terms = distiller(view_s, view_t, batch, Assignment(fg_mask, torch.zeros_like(cls), torch.zeros(*fg_mask.shape, 4)))
    per_anchor = losses.kd_sigmoid(cls, view_t.cls_logits, reduction="none").sum(-1)
    assert terms["kd_cls"].item() == pytest.approx(per_anchor[fg_mask].mean().item(), rel=1e-6)  # mean over 3
    (terms["kd_cls"] + terms["kd_box"]).backward()
    for grad in (cls.grad, box.grad):
        assert grad[~fg_mask].abs().max() == 0  # anchors the assigner left out carry no weight
        assert (grad[fg_mask].flatten(1).abs().amax(1) > 0).all()
    with pytest.raises(DetkdError, match="'positives' needs the student's assigner"):
        distiller(view_s, view_t, batch)


# the teacher-better gate


def test_teacher_better_classes_compares_each_ones_loss_against_the_labels():
    # anchor 0: a car (target 0.8): teacher logit 3 (BCE 0.25) beats student -1 (BCE 1.11) -> 1
    # anchor 1: background: teacher 2 (BCE 2.13) loses to student -2 (BCE 0.13) -> 0
    # anchor 2: the same logits on both sides: not strictly better -> 0
    s_cls = torch.tensor([[[-1.0], [-2.0], [0.5]]])
    t_cls = torch.tensor([[[3.0], [2.0], [0.5]]])
    targets = torch.tensor([[[0.8], [0.0], [1.0]]])
    assert teacher_better_classes(s_cls, t_cls, targets).tolist() == [[1.0, 0.0, 0.0]]


def test_teacher_better_boxes_compares_overlap_with_the_target():
    target = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]]])
    teacher = torch.tensor([[[0.0, 0.0, 10.0, 9.0], [0.0, 0.0, 5.0, 10.0]]])  # IoU 0.9, 0.5
    student = torch.tensor([[[0.0, 0.0, 10.0, 8.0], [0.0, 0.0, 10.0, 6.0]]])  # IoU 0.8, 0.6
    assert teacher_better_boxes(student, teacher, target).tolist() == [[1.0, 0.0]]


def test_gated_terms_weigh_only_where_the_teacher_is_better():
    student, teacher = _model("yolov8n.yaml", SYNTH), _model("yolov8s.yaml", SYNTH, seed=1).eval()
    s, t = UltralyticsAdapter(student), UltralyticsAdapter(teacher)
    gated = {"weight": 1.0, "locations": "all", "gate": "teacher_better"}
    distiller = Distiller(DistillConfig(logit=LogitLossConfig(**gated), box=BoxLossConfig(**gated)), s, t)
    batch = _batch()
    view_t = t(batch["img"])
    view_s = s.view(student.train()(batch["img"]))
    cls = view_s.cls_logits.detach().requires_grad_(True)
    view_s = replace(view_s, cls_logits=cls)
    g = torch.Generator().manual_seed(0)
    fg_mask = torch.zeros(cls.shape[:2], dtype=torch.bool)
    fg_mask[0, 3] = fg_mask[1, 50] = True
    scores = torch.rand(cls.shape, generator=g) * fg_mask[..., None]  # IoU-aware targets at the positives only
    boxes = view_t.boxes_xyxy(pixels=True) + torch.randn(*cls.shape[:2], 4, generator=g)  # near the teacher's boxes
    assigned = Assignment(fg_mask, scores, boxes)

    terms = distiller(view_s, view_t, batch, assigned)
    open_cls = teacher_better_classes(cls, view_t.cls_logits, scores)
    assert 0 < open_cls.sum() < open_cls.numel()  # a real mix of open and closed anchors
    per_anchor = losses.kd_sigmoid(cls, view_t.cls_logits, reduction="none").sum(-1)
    expected = (per_anchor * open_cls).sum() / open_cls.sum().clamp(min=1)
    assert terms["kd_cls"].item() == pytest.approx(expected.item(), rel=1e-6)
    terms["kd_cls"].backward()
    assert cls.grad[open_cls == 0].abs().max() == 0 and cls.grad[open_cls == 1].abs().amax(-1).gt(0).all()
    # the box gate at positives follows the boxes: the teacher's, jittered, are nearer their targets
    open_box = teacher_better_boxes(view_s.boxes_xyxy(pixels=True), view_t.boxes_xyxy(pixels=True), boxes)
    assert open_box[fg_mask].all()

    # a student equal to its teacher is never beaten: both terms are silent
    same = Distiller(DistillConfig(logit=LogitLossConfig(**gated), box=BoxLossConfig(**gated)), t, t)
    silent = same(view_t, view_t, batch, Assignment(fg_mask, scores, view_t.boxes_xyxy(pixels=True)))
    assert silent["kd_cls"].item() == 0 and silent["kd_box"].item() == 0
    with pytest.raises(DetkdError, match="'gate: teacher_better' needs the student's assigner"):
        distiller(view_s, view_t, batch)
