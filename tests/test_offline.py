"""detkd drives Ultralytics without ever touching the network, and keeps out of the user's config dir."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from detkd.runtime import FIRST_RUN_NOTICE

# Run in a fresh interpreter, so that the sockets are blocked before anything imports Ultralytics or torch. Each
# attempt is also appended to <work>.attempts: a forked child process (OpenVINO's telemetry sends from one) inherits
# the blocked sockets but not the list.
BLOCKED_NETWORK = textwrap.dedent(
    """
    import json, socket, sys
    attempts = []
    work = sys.argv[1]

    def refuse(name):
        def blocked(*args, **kwargs):
            attempt = f"{name}{args[1:2] if name == 'connect' else args[:1]}"
            attempts.append(attempt)
            with open(work + ".attempts", "a") as record:
                record.write(attempt + "\\n")
            raise OSError(f"network disabled by test ({name})")
        return blocked

    socket.socket.connect = refuse("connect")
    socket.socket.connect_ex = refuse("connect_ex")
    socket.create_connection = refuse("create_connection")
    socket.getaddrinfo = refuse("getaddrinfo")
    socket.gethostbyname = refuse("gethostbyname")
    """
)
PIPELINE = BLOCKED_NETWORK + textwrap.dedent(
    """
    try:
        from detkd.data.synth import SynthConfig, generate_synthetic
        from detkd.evaluation import evaluate_checkpoint
        from detkd.ultralytics_internals import ultralytics_offline

        ultralytics_offline()
        import torch
        from ultralytics import YOLO

        data = generate_synthetic(f"{work}/data", train=8, val=4, seed=0, cfg=SynthConfig(imgsz=64))
        model = YOLO("yolov8n.yaml")
        model.train(data=str(data), epochs=1, imgsz=64, batch=4, workers=0, project=f"{work}/runs", name="t",
                    exist_ok=True, plots=True)
        best = f"{work}/runs/t/weights/best.pt"
        YOLO(best).val(data=str(data), imgsz=64, batch=4, save_json=True, plots=True, project=f"{work}/runs", name="v")
        metrics = evaluate_checkpoint(best, f"{work}/data/annotations/instances_val.json", imgsz=64,
                                      out=f"{work}/eval/metrics.json")
        onnx = YOLO(best).export(format="onnx", imgsz=64, simplify=True)
        result = {"attempts": attempts, "threads": torch.get_num_threads(), "onnx": onnx, "AP": metrics["AP"]}
    except BaseException as e:
        result = {"attempts": attempts, "error": repr(e)}
    print("RESULT " + json.dumps(result))
    """
)


def _run_offline(pipeline: str, tmp_path: Path) -> dict:
    """Run ``pipeline`` in a fresh interpreter with a fresh ``HOME``; its result, asserting that no process it
    started attempted a connection."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "DETKD_", "XDG_CONFIG", "OMP_"))}
    env["HOME"] = str(home)
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-c", pipeline, str(work)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert "error" not in result, result["error"] + proc.stderr[-3000:]
    assert result["attempts"] == []
    record = tmp_path / "work.attempts"
    assert not record.exists(), record.read_text()  # nor a child process
    return result | {"output": proc.stdout + proc.stderr}


def test_build_train_val_export_never_touches_the_network(tmp_path):
    result = _run_offline(PIPELINE, tmp_path)
    home = tmp_path / "home"
    _onnx_detects(Path(result["onnx"]), imgsz=64, classes=8)
    assert 0.0 <= result["AP"] <= 1.0
    assert result["threads"] == len(os.sched_getaffinity(0))  # every allowed core, not Ultralytics' cores - 1
    # detkd's own config dir, with the fonts that stop check_font's download; the user's stays untouched
    assert (home / ".config" / "detkd" / "Ultralytics" / "settings.json").is_file()
    assert (home / ".config" / "detkd" / "Ultralytics" / "Arial.ttf").is_file()
    assert not (home / ".config" / "Ultralytics").exists()
    # created quietly: Ultralytics' notice would send the user to `yolo settings`, which reads their own dir
    assert FIRST_RUN_NOTICE not in result["output"] and "yolo settings" not in result["output"]


OPENVINO = BLOCKED_NETWORK + textwrap.dedent(
    """
    import os, time
    try:
        from detkd.data.synth import SynthConfig, generate_synthetic
        from detkd.export import export_model
        from detkd.ultralytics_internals import ultralytics_offline

        ultralytics_offline()
        from ultralytics import YOLO

        data = generate_synthetic(f"{work}/data", train=8, val=4, seed=0, cfg=SynthConfig(imgsz=64))
        YOLO("yolov8n.yaml").save(f"{work}/m.pt")
        exported = export_model(f"{work}/m.pt", "openvino", imgsz=64, precision="int8", data=data)
        time.sleep(2)  # OpenVINO's telemetry sends from a child process, after the export returns
        intel = os.path.exists(os.path.expanduser("~/intel"))
        result = {"attempts": attempts, "openvino": str(exported), "intel": intel}
    except BaseException as e:
        result = {"attempts": attempts, "error": repr(e)}
    print("RESULT " + json.dumps(result))
    """
)


def test_openvino_int8_export_never_touches_the_network(tmp_path):
    """OpenVINO's converter and NNCF send usage events to Google Analytics by default (29 connection attempts for
    this export before detkd turned them off) and count runs in ``~/intel``: neither happens under detkd."""
    import pytest

    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    result = _run_offline(OPENVINO, tmp_path)
    assert Path(result["openvino"], "m.xml").is_file()
    assert not result["intel"]


def _onnx_detects(path: Path, imgsz: int, classes: int) -> None:
    """The exported model runs without PyTorch or Ultralytics and outputs YOLO's (1, 4 + classes, anchors) tensor."""
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (input_,) = session.get_inputs()
    image = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    (output,) = session.run(None, {input_.name: image})
    anchors = sum((imgsz // stride) ** 2 for stride in (8, 16, 32))
    assert output.shape == (1, 4 + classes, anchors) and np.isfinite(output).all()
