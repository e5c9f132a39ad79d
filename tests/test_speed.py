"""detkd speed: a checkpoint and its ONNX export measured side by side in one run."""

from __future__ import annotations

import json

from detkd.data.synth import CLASSES


def test_speed_prints_a_row_per_model_and_writes_json(run_detkd, tmp_path):
    from detkd.export import export_model
    from tests.conftest import save_model_checkpoint

    checkpoint = save_model_checkpoint("yolov8n.yaml", dict(enumerate(CLASSES)), tmp_path / "m.pt")
    onnx = export_model(checkpoint, "onnx", imgsz=64, out=tmp_path / "m.onnx")
    proc = run_detkd("speed", checkpoint, onnx, "--imgsz", 64, "--batch", "1,2", "--frames", 6, "--out", "s.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| m.")]
    assert [row.split("|")[1:3] for row in rows] == [[" m.pt ", " pt "], [" m.onnx ", " onnx "]]
    result = json.loads((tmp_path / "s.json").read_text())
    pt, exported = result["models"]
    assert pt["params_m"] > 2.5 and pt["gflops"] > 0 and exported["params_m"] is None  # yolov8n: 3.0 M
    for row in (pt, exported):
        assert 0 < row["latency_p50_ms"] <= row["latency_p95_ms"] and row["images_per_s"] > 0
        assert row["predict_p50_ms"] > 0 and row["size_mb"] > 1
    assert exported["throughput_note"] == "fixed batch 1: run as 2 calls" and pt["throughput_note"] == ""


def test_speed_of_a_missing_model_is_one_error_line(run_detkd):
    proc = run_detkd("speed", "nothing.onnx", "--imgsz", 64)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("detkd: error: nothing.onnx")
    assert len(proc.stderr.strip().splitlines()) == 1
