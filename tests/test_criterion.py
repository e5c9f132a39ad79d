"""The distillation criterion: Ultralytics' loss plus the distiller's terms, a non-finite term dropped and counted."""

import torch

from detkd.adapters.ultralytics import UltralyticsAdapter, detect_head
from detkd.config import DistillConfig, FeatureLossConfig, LogitLossConfig
from detkd.distiller import Distiller
from detkd.engine.criterion import DistillationCriterion
from detkd.ultralytics_internals import ultralytics_offline

ultralytics_offline()
from ultralytics.cfg import get_cfg  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

NAMES = {0: "car", 1: "truck", 2: "bus"}


def _model(cfg: str, seed: int) -> DetectionModel:
    torch.manual_seed(seed)
    m = DetectionModel(cfg, nc=len(NAMES), verbose=False)
    m.names, m.args = dict(NAMES), get_cfg()
    return m


def test_a_nonfinite_term_is_dropped_from_the_step_and_counted():
    student, teacher = _model("yolov8n.yaml", 0).train(), _model("yolov8s.yaml", 1).eval().requires_grad_(False)
    with torch.no_grad():  # the teacher's P5 neck block computes NaN; P3 comes before it and stays finite
        for p in teacher.model[detect_head(teacher).f[2]].parameters():
            p.fill_(float("nan"))
    s, t = UltralyticsAdapter(student), UltralyticsAdapter(teacher)
    cfg = DistillConfig(
        feature=[FeatureLossConfig(loss="cwd", levels=[0]), FeatureLossConfig(loss="fitnet", levels=[2])]
    )
    criterion = DistillationCriterion(student.init_criterion(), s, t, Distiller(cfg, s, t))
    batch = {
        "img": torch.rand(2, 3, 64, 64),
        "bboxes": torch.tensor([[0.5, 0.5, 0.5, 0.25], [0.25, 0.25, 0.125, 0.125]]),
        "batch_idx": torch.tensor([0.0, 1.0]),
        "cls": torch.tensor([[0.0], [2.0]]),
    }
    try:
        for step in (1, 2):
            loss, items = criterion(student(batch["img"]), batch)
            assert criterion.nonfinite == {"kd_fitnet": step}  # counted per batch, reported each epoch
            assert items["kd_fitnet"] == 0 and items["kd_cwd"] > 0
            assert torch.isfinite(loss).all()
            # the distillation entry is the finite terms alone, as Ultralytics scales its own (× batch size)
            assert loss[-1].item() == (items["kd_cwd"] * 2).item()
            student.zero_grad()
            loss.sum().backward()
            assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    finally:
        criterion.remove()


def test_the_students_assignment_reaches_the_terms_in_pixels():
    """The assigner's targets (Ultralytics' output order, read in one place) arrive named: positives, IoU-aware
    class targets, and target boxes in input pixels that match the batch's labels."""
    student, teacher = _model("yolov8n.yaml", 0).train(), _model("yolov8s.yaml", 1).eval().requires_grad_(False)
    s, t = UltralyticsAdapter(student), UltralyticsAdapter(teacher)
    gated = LogitLossConfig(weight=1.0, locations="all", gate="teacher_better")
    criterion = DistillationCriterion(student.init_criterion(), s, t, Distiller(DistillConfig(logit=gated), s, t))
    batch = {
        "img": torch.rand(2, 3, 64, 64),
        "bboxes": torch.tensor([[0.5, 0.5, 0.5, 0.25], [0.25, 0.25, 0.125, 0.125]]),  # xywh, normalised
        "batch_idx": torch.tensor([0.0, 1.0]),
        "cls": torch.tensor([[0.0], [2.0]]),
    }
    try:
        loss, items = criterion(student(batch["img"]), batch)
        assigned = criterion._assigned
        assert assigned.fg_mask.any() and torch.isfinite(items["kd_cls"])
        boxes = {tuple(b.tolist()) for b in assigned.boxes[assigned.fg_mask]}
        assert boxes <= {(16.0, 24.0, 48.0, 40.0), (12.0, 12.0, 20.0, 20.0)}  # the two labels, xyxy pixels
        scores = assigned.scores[assigned.fg_mask]
        assert scores.shape[-1] == 3 and (scores.sum(-1) > 0).all() and scores.max() <= 1
    finally:
        criterion.remove()
