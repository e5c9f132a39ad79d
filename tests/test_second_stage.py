"""Second-stage distillation from a two-stage teacher: the losses against values worked out by hand, and the
distiller's terms on a yolov8n student with a tiny torchvision Faster R-CNN (ResNet-18 FPN, built here)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torchvision.ops import generalized_box_iou_loss

from detkd import losses
from detkd.adapters import TorchvisionAdapter, UltralyticsAdapter
from detkd.adapters.torchvision import build_model
from detkd.config import BoxLossConfig, DistillConfig, FeatureLossConfig, LogitLossConfig, SecondStageConfig
from detkd.distiller import Distiller, aligned_verdict
from detkd.errors import DetkdError
from detkd.ultralytics_internals import Assignment, ultralytics_offline

ultralytics_offline()
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

TEACHER_NAMES = {1: "car", 2: "truck", 3: "bus"}  # class-logit columns; 0 is background
STUDENT_NAMES = {0: "car", 1: "person", 2: "bus"}  # person: no teacher counterpart


def _bce(logit: float, p: float) -> float:
    q = 1 / (1 + math.exp(-logit))
    return -(p * math.log(q) + (1 - p) * math.log(1 - q))


def test_teacher_probabilities_become_student_class_targets_with_background_and_unknowns_left_out():
    class_logits = torch.log(torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.7, 0.05, 0.05, 0.2]]))  # softmax = those
    s_idx, t_idx = torch.tensor([0, 2]), torch.tensor([1, 3])  # car -> column 1, bus -> column 3
    targets, known = losses.second_stage_targets(class_logits, s_idx, t_idx, 3)
    torch.testing.assert_close(targets, torch.tensor([[0.6, 0.0, 0.1], [0.05, 0.0, 0.2]]))
    assert known.tolist() == [[True, False, True]] * 2
    with pytest.raises(ValueError, match="column 0 is the teacher's background"):
        losses.second_stage_targets(class_logits, torch.tensor([0]), torch.tensor([0]), 3)

    student = torch.tensor([[2.0, 5.0, -1.0], [-3.0, -5.0, 0.5]], requires_grad=True)
    value = losses.second_stage_class_kd(student, targets, known)
    by_hand = (_bce(2.0, 0.6) + _bce(-1.0, 0.1) + _bce(-3.0, 0.05) + _bce(0.5, 0.2)) / 2  # person: no term
    assert value.item() == pytest.approx(by_hand, rel=1e-6)
    value.backward()
    assert student.grad[:, 1].abs().max() == 0  # the unknown class is masked, not pushed towards 0
    sigmoid = torch.sigmoid(student.detach())
    torch.testing.assert_close(student.grad[:, [0, 2]], (sigmoid - targets)[:, [0, 2]] / 2)  # d BCE / d logit

    # weighted by the teacher's confidence: its largest non-background probability, 0.6 (car) and 0.2 (bus)
    refined = torch.arange(2 * 4 * 4, dtype=torch.float32).view(2, 4, 4)
    confidence, box, column = losses.teacher_best(class_logits, refined)
    torch.testing.assert_close(confidence, torch.tensor([0.6, 0.2]))
    assert column.tolist() == [1, 3]
    torch.testing.assert_close(box, torch.stack([refined[0, 1], refined[1, 3]]))  # each box's best class's refinement
    weighted = losses.second_stage_class_kd(student.detach(), targets, known, confidence)
    by_hand = (0.6 * (_bce(2.0, 0.6) + _bce(-1.0, 0.1)) + 0.2 * (_bce(-3.0, 0.05) + _bce(0.5, 0.2))) / 0.8
    assert weighted.item() == pytest.approx(by_hand, rel=1e-6)


def test_iou_aware_targets_scale_each_class_probability_by_the_boxs_iou_with_that_classs_refinement():
    class_logits = torch.log(torch.tensor([[0.1, 0.6, 0.2, 0.1]]))
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    refined = torch.zeros(1, 4, 4)
    refined[0, 1] = torch.tensor([0.0, 0.0, 10.0, 5.0])  # car: half the box, IoU 50 / 100
    refined[0, 3] = torch.tensor([5.0, 0.0, 15.0, 10.0])  # bus: shifted by half, IoU 50 / 150
    refined[0, 2] = torch.tensor([0.0, 0.0, 10.0, 10.0])  # truck: no student class pairs with it
    targets, known = losses.second_stage_targets(
        class_logits, torch.tensor([0, 2]), torch.tensor([1, 3]), 3, boxes=boxes, refined_boxes=refined
    )
    torch.testing.assert_close(targets, torch.tensor([[0.6 * 0.5, 0.0, 0.1 / 3]]))
    assert known.tolist() == [[True, False, True]]
    with pytest.raises(ValueError, match="need both"):
        losses.second_stage_targets(class_logits, torch.tensor([0]), torch.tensor([1]), 3, boxes=boxes)


def test_box_target_is_the_refinement_of_the_teachers_class_weighted_by_its_confidence():
    probs = torch.tensor([[0.1, 0.2, 0.6, 0.1], [0.5, 0.3, 0.1, 0.1]])  # box 0: truck 0.6; box 1: car 0.3
    refined = torch.zeros(2, 4, 4)
    refined[0, 2] = torch.tensor([10.0, 10.0, 30.0, 40.0])
    refined[0, 1] = torch.tensor([0.0, 0.0, 5.0, 5.0])  # another class's refinement: not the target
    refined[1, 1] = torch.tensor([50.0, 0.0, 60.0, 20.0])
    student = torch.tensor([[12.0, 8.0, 28.0, 44.0], [40.0, 2.0, 64.0, 22.0]], requires_grad=True)
    parts = losses.second_stage_box_kd(student, probs.log(), refined, image_size=(64, 80), l1_weight=0.5)

    targets = torch.stack([refined[0, 2], refined[1, 1]])
    w = torch.tensor([0.6, 0.3])
    giou = generalized_box_iou_loss(student.detach(), targets)
    l1 = ((student.detach() - targets).abs() / torch.tensor([80.0, 64.0, 80.0, 64.0])).mean(-1)
    assert parts["giou"].item() == pytest.approx(((w * giou).sum() / w.sum()).item(), rel=1e-6)
    assert parts["l1"].item() == pytest.approx(0.5 * ((w * l1).sum() / w.sum()).item(), rel=1e-6)
    (parts["giou"] + parts["l1"]).backward()
    assert (student.grad.abs().sum(-1) > 0).all()

    empty = losses.second_stage_box_kd(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4, 4), (64, 64))
    assert empty["giou"].item() == 0 and empty["l1"].item() == 0  # no judged box: no term, not NaN


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    student = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    student.names = dict(STUDENT_NAMES)
    teacher = TorchvisionAdapter(build_model("fasterrcnn_resnet18_fpn", 4).eval().requires_grad_(False), TEACHER_NAMES)
    return student, UltralyticsAdapter(student), teacher


def test_teacher_judges_the_students_positives_and_top_anchors_and_teaches_the_student_only():
    student, s, t = _pair()
    cfg = DistillConfig(
        feature=[FeatureLossConfig(loss="pkd")],
        second_stage=SecondStageConfig(cls_weight=2.0, box_weight=0.5, l1_weight=1.0, topk=4),
    )
    distiller = Distiller(cfg, s, t)
    assert distiller.term_names == ["kd_pkd", "kd_rcnn_cls", "kd_rcnn_box"]
    images = torch.rand(2, 3, 64, 64)
    view_t = t(images)
    view_s = s.view(student.train()(images))
    cls = view_s.cls_logits.detach().requires_grad_(True)
    ltrb = view_s.box_ltrb.detach().requires_grad_(True)
    view_s = replace(view_s, cls_logits=cls, box_ltrb=ltrb)
    fg_mask = torch.zeros(cls.shape[:2], dtype=torch.bool)
    fg_mask[0, [3, 70]] = fg_mask[1, 50] = True
    assigned = Assignment(fg_mask, torch.zeros_like(cls), torch.zeros(*fg_mask.shape, 4))
    terms = distiller(view_s, view_t, {"img": images}, assigned)
    assert all(torch.isfinite(v) and v > 0 for v in terms.values()), terms

    # the judged anchors: the positives and each image's 4 anchors of highest class score
    judged = fg_mask.clone()
    judged.scatter_(1, cls.detach().amax(-1).topk(4, dim=1).indices, True)
    assert 4 < judged.sum(1).max() <= 6
    boxes = view_s.boxes_xyxy(pixels=True)
    verdict = t.second_stage(view_t, [b[m] for b, m in zip(boxes.detach(), judged)], (64, 64))
    targets, known = losses.second_stage_targets(verdict.class_logits, torch.tensor([0, 2]), torch.tensor([1, 3]), 3)
    expected = losses.second_stage_class_kd(cls.detach()[judged], targets, known)
    assert terms["kd_rcnn_cls"].item() == pytest.approx(2.0 * expected.item(), rel=1e-5)
    parts = losses.second_stage_box_kd(boxes.detach()[judged], verdict.class_logits, verdict.boxes, (64, 64))
    assert terms["kd_rcnn_box"].item() == pytest.approx(0.5 * (parts["giou"] + parts["l1"]).item(), rel=1e-5)
    aware = Distiller(replace(cfg, second_stage=replace(cfg.second_stage, iou_aware=True)), s, t)
    targets, known = losses.second_stage_targets(
        verdict.class_logits, torch.tensor([0, 2]), torch.tensor([1, 3]), 3, boxes.detach()[judged], verdict.boxes
    )
    expected = 2.0 * losses.second_stage_class_kd(cls.detach()[judged], targets, known)
    assert aware(view_s, view_t, {"img": images}, assigned)["kd_rcnn_cls"].item() == pytest.approx(expected.item())
    weighting = replace(cfg.second_stage, iou_aware=True, teacher_weighted=True)
    weighted = Distiller(replace(cfg, second_stage=weighting), s, t)
    confidence = verdict.class_logits.softmax(-1)[:, 1:].amax(-1)  # by hand, not through teacher_best
    per_box = torch.nn.functional.binary_cross_entropy_with_logits(cls.detach()[judged], targets, reduction="none")
    expected = 2.0 * ((per_box * known).sum(-1) * confidence).sum() / confidence.sum()
    assert weighted(view_s, view_t, {"img": images}, assigned)["kd_rcnn_cls"].item() == pytest.approx(expected.item())

    # positives off: only the top anchors the labels call background are judged (one of them made a positive here)
    silent = Distiller(replace(cfg, second_stage=replace(cfg.second_stage, positives=False)), s, t)
    top = torch.zeros_like(fg_mask).scatter_(1, cls.detach().amax(-1).topk(4, dim=1).indices, True)
    fg = fg_mask.clone()
    fg[0, top[0].nonzero()[0]] = True
    quiet = top & ~fg
    assert quiet.sum(1).tolist()[0] == 3
    said = t.second_stage(view_t, [b[m] for b, m in zip(boxes.detach(), quiet)], (64, 64))
    targets, known = losses.second_stage_targets(said.class_logits, torch.tensor([0, 2]), torch.tensor([1, 3]), 3)
    expected = 2.0 * losses.second_stage_class_kd(cls.detach()[quiet], targets, known)
    value = silent(view_s, view_t, {"img": images}, Assignment(fg, assigned.scores, assigned.boxes))["kd_rcnn_cls"]
    assert value.item() == pytest.approx(expected.item())

    (terms["kd_rcnn_cls"] + terms["kd_rcnn_box"]).backward()
    assert cls.grad[~judged].abs().max() == 0 and ltrb.grad[~judged].abs().max() == 0
    assert (cls.grad[judged][:, [0, 2]].abs().amax(1) > 0).all() and cls.grad[..., 1].abs().max() == 0  # person
    assert (ltrb.grad[judged].abs().amax(1) > 0).all()
    assert all(p.grad is None for p in t.model.parameters())

    # end to end: the gradient reaches the student's first layer
    student.zero_grad()
    terms = distiller(s.view(student(images)), view_t, {"img": images}, assigned)
    (terms["kd_rcnn_cls"] + terms["kd_rcnn_box"]).backward()
    assert student.model[0].conv.weight.grad.abs().sum() > 0

    with pytest.raises(DetkdError, match="distill.second_stage judges the student's positives: it needs the"):
        distiller(view_s, view_t, {"img": images})


def test_dense_logit_and_box_terms_pair_the_students_anchors_with_the_teachers_dense_verdict():
    """A two-stage teacher teaches through the YOLO recipe's dense terms: its dense verdict at the student's anchors
    stands for a dense head (class probabilities as the sigmoid targets, the refined box of its best class)."""
    student, s, t = _pair(seed=1)
    cfg = DistillConfig(logit=LogitLossConfig(weight=2.0), box=BoxLossConfig(weight=1.0))
    distiller = Distiller(cfg, s, t)
    assert distiller.term_names == ["kd_cls", "kd_box"]
    images = torch.rand(2, 3, 64, 64)
    view_t = t(images)
    student.train()
    view_s = s.view(student(images))
    terms = distiller(view_s, view_t, {"img": images})

    verdict = t.dense_verdict(view_t, [8, 16, 32], (64, 64))
    probs = verdict.class_logits.softmax(-1).view(2, -1, 4)  # (images, anchors, background + 3 classes)
    paired = probs[..., [1, 3]]  # car, bus: the classes both know (person has no teacher counterpart)
    weights = paired.amax(-1)  # locations: teacher
    s_cls = view_s.cls_logits.detach()[..., [0, 2]]
    per_anchor = torch.nn.functional.binary_cross_entropy(s_cls.sigmoid(), paired, reduction="none").sum(-1)
    expected = 2.0 * (per_anchor * weights).sum() / weights.sum().clamp(min=1.0)
    assert terms["kd_cls"].item() == pytest.approx(expected.item(), rel=1e-4)

    best = verdict.class_logits[:, 1:].argmax(-1) + 1
    target = verdict.boxes[torch.arange(len(best)), best].view(2, -1, 4) / view_s.stride_tensor  # grid units
    parts = losses.box_distill(view_s.boxes_xyxy().detach(), target, weights=weights, iou_weight=1.0, l1_weight=1.0)
    assert terms["kd_box"].item() == pytest.approx((parts["giou"] + parts["l1"]).item(), rel=1e-4)

    sum(terms.values()).backward()
    assert student.model[0].conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in t.model.parameters())


def test_aligned_verdict_keeps_the_teachers_view_only_at_the_cells_the_task_aligned_assigner_picks():
    """One object (the verdict's detection at cell 0) over a stride-8 row of 12 cells: TAL's candidates are the
    cells whose centres lie inside it (0 and 1; fewer than its top 10, so both), each aligned as p^0.5 · CIoU^6 and
    the best keeps the verdict's probabilities, the other is scaled by its alignment relative to the best's."""
    from torchvision.ops import complete_box_iou

    points = torch.stack((torch.arange(4.0, 96, 8), torch.full((12,), 4.0)), -1)
    obj = torch.tensor([0.0, 0.0, 16.0, 8.0])
    boxes = torch.stack([obj, torch.tensor([4.0, 0.0, 16.0, 8.0])] + [obj + 16] * 10)[None]
    foreground = torch.cat((torch.tensor([[0.8, 0.1], [0.4, 0.3], [0.05, 0.9]]), torch.zeros(9, 2)))[None]
    probs = torch.cat((1 - foreground.sum(-1, keepdim=True), foreground), -1)
    columns = torch.tensor([[1, 1, 2] + [1] * 9])  # class-logit columns of each cell's best class
    sharp = aligned_verdict(probs, boxes, columns, [torch.tensor([0])], points, [8])

    ciou = complete_box_iou(obj[None], boxes[0, :2])[0]
    metric = foreground[0, :2, 0].sqrt() * ciou.pow(6)
    expected = torch.zeros(12, 2)
    expected[:2] = foreground[0, :2] * (metric / metric.max())[:, None]
    torch.testing.assert_close(sharp[0, :, 1:], expected)
    torch.testing.assert_close(sharp[0, :, 0], 1 - expected.sum(-1))
    assert sharp[0, 0, 1] == 0.8 and 0 < sharp[0, 1, 1] < 0.1  # the exact box as it is; the loose one, far lower
    nothing = aligned_verdict(probs, boxes, columns, [torch.tensor([], dtype=torch.long)], points, [8])
    assert nothing[..., 1:].abs().max() == 0  # no detection: background everywhere
    # a batch: an image without detections beside this one leaves its own verdict as computed alone
    none_then_one = [torch.tensor([], dtype=torch.long), torch.tensor([0])]
    twice = (x.repeat(2, *[1] * (x.dim() - 1)) for x in (probs, boxes, columns))
    pair = aligned_verdict(*twice, none_then_one, points, [8])
    assert pair[0, :, 1:].abs().max() == 0
    torch.testing.assert_close(pair[1], sharp[0])


def test_kept_detections_are_the_roi_heads_own_choice():
    _, _, t = _pair()
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [1, 0, 11, 10], [30, 30, 40, 40], [0, 0, 10, 10.0]])
    boxes = torch.cat((boxes, torch.tensor([[50, 50, 60, 60], [20, 20, 20.005, 30]])))
    scores = torch.tensor([0.6, 0.9, 0.7, 0.3, 0.04, 0.05, 0.8])
    labels = torch.tensor([1, 1, 2, 1, 1, 1, 3])
    # 1 suppresses 0 (same class, IoU 0.82); 2 survives (another class); 4 and 5 are not above the score threshold
    # (0.05); 6 is narrower than 0.01 px
    assert t.kept_detections(boxes, scores, labels).tolist() == [1, 2, 3]
    t.model.roi_heads.detections_per_img = 2
    assert t.kept_detections(boxes, scores, labels).tolist() == [1, 2]


def test_the_aligned_dense_verdict_is_what_the_dense_terms_read():
    student, s, t = _pair(seed=2)
    cfg = DistillConfig(logit=LogitLossConfig(weight=1.0), second_stage=SecondStageConfig(dense="aligned"))
    images = torch.rand(2, 3, 64, 64)
    view_t = t(images)
    student.train()
    view_s = s.view(student(images))
    value = Distiller(cfg, s, t)(view_s, view_t, {"img": images})["kd_cls"]

    verdict = t.dense_verdict(view_t, [8, 16, 32], (64, 64))
    probs = verdict.class_logits.softmax(-1).view(2, -1, 4)
    confidence, best = probs[..., 1:].max(-1)
    boxes = verdict.boxes.view(2, -1, 4, 4).gather(2, (best + 1)[..., None, None].expand(-1, -1, 1, 4)).squeeze(2)
    kept = [t.kept_detections(*image) for image in zip(boxes, confidence, best + 1)]
    assert sum(map(len, kept)) > 0  # an untrained teacher's near-uniform softmax passes the 0.05 threshold
    points = view_s.anchor_points * view_s.stride_tensor
    # the wiring (the values of aligned_verdict itself are derived independently above)
    paired = aligned_verdict(probs, boxes, best + 1, kept, points, [8, 16, 32])[..., [1, 3]]
    assert 0 < (paired.amax(-1) > 0).sum() < paired.shape[0] * paired.shape[1]  # the cells left are background
    weights = paired.amax(-1)
    s_cls = view_s.cls_logits.detach()[..., [0, 2]]
    per_anchor = torch.nn.functional.binary_cross_entropy(s_cls.sigmoid(), paired, reduction="none").sum(-1)
    expected = (per_anchor * weights).sum() / weights.sum().clamp(min=1.0)
    assert value.item() == pytest.approx(expected.item(), rel=1e-4)


def test_terms_the_teacher_cannot_feed_are_refused_with_one_line():
    _, s, t = _pair()
    coarse = TorchvisionAdapter(build_model("fasterrcnn_mobilenet_v3_large_fpn", 4).eval(), TEACHER_NAMES)
    with pytest.raises(DetkdError, match=r"^recipe: distill.logit pairs .* none at \[8, 16\] \(teacher strides"):
        Distiller(DistillConfig(logit=LogitLossConfig(weight=1.0)), s, coarse)
    yolo_teacher = UltralyticsAdapter(DetectionModel("yolov8n.yaml", nc=3, verbose=False).eval())
    single_stage = r"^recipe: distill.second_stage needs a two-stage teacher's second stage \(RoI head\) .*Detection"
    with pytest.raises(DetkdError, match=single_stage):
        Distiller(DistillConfig(second_stage=SecondStageConfig(box_weight=1.0)), s, yolo_teacher)
    with pytest.raises(DetkdError, match=r"^recipe: distill.second_stage.dense shapes a two-stage teacher's dense"):
        Distiller(DistillConfig(second_stage=SecondStageConfig(dense="aligned")), s, yolo_teacher)
    with pytest.raises(DetkdError, match=r"^recipe: distill.second_stage.dense shapes what .* neither has a weight"):
        Distiller(DistillConfig(second_stage=SecondStageConfig(dense="aligned", box_weight=1.0)), s, t)
    no_shared = {1: "boat", 2: "kite", 3: "train"}
    t_other = TorchvisionAdapter(t.model, no_shared)
    with pytest.raises(DetkdError, match="needs classes that teacher and student share"):
        Distiller(DistillConfig(second_stage=SecondStageConfig(cls_weight=1.0)), s, t_other)
