"""torchvision teachers by name (``teacher: torchvision:ARCH`` + ``teacher_weights``), and ``detkd teacher train``:
one epoch on a handful of 64 px synthetic scenes writes a checkpoint that ``create_teacher`` loads, ``detkd eval``
evaluates and ``detkd train frcnn`` distils from, with the second-stage terms as results columns."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest
import torch
from conftest import detkd_env

from detkd.adapters import TorchvisionAdapter, check_teacher, create_teacher
from detkd.adapters.torchvision import build_model, coco_names
from detkd.errors import DetkdError
from detkd.teacher_train import LetterboxedDetections, lr_factor

ARCH = "fasterrcnn_resnet18_fpn"


def _detkd(*args, cwd, timeout=300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "detkd.cli", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=detkd_env(), capture_output=True, text=True, timeout=timeout)


def test_named_teacher_loads_a_torchvision_state_dict_and_refuses_what_it_cannot(tmp_path, monkeypatch):
    torch.manual_seed(0)
    state = build_model(ARCH, 91).state_dict()
    torch.save(state, tmp_path / "coco_state.pt")
    teacher = create_teacher(f"torchvision:{ARCH}", weights=tmp_path / "coco_state.pt")
    assert isinstance(teacher, TorchvisionAdapter) and teacher.names == coco_names()
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    torch.testing.assert_close(
        teacher.model.state_dict()["roi_heads.box_predictor.cls_score.weight"],
        state["roi_heads.box_predictor.cls_score.weight"],
    )

    with pytest.raises(DetkdError, match=rf"^teacher: torchvision:{ARCH} needs teacher_weights: FILE \(a torchvision"):
        check_teacher(f"torchvision:{ARCH}")
    with pytest.raises(DetkdError, match=r"^torchvision:fasterrcnn_resnet7_fpn: unknown architecture"):
        create_teacher("torchvision:fasterrcnn_resnet7_fpn", weights=tmp_path / "coco_state.pt")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(DetkdError, match=r"^COCO_V1: detkd never downloads weights; put the file from https://\S+ at"):
        check_teacher("torchvision:fasterrcnn_resnet50_fpn_v2", "COCO_V1")
    torch.save(build_model(ARCH, 4).state_dict(), tmp_path / "four.pt")
    with pytest.raises(
        DetkdError, match=r"four.pt: 3 classes, not COCO's 90 columns: .*write a detkd teacher checkpoint"
    ):
        create_teacher(f"torchvision:{ARCH}", weights=tmp_path / "four.pt")
    with pytest.raises(
        DetkdError, match=r"^teacher_weights: .*coco_state.pt is for a named teacher \(torchvision:ARCH\)"
    ):
        create_teacher(tmp_path / "coco_state.pt", weights=tmp_path / "coco_state.pt")


def test_train_with_a_named_teacher_without_weights_is_one_line(few_scenes, tmp_path):
    result = _detkd("train", "frcnn", f"teacher=torchvision:{ARCH}", f"data={few_scenes}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"detkd: error: teacher: torchvision:{ARCH} needs teacher_weights: FILE (a torchvision state dict; detkd "
        "never downloads weights)"
    ]


def test_letterboxed_targets_follow_the_image_and_its_flip(coco_json):
    from detkd.data import load_data

    dataset = load_data(coco_json)  # image 42 is 48 x 32: resized to 64 x 43 (x by 64/48, y by 43/32), 10 px grey above
    labels = {1: 1, 3: 2, 90: 3}
    index = next(i for i, im in enumerate(dataset.images) if im.id == 42)
    image, target = LetterboxedDetections(dataset, labels, 64)[index]
    assert image.shape == (3, 64, 64) and image.min() >= 0 and image.max() <= 1
    assert image[:, 0, 0].mul(255).round().tolist() == [114.0] * 3  # the grey band
    rx, ry, top = 64 / 48, 43 / 32, 10
    expected = torch.tensor([[30.125 * rx, 4.0 * ry + top, 36.125 * rx, 11.0 * ry + top]])  # the crowd box: left out
    torch.testing.assert_close(target["boxes"], expected)
    assert target["labels"].tolist() == [2]
    torch.manual_seed(1)
    flipped = [LetterboxedDetections(dataset, labels, 64, flip=True)[index] for _ in range(8)]
    mirrored = [t for im, t in flipped if torch.equal(im, image.flip(-1))]
    assert 0 < len(mirrored) < 8  # flips half the time
    torch.testing.assert_close(
        mirrored[0]["boxes"], torch.stack([64 - expected[:, 2], expected[:, 1], 64 - expected[:, 0], expected[:, 3]], 1)
    )


def test_learning_rate_warms_up_then_decays_to_its_floor():
    assert lr_factor(0, 10, 100) == pytest.approx(0.001)
    assert lr_factor(5, 10, 100) == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(100, 10, 100) == pytest.approx(0.01)


@pytest.fixture(scope="module")
def few_scenes(tmp_path_factory):
    """8 training and 4 val scenes at 64 px: one batch, so that a teacher epoch and a student epoch are one step."""
    from detkd.data.synth import SynthConfig, generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("few"), train=8, val=4, seed=0, cfg=SynthConfig(imgsz=64))


@pytest.fixture(scope="module")
def trained_teacher(few_scenes, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    args = ["teacher", "train", "--arch", ARCH, "--data", few_scenes, "--epochs", 1, "--imgsz", 64, "--out", out]
    result = _detkd(*args, "--batch", 8, "--workers", 0, "--device", "cpu", cwd=out.parent)
    assert result.returncode == 0, result.stderr
    return out, args, result


def test_fine_tuning_keeps_the_weights_but_the_predictor_and_freezes_backbone_norms(few_scenes, tmp_path):
    """``--weights``: a detector's weights (here COCO-shaped: 91 classes) are fine-tuned: every tensor loaded but
    the box predictor, which starts anew for the data's 8 classes + background; the backbone's batch-norm
    statistics and affine stay as loaded while the rest trains. Weights of another architecture are one line."""
    from detkd.teacher_train import train_teacher

    torch.manual_seed(3)
    coco = build_model(ARCH, 91).state_dict()
    coco["backbone.body.bn1.running_mean"] = torch.rand(64)  # not the init's zeros: a loaded value shows
    torch.save(coco, tmp_path / "coco.pt")
    out = train_teacher(
        ARCH, few_scenes, 1, 64, tmp_path / "ft", batch=8, device="cpu", workers=0, weights=tmp_path / "coco.pt"
    )
    state = torch.load(out.parent / "weights" / "last.pt", weights_only=True)
    tuned = state["model"]
    assert state["settings"]["weights"] == str(tmp_path / "coco.pt")
    assert tuned["roi_heads.box_predictor.cls_score.weight"].shape[0] == 9
    for frozen in ("backbone.body.bn1.running_mean", "backbone.body.layer1.0.bn1.weight"):
        torch.testing.assert_close(tuned[frozen], coco[frozen])
    assert not torch.equal(tuned["backbone.body.conv1.weight"], coco["backbone.body.conv1.weight"])  # trained
    assert not torch.equal(tuned["rpn.head.conv.0.0.weight"], coco["rpn.head.conv.0.0.weight"])
    (tmp_path / "coco.pt").unlink()  # the same command again finds its run done, without the weights file
    again = train_teacher(
        ARCH, few_scenes, 1, 64, tmp_path / "ft", batch=8, device="cpu", workers=0, weights=tmp_path / "coco.pt"
    )
    assert again == out

    torch.save(build_model("fasterrcnn_mobilenet_v3_large_fpn", 91).state_dict(), tmp_path / "other.pt")
    with pytest.raises(DetkdError, match=r"other.pt: weights do not fit the architecture: lacks backbone"):
        train_teacher(ARCH, few_scenes, 1, 64, tmp_path / "bad", weights=tmp_path / "other.pt", device="cpu")


def test_a_backbone_pretrained_on_crops_starts_the_teacher(few_scenes, tmp_path):
    """``detkd teacher backbone`` trains a ResNet-18 classifier on synthetic object crops; ``--backbone-weights``
    starts a teacher's ResNet backbone from it (its fc dropped, its batch norms frozen). A backbone that is not a
    ResNet, or both kinds of weights at once, are one line each."""
    from detkd.teacher_train import train_teacher

    weights = tmp_path / "crops_resnet18.pt"
    args = ("--epochs", 1, "--per-class", 4, "--imgsz", 32, "--batch", 16, "--workers", 0)
    done = _detkd("teacher", "backbone", "--out", weights, *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "epoch 1/1: val top-1 " in done.stdout and f"backbone: {weights}" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crops_resnet18.pt"]  # the crops made for it are gone
    classifier = torch.load(weights, weights_only=True)
    assert classifier["fc.weight"].shape == (8, 512)

    out = train_teacher(ARCH, few_scenes, 1, 64, tmp_path / "t", batch=8, device="cpu", workers=0, backbone=weights)
    state = torch.load(out.parent / "weights" / "last.pt", weights_only=True)
    assert state["settings"]["backbone"] == str(weights) and "weights" not in state["settings"]
    for frozen in ("bn1.running_var", "layer2.0.bn1.bias"):
        torch.testing.assert_close(state["model"][f"backbone.body.{frozen}"], classifier[frozen])
    with pytest.raises(DetkdError, match="--backbone-weights is for ResNet backbones"):
        train_teacher("fasterrcnn_mobilenet_v3_large_fpn", few_scenes, 1, 64, tmp_path / "m", backbone=weights)
    with pytest.raises(DetkdError, match="give --weights .* or --backbone-weights, not both"):
        train_teacher(ARCH, few_scenes, 1, 64, tmp_path / "b", backbone=weights, weights=weights)
    refused = _detkd("teacher", "backbone", "--out", tmp_path / "x.pt", "--arch", "vgg16", cwd=tmp_path)
    assert refused.returncode != 0 and refused.stderr.strip().splitlines()[-1].endswith(
        "crops backbone: arch 'vgg16': one of resnet18, resnet50"
    )


def test_teacher_train_writes_a_checkpoint_that_loads_and_resumes(trained_teacher):
    out, args, result = trained_teacher
    assert "AP @[IoU=0.50:0.95 | area=all | maxDets=100]" in result.stdout
    assert f"teacher: {out / 'teacher.pt'}" in result.stdout
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert len(rows) == 1 and 0 <= float(rows[0]["metrics/mAP50-95(B)"]) <= 1
    assert all(math.isfinite(float(rows[0][k])) for k in ("train/loss_classifier", "train/loss_box_reg"))
    teacher = create_teacher(out / "teacher.pt")
    assert isinstance(teacher, TorchvisionAdapter)
    assert teacher.names == {
        1: "car",
        2: "truck",
        3: "bus",
        4: "motorcycle",
        5: "bicycle",
        6: "person",
        7: "traffic_light",
        8: "stop_sign",
    }
    trained = torch.load(out / "weights" / "last.pt", weights_only=True)["model"]
    torch.testing.assert_close(
        teacher.model.state_dict()["backbone.body.conv1.weight"], trained["backbone.body.conv1.weight"]
    )

    again = _detkd(*args, "--batch", 8, "--workers", 0, "--device", "cpu", cwd=out.parent)
    assert again.returncode == 0 and "is already trained with these settings" in again.stdout
    other = _detkd(*args, "--batch", 4, "--workers", 0, "--device", "cpu", cwd=out.parent)
    assert other.returncode == 2
    assert other.stderr.strip().splitlines() == [
        f"detkd: error: {out / 'weights' / 'last.pt'}: another teacher training (batch 8 (now 4)); choose another "
        "--out or delete it"
    ]


def test_trained_teacher_is_evaluated_and_teaches_a_student_with_second_stage_columns(
    trained_teacher, few_scenes, tmp_path
):
    out, _, _ = trained_teacher
    evaluated = _detkd(
        "eval",
        "--model",
        out / "teacher.pt",
        "--data",
        few_scenes,
        "--imgsz",
        64,
        "--out",
        tmp_path / "eval.json",
        "--device",
        "cpu",
        cwd=tmp_path,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert "AP @[IoU=0.50:0.95 | area=all | maxDets=100]" in evaluated.stdout

    distilled = _detkd(
        "train",
        "frcnn",
        f"teacher={out / 'teacher.pt'}",
        f"data={few_scenes}",
        "epochs=1",
        "imgsz=64",
        "batch=8",
        "workers=0",
        "device=cpu",
        "plots=False",
        "distill.schedule.warmup_epochs=0",
        "distill.schedule.stop_last_epochs=0",  # the recipe's plain finish: its last 10 epochs
        f"project={tmp_path / 'runs'}",
        "name=kd",
        cwd=tmp_path,
    )
    assert distilled.returncode == 0, distilled.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "runs" / "kd" / "results.csv").read_text().splitlines()))
    row = {k.strip(): v for k, v in rows[-1].items()}
    for term in ("train/kd_rcnn_cls", "train/kd_rcnn_box"):
        assert math.isfinite(float(row[term])) and float(row[term]) > 0, term
    best = torch.load(tmp_path / "runs" / "kd" / "weights" / "best.pt", weights_only=False)
    assert type(best["model"]).__name__ == "DetectionModel"  # a plain student checkpoint
