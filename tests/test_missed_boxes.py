"""``distill.pseudo``: the teacher's confident detections that no label overlaps join a labeled batch's task loss as
``L(labels) + weight · (L(labels + missed) − L(labels))``; and a run with it and a ``from: backbone`` term."""

from __future__ import annotations

import csv

import pytest
import torch

from detkd.adapters.ultralytics import UltralyticsAdapter
from detkd.config import DistillConfig, FeatureLossConfig, LogitLossConfig, PseudoConfig
from detkd.distiller import Distiller
from detkd.engine.criterion import DistillationCriterion, with_missed_boxes
from detkd.errors import DetkdError
from detkd.ultralytics_internals import ultralytics_offline

ultralytics_offline()
from ultralytics.cfg import get_cfg  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

NAMES = {0: "car", 1: "truck", 2: "bus"}


def test_only_pseudo_boxes_that_overlap_no_label_of_their_image_join_the_labels():
    batch = {  # image 0: one label (a car), image 1: none
        "img": torch.zeros(2, 3, 64, 128),
        "batch_idx": torch.tensor([0.0]),
        "cls": torch.tensor([[0.0]]),
        "bboxes": torch.tensor([[0.25, 0.5, 0.25, 0.5]]),  # xyxy (0.125, 0.25, 0.375, 0.75): area 0.125
    }
    pseudo = (
        torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0]),
        torch.tensor([[0.0], [2.0], [1.0], [0.0], [0.0]]),
        torch.tensor(
            [
                [0.25, 0.5, 0.25, 0.4],  # the label's car, drawn a bit shorter: IoU 0.8 -> the same object
                [0.25, 0.55, 0.25, 0.5],  # under another class (bus), IoU 0.818: labeled, not missed
                [0.3125, 0.5, 0.25, 0.5],  # shifted by a quarter of its width: IoU 0.6 -> the same object
                [0.25, 0.5, 0.25, 0.5],  # exactly the car's box, on image 1, which has no label: missed
                [0.75, 0.5, 0.2, 0.2],  # beside the car on image 0: IoU 0 -> missed
            ]
        ),
    )
    merged, added = with_missed_boxes(batch, pseudo)
    assert added == 2
    assert merged["batch_idx"].tolist() == [0.0, 0.0, 1.0]  # image by image, as Ultralytics' loss reads them
    assert merged["cls"].view(-1).tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(merged["bboxes"], torch.cat((batch["bboxes"], pseudo[2][[4, 3]])))
    assert merged["img"] is batch["img"]
    # IoU 0.6 is a miss at a stricter bound
    assert with_missed_boxes(batch, pseudo, iou=0.7)[1] == 3
    nothing = (torch.zeros(0), torch.zeros(0, 1), torch.zeros(0, 4))
    assert with_missed_boxes(batch, nothing)[1] == 0


def _model(cfg: str, seed: int) -> DetectionModel:
    torch.manual_seed(seed)
    m = DetectionModel(cfg, nc=len(NAMES), verbose=False)
    m.names, m.args = dict(NAMES), get_cfg()
    return m


def _batch() -> dict:
    torch.manual_seed(2)
    return {
        "img": torch.rand(2, 3, 64, 64),
        "bboxes": torch.tensor([[0.5, 0.5, 0.5, 0.25], [0.25, 0.25, 0.125, 0.125]]),
        "batch_idx": torch.tensor([0.0, 1.0]),
        "cls": torch.tensor([[0.0], [2.0]]),
    }


@pytest.fixture(scope="module")
def pair():
    student, teacher = _model("yolov8n.yaml", 0).train(), _model("yolov8s.yaml", 1).eval().requires_grad_(False)
    return student, UltralyticsAdapter(student), UltralyticsAdapter(teacher)


def _terms(pair, pseudo: PseudoConfig | None, batch: dict) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """(the criterion's loss, its items, the preds' plain task loss summed) on ``batch``."""
    student, s, t = pair
    cfg = DistillConfig(
        feature=[FeatureLossConfig(loss="cwd")],
        logit=LogitLossConfig(weight=1.0, locations="positives"),  # reads the assignment
        pseudo=pseudo,
    )
    criterion = DistillationCriterion(student.init_criterion(), s, t, Distiller(cfg, s, t))
    try:
        preds = student(batch["img"])
        loss, items = criterion(preds, batch)
        plain = student.init_criterion()(preds, batch)[0].sum()
    finally:
        criterion.remove()
    return loss, items, plain


