"""tools/deploy_report.py end to end on tiny settings: exports with their parity reports, the speed table, the video
runs compared with it, written as deploy.md and deploy.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from detkd.data.synth import CLASSES
from tests.conftest import detkd_env, save_model_checkpoint

TOOL = Path(__file__).resolve().parent.parent / "tools" / "deploy_report.py"
SIZE, FRAMES = 64, 10


def _run(tmp_path: Path, *args) -> subprocess.CompletedProcess:
    command = [sys.executable, str(TOOL), *map(str, args)]
    return subprocess.run(command, cwd=tmp_path, env=detkd_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture
def models(tmp_path) -> tuple[Path, Path]:
    """Untrained student (yolov8n) and teacher (yolov8s): the report's mechanics, not its accuracy."""
    names = dict(enumerate(CLASSES))
    return (
        save_model_checkpoint("yolov8n.yaml", names, tmp_path / "student.pt"),
        save_model_checkpoint("yolov8s.yaml", names, tmp_path / "teacher.pt", seed=1),
    )


def test_deploy_report_exports_checks_times_and_runs_the_video(models, synth_data, tmp_path):
    from detkd.data.footage import write_footage

    student, teacher = models
    footage, _, _ = write_footage(tmp_path / "clip.mp4", FRAMES, SIZE, fps=10, seed=0)
    proc = _run(
        tmp_path, student, teacher, "--data", synth_data, "--footage", footage, "--imgsz", SIZE, "--out", "rep",
        "--formats", "onnx", "--frames", 5, "--threads", 1,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "rep" / "deploy.json").read_text())
    models_ = {(m["role"], m["label"]): m for m in report["models"]}
    assert list(models_) == [
        ("student", "PyTorch"), ("teacher", "PyTorch"),
        ("student", "ONNX fp32"), ("student", "ONNX fp16"), ("teacher", "ONNX fp32"),
    ]  # fmt: skip
    for (_, label), m in models_.items():
        assert (tmp_path / m["path"]).exists() and m["speed"]["latency_p50_ms"] > 0 and m["speed"]["images_per_s"] > 0
        assert m["ap"] is not None  # from the parity reports' COCO evaluation on the val split
        if label != "PyTorch":
            assert m["parity"]["ap"] is not None and m["parity"]["passed"]
            assert m["parity"]["precision"] == ("fp16" if "fp16" in label else "fp32")
            assert (tmp_path / f"{m['path']}.parity.json").is_file()  # written by detkd export's own function
    sizes = {label: m["speed"]["size_mb"] for (role, label), m in models_.items() if role == "student"}
    assert sizes["ONNX fp16"] < 0.6 * sizes["ONNX fp32"]  # really half precision
    assert [(v["role"], v["label"]) for v in report["video"]] == [("student", "PyTorch"), ("student", "ONNX fp32")]
    for video in report["video"]:
        summary = video["summary"]
        assert summary["frames"]["processed"] == FRAMES and summary["tracking"] == "bytetrack"
        assert (tmp_path / summary["outputs"]["video"]).is_file() and (tmp_path / summary["outputs"]["jsonl"]).is_file()
        speed = models_[video["role"], video["label"]]["speed"]
        assert video["model_call_rate_b1"] == pytest.approx(1e3 / speed["latency_p50_ms"])
        assert speed["threads"] == summary["threads"] == 1  # like with like
        assert video["fps"] == pytest.approx(summary["steady_fps"], rel=1e-3)  # after the first frame's set-up
        assert summary["steady_fps"] > summary["fps"]  # the set-up (model, runtime session, tracker) is left out
        assert video["ratio_to_model_call_b1"] == pytest.approx(video["fps"] / video["model_call_rate_b1"])
        assert video["within"] == (video["ratio_to_model_call_b1"] >= 0.8)
        stages = video["stage_mean_ms"]
        assert {"decode", "inference", "tracking", "draw_write"} <= set(stages)
        model_thread = [stage for stage, thread in video["stage_thread"].items() if thread == "model"]
        assert set(model_thread) == {"preprocess", "inference", "postprocess", "tracking"}
        assert video["stage_thread"]["decode"] == "reader" and video["stage_thread"]["draw_write"] == "writer"
        # the model thread's stages and its other work make a frame; decoding and writing overlap them
        assert sum(stages[s] for s in model_thread) + video["other_ms"] == pytest.approx(video["per_frame_ms"])
    md = (tmp_path / "rep" / "deploy.md").read_text()
    assert "## Exports and parity" in md and "| student | ONNX fp16 | student_fp16.onnx |" in md
    assert md.index("| teacher PyTorch |") < md.index("| student PyTorch |")  # the speed table: teacher first
    assert "× the model call's batch-1 rate" in md and "| tracking |" in md
    assert "| **frame (wall, after the first)** |" in md


def test_deploy_report_bad_input_is_one_line(models, synth_data, tmp_path):
    student, teacher = models
    proc = _run(
        tmp_path, student, teacher, "--data", synth_data, "--footage", "nope.mp4", "--imgsz", SIZE, "--out", "r"
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("deploy_report: error: nope.mp4: footage not found")
