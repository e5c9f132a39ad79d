"""Weight transfer: every kind of source on real (untrained) Ultralytics models, checked against slices computed here
by hand, and the errors a bad source gives."""

from __future__ import annotations

import json
import re
from copy import deepcopy
from functools import cache

import pytest
import torch

from detkd.data.synth import CLASSES, generate_crops
from detkd.errors import DetkdError
from detkd.transfer import ACTIONS, NOT_IN_BACKBONE, even_indices, report_path, transfer, transfer_weights

COCO_LIKE = {i: f"class{i}" for i in range(80)}


@cache
def _built(cfg: str, nc: int | None):
    from detkd.ultralytics_internals import ultralytics_offline

    ultralytics_offline()
    from ultralytics.nn.tasks import ClassificationModel, DetectionModel

    torch.manual_seed(0)
    model_class = ClassificationModel if "-cls" in cfg else DetectionModel
    return model_class(cfg, nc=nc, verbose=False)


def model(cfg: str, nc: int | None = None):
    """A fresh copy of an untrained model (built once per session: building is the slow part)."""
    return deepcopy(_built(cfg, nc))


def save(model, names: dict[int, str], path):
    """``model`` as an Ultralytics checkpoint, the way ``conftest.save_model_checkpoint`` writes one."""
    model.names = names
    torch.save({"model": model.half(), "train_args": {}, "epoch": -1}, path)
    return path


def run(source, student):
    """``(report, source state dict, student state dict before, student state dict after)``."""
    before = {k: v.clone() for k, v in student.state_dict().items()}
    report = transfer_weights(source, student)
    return report, source.state_dict(), before, student.state_dict()


def run_cfg(source_cfg: str, student_cfg: str, source_nc=None, student_nc=8):
    return run(_built(source_cfg, source_nc), model(student_cfg, student_nc))  # only the student changes


def rows(report):
    return {r.name: r for r in report.rows}


def assert_consistent(report, student_sd):
    """Every student tensor has exactly one row, and the counts add up."""
    assert [r.name for r in report.rows] == list(student_sd)
    assert sum(report.counts.values()) == len(student_sd)
    assert set(report.counts) == set(ACTIONS)


def test_classifier_backbone_is_copied_and_the_rest_untouched():
    report, src, before, after = run_cfg("yolov8n-cls.yaml", "yolov8n.yaml", source_nc=8)
    assert report.kind == "classifier"
    assert_consistent(report, after)
    for name, value in after.items():
        if int(name.split(".")[1]) < 9:  # the backbone: layers 0..8 in both
            assert rows(report)[name].action == "copied" and torch.equal(value, src[name]), name
        else:  # SPPF, neck and Detect keep their initialisation
            assert rows(report)[name].action == "skipped" and rows(report)[name].reason == NOT_IN_BACKBONE
            assert torch.equal(value, before[name]), name
    assert {r.name for r in report.unused if r.reason == "classification head"} == {
        n for n in src if n.startswith("model.9.")
    }
    student = _built("yolov8n.yaml", 8)
    backbone = sum(p.numel() for n, p in student.named_parameters() if int(n.split(".")[1]) < 9)
    total = sum(p.numel() for p in student.parameters())
    assert report.fraction_from_source == pytest.approx(backbone / total)
    assert report.transferred == {n for n, _ in student.named_parameters() if int(n.split(".")[1]) < 9}