def test_missed_boxes_change_the_task_loss_by_their_weight(pair):
    student, s, t = pair
    batch = _batch()
    # an untrained teacher scores ~1e-3 everywhere: a low threshold makes its best detections boxes
    c = PseudoConfig(conf=1e-3, weight=0.5)
    criterion = DistillationCriterion(student.init_criterion(), s, t, Distiller(DistillConfig(pseudo=c), s, t))
    try:
        boxes = criterion.pseudo_boxes(t(batch["img"]), batch["img"], c.conf)
    finally:
        criterion.remove()
    # the labels also hold the teacher's first box of image 0: that one (and any it overlaps) is not missed
    first = int((boxes[0] == 0).nonzero()[0])
    batch["bboxes"] = torch.cat((batch["bboxes"], boxes[2][first : first + 1]))
    batch["batch_idx"], batch["cls"] = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([[0.0], [1.0], [2.0]])
    batch["bboxes"] = batch["bboxes"][[0, 2, 1]]
    loss, items, plain = _terms(pair, c, batch)

    # independently: the teacher's boxes that no label covers added, Ultralytics' loss on both label sets
    merged, added = with_missed_boxes(batch, boxes)
    assert 0 < added < len(boxes[0])
    with torch.no_grad():
        preds = student(batch["img"])
        completed = student.init_criterion()(preds, merged)[0].sum()
    expected = 0.5 * (completed - plain) / 2  # per image
    assert items["pseudo"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss[:3].sum().item() == pytest.approx(plain.item(), rel=1e-6)  # box, cls, dfl: the labels' own
    assert loss[3].item() == pytest.approx(2 * (items["kd_cwd"] + items["kd_cls"] + items["pseudo"]).item(), rel=1e-5)

    # weight 1: the task loss on the completed labels; the terms read the labels' own assignment
    loss_1, items_1, _ = _terms(pair, PseudoConfig(conf=1e-3, weight=1.0), batch)
    assert (loss_1[:3].sum() + 2 * items_1["pseudo"]).item() == pytest.approx(completed.item(), rel=1e-5)
    _, without, _ = _terms(pair, None, batch)
    assert "pseudo" not in without and items_1["kd_cls"].item() == pytest.approx(without["kd_cls"].item(), rel=1e-6)

    # no detection scores 1: nothing is missed, the term is exactly 0
    _, items_none, _ = _terms(pair, PseudoConfig(conf=1.0, weight=1.0), batch)
    assert items_none["pseudo"].item() == 0.0


def test_missed_boxes_need_a_class_both_know(pair):
    student, s, _ = pair
    other = _model("yolov8n.yaml", 3)
    other.names = {0: "apple", 1: "pear", 2: "plum"}
    with pytest.raises(DetkdError, match=r"^recipe: distill.pseudo needs classes that teacher and student share"):
        Distiller(DistillConfig(pseudo=PseudoConfig()), s, UltralyticsAdapter(other.eval()))


def test_a_run_with_missed_boxes_and_a_backbone_term_logs_both_and_saves_a_plain_student(
    synth_data, teacher_checkpoint, tmp_path
):
    from detkd.config import load_recipe
    from detkd.engine import distill
    from detkd.evaluation import load_yolo_checkpoint

    best = distill(
        None,
        teacher=str(teacher_checkpoint),
        data=str(synth_data),
        distill={"feature": [{"loss": "cwd", "from": "backbone"}], "pseudo": {"conf": 0.001}},
        epochs=1,
        imgsz=64,
        batch=8,
        workers=0,
        plots=False,
        val=False,
        project=str(tmp_path / "runs"),
        name="b",
    )
    run = best.parent.parent
    (row,) = list(csv.DictReader((run / "results.csv").open()))
    row = {k.strip(): v.strip() for k, v in row.items()}
    assert float(row["train/kd_cwd"]) > 0 and abs(float(row["train/pseudo"])) > 0
    saved = load_recipe(run / "distill.yaml")
    assert saved.distill.feature[0].from_ == "backbone" and saved.distill.pseudo == PseudoConfig(conf=0.001)
    model = load_yolo_checkpoint(run / "weights" / "last.pt").model
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())  # a plain student
