"""detkd export: Ultralytics' exporter, offline, then a parity check that catches an export that is not its model;
detkd eval of the exported files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def _student(trained: Path, out: Path, seed: int) -> Path:
    """The trained model with random head biases, saved as an Ultralytics checkpoint.

    After one epoch at 64 px the head still has its initial prior (every box the whole image, every score ~0.002),
    so any two models would "agree"; random box and class biases make the detections distinct boxes and classes
    that only the same weights reproduce. ``seed`` picks another model from the same training.
    """
    from ultralytics import YOLO

    from detkd.ultralytics_internals import checkpoint_dict

    yolo = YOLO(str(trained))
    head = yolo.model.model[-1]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for branch, scale in ((head.cv2, 3.0), (head.cv3, 1.0)):
            for seq in branch:
                seq[-1].bias.copy_(torch.randn(seq[-1].bias.shape, generator=generator) * scale)
    torch.save(checkpoint_dict(yolo.model, {}), out)
    return out


@pytest.fixture(scope="module")
def students(synth_data, tmp_path_factory) -> tuple[Path, Path]:
    """Two 64-px yolov8n checkpoints from one 1-epoch training: the student and another model."""
    from detkd.ultralytics_internals import ultralytics_offline

    ultralytics_offline()
    from ultralytics import YOLO

    root = tmp_path_factory.mktemp("export")
    YOLO("yolov8n.yaml").train(
        data=str(synth_data), epochs=1, imgsz=64, batch=4, workers=0, project=str(root), name="t", val=False
    )
    trained = root / "t" / "weights" / "last.pt"
    return _student(trained, root / "student.pt", seed=0), _student(trained, root / "other.pt", seed=1)


@pytest.fixture(scope="module")
def student_labels(students, synth_data) -> Path:
    """The synthetic val set labelled with the student's own 5 best detections per image (a COCO json beside the
    real one): the student scores a high AP on it, so an export that drifts loses AP visibly, where on the real
    labels a 1-epoch model scores ~0 whatever it outputs."""
    from ultralytics import YOLO

    real = json.loads((synth_data.parent / "annotations" / "instances_val.json").read_text())
    category = {c["name"]: c["id"] for c in real["categories"]}
    yolo = YOLO(str(students[0]))
    annotations = []
    for image in real["images"]:
        (result,) = yolo.predict(str(synth_data.parent / image["file_name"]), imgsz=64, conf=0.001, verbose=False)
        for x0, y0, x1, y1, _, cls in result.boxes.data[:5].tolist():
            box = [x0, y0, x1 - x0, y1 - y0]
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image["id"], "category_id": category[yolo.names[int(cls)]],
                 "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
            )  # fmt: skip
    path = synth_data.parent / "annotations" / "student_val.json"
    path.write_text(json.dumps({**real, "annotations": annotations}))
    return path


@pytest.mark.parametrize("fmt, suffix", [("onnx", ".onnx"), ("torchscript", ".torchscript")])
def test_export_passes_parity_on_the_data(run_detkd, students, student_labels, tmp_path, fmt, suffix):
    student, _ = students
    out = tmp_path / "deploy" / f"student{suffix}"
    proc = run_detkd("export", student, "--format", fmt, "--imgsz", 64, "--data", student_labels, "--out", out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert out.is_file()
    report = json.loads((out.parent / f"student{suffix}.parity.json").read_text())
    assert report["passed"] and report["precision"] == "fp32"
    assert report["images"]["count"] == 8
    assert report["top_detections"]["compared"] == 80  # 10 per image: the student detects on every image
    assert report["top_detections"]["matched"] == 80
    assert report["boxes_px"]["max_abs_diff"] <= 1.0
    assert report["scores"]["max_abs_diff"] < 1e-3
    assert report["ap"]["pytorch"] > 0.5 and abs(report["ap"]["difference"]) <= 0.002
    assert proc.stdout.strip().splitlines()[-1] == "parity: PASS"


def test_export_of_another_model_fails_parity(run_detkd, students, student_labels, tmp_path):
    from detkd.export import export_model

    student, other = students
    impostor = export_model(other, "onnx", imgsz=64, out=tmp_path / "student.onnx")  # the wrong file, renamed
    for data in ([], ["--data", student_labels]):  # built-in synthetic scenes; the data's val images with AP
        proc = run_detkd("export", student, "--check", impostor, "--imgsz", 64, *data)
        assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
        verdict = proc.stdout.strip().splitlines()[-1]
        assert verdict.startswith("parity: FAIL: ") and "top detections have no match" in verdict
        report = json.loads((tmp_path / "student.onnx.parity.json").read_text())
        assert not report["passed"] and report["top_detections"]["matched"] < report["top_detections"]["compared"]
    assert "COCO AP differs by -" in verdict  # the student scores AP 1 on its own labels, the impostor not


def test_eval_of_the_onnx_export_equals_the_checkpoint(run_detkd, students, student_labels, tmp_path):
    from detkd.export import export_model

    student, _ = students
    onnx = export_model(student, "onnx", imgsz=64, out=tmp_path / "student.onnx")
    metrics = {}
    for model in (student, onnx):
        out = tmp_path / f"{model.suffix[1:]}.json"
        proc = run_detkd("eval", "--model", model, "--data", student_labels, "--imgsz", 64, "--out", out)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "AR100" in proc.stdout  # the same 12-number table
        metrics[model.suffix] = json.loads(out.read_text())
    assert metrics[".pt"]["AP"] > 0.5 and abs(metrics[".onnx"]["AP"] - metrics[".pt"]["AP"]) <= 0.002
    assert abs(metrics[".onnx"]["AP50"] - metrics[".pt"]["AP50"]) <= 0.002


def test_openvino_export_passes_parity_evaluates_and_runs_in_speed(run_detkd, students, student_labels, tmp_path):
    pytest.importorskip("openvino")
    from detkd.speed import measure_speed

    student, _ = students
    out = tmp_path / "student_openvino_model"
    proc = run_detkd("export", student, "--format", "openvino", "--imgsz", 64, "--data", student_labels, "--out", out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (out / "student.xml").is_file() and (out / "student.bin").is_file()
    report = json.loads((tmp_path / "student_openvino_model.parity.json").read_text())
    assert report["passed"] and report["top_detections"]["matched"] == report["top_detections"]["compared"] == 80
    assert report["boxes_px"]["max_abs_diff"] <= 1.0 and abs(report["ap"]["difference"]) <= 0.002
    proc = run_detkd("eval", "--model", out, "--data", student_labels, "--imgsz", 64, "--out", tmp_path / "ov.json")
    assert proc.returncode == 0 and "AR100" in proc.stdout, proc.stderr[-2000:]
    assert json.loads((tmp_path / "ov.json").read_text())["AP"] == pytest.approx(report["ap"]["pytorch"], abs=0.002)
    row = measure_speed(out, imgsz=64, batches=(1, 2), frames=6)
    assert row.format == "openvino" and 0 < row.latency_p50_ms <= row.latency_p95_ms and row.images_per_s > 0
    assert row.size_mb > 5  # the fp32 weights of yolov8n (3 M parameters) are in the folder


def test_openvino_int8_is_calibrated_by_nncf_and_reports_its_drop(run_detkd, students, synth_data, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    student, _ = students
    out = tmp_path / "student_int8_openvino_model"
    proc = run_detkd(
        "export", student, "--format", "openvino", "--int8", "--imgsz", 64, "--data", synth_data, "--out", out
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "INFO:nncf" not in proc.stdout + proc.stderr  # NNCF's per-operation log lines are turned down
    report = json.loads((tmp_path / "student_int8_openvino_model.parity.json").read_text())
    assert report["precision"] == "int8" and report["passed"] and report["ap"] is not None
    assert proc.stdout.strip().splitlines()[-1].startswith("parity: int8 export, AP drop ")
    assert "FakeQuantize" in (out / "student.xml").read_text()  # really quantized, not an fp32 model renamed
    assert (out / "student.bin").stat().st_size < 0.5 * 4 * 3.0e6  # int8 weights: well under yolov8n's fp32 size


def test_engine_without_tensorrt_is_one_line(run_detkd, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are here")
    (tmp_path / "m.pt").write_bytes(b"not reached: the format is refused first")
    proc = run_detkd("export", tmp_path / "m.pt", "--format", "engine")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "--format engine needs TensorRT and a CUDA GPU" in proc.stderr


def test_top_detections_are_matched_by_class_and_iou():
    from ultralytics.engine.results import Boxes

    from detkd.export import match_top_detections

    reference = Boxes(
        torch.tensor([[10.0, 10, 40, 40, 0.9, 1], [0, 0, 20, 20, 0.8, 2], [30, 30, 60, 60, 0.7, 3]]), (64, 64)
    )
    candidate = Boxes(
        torch.tensor([[0, 0, 20, 20, 0.5, 0], [10.5, 10, 40, 40.25, 0.88, 1], [30, 30, 60, 60, 0.7, 3]]), (64, 64)
    )
    pairs, compared = match_top_detections(reference, candidate)
    assert compared == 3  # the class-2 box has a twin of class 0 only: unmatched
    assert [box for box, _ in pairs] == [[0.5, 0.0, 0.0, 0.25], [0.0, 0.0, 0.0, 0.0]]
    assert pairs[0][1] == pytest.approx(0.02)


def test_reduced_precision_reports_its_drop_instead_of_failing():
    from detkd.export import ParityReport

    common = dict(model="m.pt", export="m.onnx", imgsz=64, conf=0.001, images="x", image_count=1)
    common.update(compared=10, matched=4)
    boxes = dict(box_max_px=3.0, box_mean_px=1.0, score_max=0.1, score_mean=0.01, ap_pytorch=0.5, ap_export=0.45)
    fp32, fp16 = ParityReport(precision="fp32", **common, **boxes), ParityReport(precision="fp16", **common, **boxes)
    assert not fp32.passed and len(fp32.failures) == 3
    assert fp16.passed and fp16.summary() == "parity: fp16 export, AP drop +0.0500 (reported, not judged)"


def test_a_missing_exported_model_is_one_line(tmp_path):
    from detkd.errors import DetkdError
    from detkd.evaluation import load_yolo_checkpoint

    with pytest.raises(DetkdError, match="OpenVINO model folder not found"):
        load_yolo_checkpoint(tmp_path / "best_openvino_model")
    with pytest.raises(DetkdError, match="checkpoint not found"):
        load_yolo_checkpoint(tmp_path / "best.onnx")