def test_wider_classifier_is_selected_with_stride_two_and_bn_statistics_follow():
    report, src, _, after = run_cfg("yolov8s-cls.yaml", "yolov8n.yaml", source_nc=8)
    assert report.kind == "classifier" and report.counts["selected"] > 0
    for name, expected in {
        "model.0.conv.weight": src["model.0.conv.weight"][::2],  # 3 input channels in both
        "model.1.conv.weight": src["model.1.conv.weight"][::2, ::2],
        "model.2.cv2.conv.weight": src["model.2.cv2.conv.weight"][::2, ::2],  # same depth: groups = plain stride
        "model.8.m.0.cv2.conv.weight": src["model.8.m.0.cv2.conv.weight"][::2, ::2],
    }.items():
        assert rows(report)[name].action == "selected"
        assert torch.equal(after[name], expected), name
    for stat in ("weight", "bias", "running_mean", "running_var"):
        name = f"model.1.bn.{stat}"
        assert rows(report)[name].action == "selected" and torch.equal(after[name], src[name][::2])


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo26n.yaml"])
def test_detector_for_other_classes_keeps_box_branch_and_reinitialises_class_head(cfg):
    report, src, before, after = run_cfg(cfg, cfg, source_nc=None, student_nc=8)
    assert report.kind == "detector"
    assert_consistent(report, after)
    by_name, head = rows(report), f"model.{len(_built(cfg, 8).model) - 1}."
    class_branches = ("cv3.", "one2one_cv3.")
    for name, value in after.items():
        row = by_name[name]
        if name.startswith(tuple(head + b for b in class_branches)):
            assert row.action == "reinitialized" and torch.equal(value, before[name]), name
            final = name[len(head) :].split(".")[2] == "2"  # cv3.{level}.2: the class-prediction conv
            assert row.reason == "class head (nc 80 -> 8)" if final else "c3 80 -> 64" in row.reason
        else:  # backbone, neck, box branch (cv2, one2one_cv2) and DFL
            assert row.action == "copied" and torch.equal(value, src[name]), name
    assert any(n.startswith(head + "cv2.") for n in report.names("copied"))
    if cfg.startswith("yolo26"):
        assert any(n.startswith(head + "one2one_cv2.") for n in report.names("copied"))
        assert any(n.startswith(head + "one2one_cv3.") for n in report.names("reinitialized"))
    assert 0 < report.fraction_from_source < 1
    assert report.transferred == {r.name for r in report.rows if r.parameter and r.action == "copied"}


def test_same_architecture_and_class_count_with_other_names_reinitialises_only_the_class_convs():
    source, student = _built("yolov8n.yaml", 8), model("yolov8n.yaml", 8)
    student.names = dict(enumerate(CLASSES))  # the source has placeholder names '0'..'7'
    report, src, _, after = run(source, student)
    assert report.kind == "detector" and report.counts["skipped"] == 0
    assert set(report.names("reinitialized")) == {n for n in after if re.match(r"model\.22\.cv3\.\d\.2\.", n)}
    assert {rows(report)[n].reason for n in report.names("reinitialized")} == {"class head (other class names)"}
    assert rows(report)["model.22.cv3.0.0.conv.weight"].action == "copied"  # same c3: the hidden layers fit

    same_classes = model("yolov8n.yaml", 8)
    assert transfer_weights(source, same_classes).counts["copied"] == len(after)  # a domain transfer takes it all


def test_deeper_larger_detector_maps_first_blocks_and_selects_group_by_group():
    report, src, _, after = run_cfg("yolov8m.yaml", "yolov8n.yaml", student_nc=None)  # m: width 0.75, 2 blocks per C2f
    assert report.kind == "larger"
    assert_consistent(report, after)
    expected = {
        "model.2.m.0.cv1.conv.weight": src["model.2.m.0.cv1.conv.weight"][::3, ::3],
        # cv2 reads [y0, y1, m0, m1] (4 x 48 channels) in m, [y0, y1, m0] (3 x 16) in n: the first 3 groups, step 3
        "model.2.cv2.conv.weight": src["model.2.cv2.conv.weight"][::3, : 3 * 48 : 3],
        # 576 (768 max channels x 0.75) -> 256 does not divide: evenly spaced, rounded
        "model.7.conv.weight": src["model.7.conv.weight"][torch.linspace(0, 575, 256).round().long()][:, ::3],
    }
    for name, value in expected.items():
        assert rows(report)[name].action == "selected" and torch.equal(after[name], value), name
    unused = {r.name: r.reason for r in report.unused}
    assert unused["model.2.m.1.cv1.conv.weight"] == "not in the student"
    assert report.counts["reinitialized"] == 0  # same (placeholder) classes: the class convs are selected too


def test_yolo11_larger_selects_attention_head_by_head():
    report, src, _, after = run_cfg("yolo11s.yaml", "yolo11n.yaml", student_nc=None)
    assert report.kind == "larger" and report.counts["skipped"] == 0
    assert_consistent(report, after)
    attn = "model.10.m.0.attn."  # C2PSA: s has 4 heads of (q 32, k 32, v 64), n has 2: source heads 0 and 2

    def heads_0_and_2(t, per_head):
        return torch.cat([t[:per_head], t[2 * per_head : 3 * per_head]])

    qkv, pe, proj = (src[attn + k] for k in ("qkv.conv.weight", "pe.conv.weight", "proj.conv.weight"))
    v_channels = heads_0_and_2(torch.arange(256), 64)
    assert torch.equal(after[attn + "qkv.conv.weight"], heads_0_and_2(qkv, 128)[:, ::2])
    assert torch.equal(after[attn + "qkv.bn.running_var"], heads_0_and_2(src[attn + "qkv.bn.running_var"], 128))
    assert torch.equal(after[attn + "pe.conv.weight"], pe[v_channels])
    assert torch.equal(after[attn + "proj.conv.weight"], proj[::2][:, v_channels])


