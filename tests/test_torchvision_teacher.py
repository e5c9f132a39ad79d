"""torchvision two-stage teachers: the adapter's view on a letterboxed batch, its second stage at given boxes
against torchvision's own ``roi_heads``, the checkpoint format and its bad inputs, COCO evaluation, and feature
distillation into a YOLO student. Every model is a tiny ResNet-18 FPN built here (nothing is downloaded)."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FasterRCNN

from detkd.adapters import TorchvisionAdapter, UltralyticsAdapter, create_teacher, save_torchvision_teacher
from detkd.adapters.torchvision import build_model, coco_names
from detkd.config import DistillConfig, FeatureLossConfig
from detkd.distiller import Distiller
from detkd.errors import DetkdError
from detkd.ultralytics_internals import ultralytics_offline

NAMES = {1: "car", 2: "truck", 3: "bus"}


def _frcnn(seed: int = 0, num_classes: int = 4) -> FasterRCNN:
    """A resnet18 FPN Faster R-CNN from torchvision's own parts, untrained, frozen."""
    torch.manual_seed(seed)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    return FasterRCNN(backbone, num_classes).eval().requires_grad_(False)


def test_view_levels_line_up_with_the_letterboxed_input():
    teacher = TorchvisionAdapter(_frcnn(), NAMES)
    assert teacher.strides == [4, 8, 16, 32, 64] and teacher.channels == [256] * 5
    assert teacher.backbone_strides == [4, 8, 16, 32] and teacher.backbone_channels == [64, 128, 256, 512]
    images = torch.rand(2, 3, 64, 96)  # letterboxed, not square: the teacher's own resize would change the grid
    view = teacher(images)
    assert [tuple(f.shape[-2:]) for f in view.feats] == [(64 // s, 96 // s) for s in (4, 8, 16, 32)] + [(1, 2)]
    assert [tuple(f.shape[-2:]) for f in view.backbone_feats] == [(64 // s, 96 // s) for s in (4, 8, 16, 32)]
    assert view.cls_logits is None and view.box_ltrb is None and not teacher.dense_head
    anchors_per_cell = teacher.model.rpn.anchor_generator.num_anchors_per_location()[0]
    assert [tuple(o.shape) for o in teacher.objectness(view)] == [
        (2, anchors_per_cell, *f.shape[-2:]) for f in view.feats
    ]

    # the teacher's normalisation is applied: its features equal its backbone on normalised pixels
    mean = torch.tensor(teacher.model.transform.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(teacher.model.transform.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = teacher.model.backbone((images - mean) / std)
    torch.testing.assert_close(view.feats[1], expected["1"])


def test_second_stage_at_given_boxes_equals_torchvisions_roi_heads():
    teacher = TorchvisionAdapter(_frcnn(seed=1), NAMES)
    images = torch.rand(2, 3, 64, 96)
    view = teacher(images)
    boxes = [torch.tensor([[4.0, 4.0, 30.0, 40.0], [10.0, 12.0, 60.0, 50.0]]), torch.tensor([[20.0, 8.0, 90.0, 56.0]])]
    verdict = teacher.second_stage(view, boxes, (64, 96))
    assert verdict.class_logits.shape == (3, 4) and verdict.boxes.shape == (3, 4, 4)

    # torchvision's own second stage on those boxes as proposals, with its thresholds opened so nothing is dropped
    heads = teacher.model.roi_heads
    heads.score_thresh, heads.nms_thresh, heads.detections_per_img = -1.0, 1.0, 1000
    levels = dict(zip(["0", "1", "2", "3", "pool"], view.feats))
    with torch.no_grad():
        found, _ = heads(levels, boxes, [(64, 96)] * 2)
    scores = verdict.class_logits.softmax(-1)
    rows = torch.tensor([0, 0, 1])  # which image each given box belongs to
    for image, result in enumerate(found):
        mine = rows == image
        labels = torch.arange(1, 4).expand(int(mine.sum()), 3)
        expected = sorted(
            zip(
                scores[mine][:, 1:].flatten().tolist(),
                labels.flatten().tolist(),
                verdict.boxes[mine][:, 1:].reshape(-1, 4),
            )
        )
        got = sorted(zip(result["scores"].tolist(), result["labels"].tolist(), result["boxes"]))
        assert len(got) == len(expected) == 3 * int(mine.sum())
        for (s_exp, l_exp, b_exp), (s_got, l_got, b_got) in zip(expected, got):
            assert l_exp == l_got and s_exp == pytest.approx(s_got, abs=1e-6)
            torch.testing.assert_close(b_exp, b_got)


def test_dense_verdict_judges_the_rpns_best_proposal_in_every_cell_of_the_students_levels():
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    teacher = TorchvisionAdapter(_frcnn(seed=3), NAMES)
    images = torch.rand(2, 3, 64, 96)
    view = teacher(images)
    verdict = teacher.dense_verdict(view, [8, 16, 32], (64, 96))
    cells = [(64 // s) * (96 // s) for s in (8, 16, 32)]
    assert verdict.class_logits.shape == (2 * sum(cells), 4) and verdict.boxes.shape == (2 * sum(cells), 4, 4)

    # independently: torchvision's own flattening of the RPN's outputs (its order is its anchors'), decoded by its
    # box coder; per cell of the stride 8/16/32 levels, the proposal of highest objectness over the anchor shapes
    rpn = teacher.model.rpn
    with torch.no_grad():
        objectness, deltas = rpn.head(view.feats)
        anchors = rpn.anchor_generator(ImageList(images, [(64, 96)] * 2), view.feats)
        shapes = rpn.anchor_generator.num_anchors_per_location()[0]
        flat_obj, flat_deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(flat_deltas, anchors).view(2, -1, 4)
    flat_obj = flat_obj.view(2, -1)
    per_level = [shapes * f.shape[-2] * f.shape[-1] for f in view.feats]
    expected = []
    for image in range(2):
        chosen = []
        for level in (1, 2, 3):  # the FPN's stride 8, 16 and 32 levels
            start = sum(per_level[:level])
            obj = flat_obj[image, start : start + per_level[level]].view(-1, shapes)
            boxes = proposals[image, start : start + per_level[level]].view(-1, shapes, 4)
            chosen.append(boxes[torch.arange(len(obj)), obj.argmax(-1)])
        expected.append(torch.cat(chosen).clamp(min=0).minimum(torch.tensor([96.0, 64.0, 96.0, 64.0])))
    judged = teacher.second_stage(view, expected, (64, 96))
    torch.testing.assert_close(verdict.class_logits, judged.class_logits)
    torch.testing.assert_close(verdict.boxes, judged.boxes)

    # a view cut to the second image judges that image's own features
    cut = view.of_images(slice(1, 2))
    alone = teacher(images[1:])
    torch.testing.assert_close(
        teacher.second_stage(cut, expected[1:], (64, 96)).class_logits,
        teacher.second_stage(alone, expected[1:], (64, 96)).class_logits,
    )
    assert cut.two_stage is teacher


def test_detections_are_torchvisions_on_the_unresized_batch():
    teacher = TorchvisionAdapter(_frcnn(seed=2), NAMES)
    teacher.model.roi_heads.score_thresh = 0.0  # an untrained head scores low: keep what it finds
    images = torch.rand(1, 3, 64, 64)
    found = teacher.detections(images)
    model = teacher.model
    model.transform.min_size, model.transform.max_size = (64,), 64  # torchvision's own path, resize a no-op
    with torch.no_grad():
        expected = model(list(images))
    assert len(found[0]["boxes"]) > 0
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(found[0][key], expected[0][key])


def _checkpoint(tmp_path, seed: int = 0, names=NAMES):
    state = _frcnn(seed).state_dict()
    return save_torchvision_teacher(tmp_path / "frcnn.pt", "fasterrcnn_resnet18_fpn", state, names=names, imgsz=64)


def test_checkpoint_round_trip_through_the_teacher_factory(tmp_path):
    path = _checkpoint(tmp_path, seed=3)
    teacher = create_teacher(path)
    assert isinstance(teacher, TorchvisionAdapter) and teacher.names == NAMES
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    reference = _frcnn(seed=3)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(teacher.model.state_dict()[key], value)

    # a state dict file, as torchvision saves one, is read the same way; COCO's 91 columns get COCO's names
    coco = _frcnn(seed=3, num_classes=91).state_dict()
    torch.save(coco, tmp_path / "coco_state.pt")
    path = save_torchvision_teacher(tmp_path / "coco.pt", "fasterrcnn_resnet18_fpn", tmp_path / "coco_state.pt")
    names = create_teacher(path).names
    assert names == coco_names() and len(names) == 80 and names[1] == "person" and 12 not in names  # 12: N/A


def test_bad_torchvision_inputs_fail_with_one_line(tmp_path, monkeypatch):
    state = _frcnn().state_dict()
    with pytest.raises(DetkdError, match="torchvision:fasterrcnn_resnet7_fpn: unknown architecture"):
        save_torchvision_teacher(tmp_path / "t.pt", "fasterrcnn_resnet7_fpn", state, names=NAMES)
    misfit = r"weights do not fit the architecture: lacks backbone\.body\.0\.0\.weight, .* and \d+ more$"
    with pytest.raises(DetkdError, match=misfit):
        save_torchvision_teacher(tmp_path / "t.pt", "fasterrcnn_mobilenet_v3_large_fpn", state, names=NAMES)
    with pytest.raises(DetkdError, match=r"3 classes, not COCO's 90 columns: give their names"):
        save_torchvision_teacher(tmp_path / "t.pt", "fasterrcnn_resnet18_fpn", state)
    with pytest.raises(DetkdError, match="class names must be keyed by class-logit columns 1 ... 3"):
        save_torchvision_teacher(tmp_path / "t.pt", "fasterrcnn_resnet18_fpn", state, names={0: "car"})
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(DetkdError, match=r"COCO_V1: detkd never downloads weights; put the file from https://\S+ at"):
        save_torchvision_teacher(tmp_path / "t.pt", "fasterrcnn_resnet50_fpn_v2", "COCO_V1")
    with pytest.raises(DetkdError, match="COCO_V9: neither a file nor a weights name of fasterrcnn_resnet50_fpn"):
        save_torchvision_teacher(tmp_path / "t.pt", "fasterrcnn_resnet50_fpn", "COCO_V9")
    assert not (tmp_path / "t.pt").exists()

    # a two-stage teacher has no weights for a YOLO student to start from
    from detkd.engine import distill

    init_from_teacher = r"'init.source: teacher' cannot give the student weights: \S+frcnn.pt is not an Ultralytics"
    with pytest.raises(DetkdError, match=init_from_teacher):
        distill("frcnn", teacher=str(_checkpoint(tmp_path)), init={"source": "teacher"}, data=str(tmp_path / "d.yaml"))
    # the recommended recipe's init is optional: a two-stage teacher distils without it
    from detkd.config import InitConfig, load_recipe
    from detkd.engine.api import resolve_teacher

    recommended = load_recipe("recommended", {"teacher": str(_checkpoint(tmp_path))})
    assert recommended.init.optional and resolve_teacher(recommended).init == InitConfig()

    # a checkpoint whose weights were edited after writing: refused when loaded, naming the file
    path = _checkpoint(tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model"]["roi_heads.box_predictor.bbox_pred.weight"] = torch.zeros(8, 1024)
    torch.save(checkpoint, path)
    with pytest.raises(DetkdError, match=r"frcnn.pt: weights do not fit the architecture: misfits .*bbox_pred"):
        create_teacher(path)


def test_feature_terms_teach_a_yolo_student_and_dense_terms_are_refused(tmp_path):
    ultralytics_offline()
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    student = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    student.names = {0: "car", 1: "truck", 2: "bus"}
    s, t = UltralyticsAdapter(student), create_teacher(_checkpoint(tmp_path))
    cfg = DistillConfig(feature=[FeatureLossConfig(loss="cwd"), FeatureLossConfig(loss="fitnet", levels=[0, 1])])
    distiller = Distiller(cfg, s, t)
    assert distiller.level_pairs == {0: 1, 1: 2, 2: 3}  # P3/P4/P5 with the FPN's stride 8/16/32 levels
    images = torch.rand(2, 3, 64, 64)
    student.train()
    terms = distiller(s.view(student(images)), t(images), {"img": images})
    sum(terms.values()).backward()
    assert set(terms) == {"kd_cwd", "kd_fitnet"} and all(torch.isfinite(v) and v > 0 for v in terms.values())
    assert all(p.grad is None for p in t.model.parameters())
    assert student.model[0].conv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.feature_parts[0].parameters())

    sl2 = DistillConfig(feature=[FeatureLossConfig(loss="sl2")])  # weighted by class scores on the teacher's levels
    with pytest.raises(DetkdError, match=r"recipe: distill.feature loss 'sl2' needs the teacher's dense per-anchor "):
        Distiller(sl2, s, t)


def test_eval_gives_the_coco_table_for_a_torchvision_teacher(tmp_path, synth_data, run_detkd):
    from detkd.data.synth import CLASSES

    names = {i + 1: name for i, name in enumerate(CLASSES)}
    state = _frcnn(seed=4, num_classes=len(CLASSES) + 1).state_dict()
    model = save_torchvision_teacher(tmp_path / "teacher.pt", "fasterrcnn_resnet18_fpn", state, names, imgsz=64)
    out = tmp_path / "eval" / "metrics.json"
    result = run_detkd("eval", "--model", model, "--data", synth_data, "--imgsz", 64, "--out", out, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "AP @[IoU=0.50:0.95 | area=all | maxDets=100]" in result.stdout
    metrics = json.loads(out.read_text())
    assert all(-1.0 <= metrics[k] <= 1.0 for k in ("AP", "AP50", "AR100"))
    detections = json.loads(out.with_name("metrics.detections.json").read_text())
    assert detections, "an untrained teacher still returns boxes above its score threshold"
    assert {d["category_id"] for d in detections} <= set(range(len(CLASSES) + 1))
    assert all(d["bbox"][0] >= 0 and d["bbox"][0] + d["bbox"][2] <= 64 + 1e-3 for d in detections)


def test_strides_are_read_off_the_network_not_assumed():
    # MobileNetV3's FPN takes its last two stages, both at stride 32 (its last stage is a 1x1 conv), + a pool level
    teacher = TorchvisionAdapter(build_model("fasterrcnn_mobilenet_v3_large_fpn", 4).eval(), NAMES)
    assert teacher.strides == [32, 32, 64] and teacher.backbone_strides == [32, 32]