def test_even_indices_are_an_exact_stride_when_possible():
    assert even_indices(8, 4).tolist() == [0, 2, 4, 6]
    assert even_indices(10, 4).tolist() == [0, 3, 6, 9]


@pytest.mark.parametrize(
    "source, student, message",
    [
        ("yolo11n-cls.yaml", "yolov8n.yaml", "not the student's model family: layer 2 is C3k2, not C2f"),
        ("yolov8n.yaml", "yolo26n.yaml", "not the student's model family: layer 2 is C2f, not C3k2"),
        ("yolo11n.yaml", "yolo26n.yaml", "incompatible detection head"),
        ("yolo11n.yaml", "yolo11s.yaml", "neither the student's architecture nor a larger model"),
    ],
)
def test_wrong_family_is_an_error_naming_the_source(source, student, message):
    with pytest.raises(DetkdError, match=message) as e:
        transfer_weights(_built(source, 8 if "-cls" in source else None), _built(student, None))
    assert str(e.value).startswith(source)


def test_bad_source_files_are_one_line_errors(tmp_path):
    with pytest.raises(DetkdError, match="not found") as e:
        transfer(tmp_path / "missing.pt", "yolov8n.yaml", tmp_path / "out.pt")
    assert str(tmp_path / "missing.pt") in str(e.value)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(DetkdError, match="not an Ultralytics checkpoint") as e:
        transfer(junk, "yolov8n.yaml", tmp_path / "out.pt")
    assert str(e.value).startswith(str(junk)) and "\n" not in str(e.value)
    classifier = tmp_path / "cls.pt"
    save(model("yolov8n-cls.yaml", 8), dict(enumerate(CLASSES)), classifier)
    with pytest.raises(DetkdError, match="give the data"):  # a classifier's classes are not the detector's
        transfer(classifier, "yolov8n.yaml", tmp_path / "out.pt")
    with pytest.raises(DetkdError, match="cannot be a 'detector' source"):
        transfer(classifier, "yolov8n.yaml", tmp_path / "out.pt", names=list(CLASSES), kind="detector")
    assert not (tmp_path / "out.pt").exists()


def test_transfer_writes_a_checkpoint_ultralytics_loads_and_trains_from(tmp_path):
    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import intersect_dicts

    source = save(model("yolov8n.yaml"), COCO_LIKE, tmp_path / "coco.pt")
    data = tmp_path / "data.yaml"
    data.write_text(f"names: {list(CLASSES)}\n")
    out = tmp_path / "student.pt"
    report = transfer(source, "yolov8n.yaml", out, data=data)

    loaded = YOLO(str(out))
    assert loaded.names == dict(enumerate(CLASSES))
    out_sd, src_sd = loaded.model.state_dict(), torch.load(source, weights_only=False)["model"].state_dict()
    for name in report.names("copied"):
        assert torch.equal(out_sd[name].float(), src_sd[name].float()), name
    # what YOLO(out).train(data=...) does: a model built for the data's classes loads every tensor of ours
    fresh = model("yolov8n.yaml", len(CLASSES)).state_dict()
    assert len(intersect_dicts(out_sd, fresh)) == len(fresh)

    saved = json.loads(report_path(out).read_text())
    assert report_path(out) == tmp_path / "student.transfer.json"
    assert saved["counts"] == report.counts and sum(saved["counts"].values()) == len(out_sd)
    assert saved["fraction_from_source"] == pytest.approx(report.fraction_from_source)
    assert saved["source"] == str(source) and saved["kind"] == "detector"
    assert "class head (nc 80 -> 8)" in report.format()


def test_crops_are_a_classification_folder_and_deterministic(tmp_path):
    a = generate_crops(tmp_path / "a", train=2, val=1, seed=3, imgsz=32)
    b = generate_crops(tmp_path / "b", train=2, val=1, seed=3, imgsz=32)
    c = generate_crops(tmp_path / "c", train=2, val=1, seed=4, imgsz=32)
    for split, n in (("train", 2), ("val", 1)):
        assert sorted(p.name for p in (a / split).iterdir()) == sorted(CLASSES)
        files = sorted((a / split).rglob("*.jpg"))
        assert len(files) == n * len(CLASSES)
        assert all((b / f.relative_to(a)).read_bytes() == f.read_bytes() for f in files)
    assert any((c / f.relative_to(a)).read_bytes() != f.read_bytes() for f in (a / "train").rglob("*.jpg"))
