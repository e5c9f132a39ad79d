"""detkd video and detkd speed run a model's runtime on one thread pool (runtime_threads): torch's intra-op threads
for a checkpoint; for an ONNX export, ONNX Runtime's (workers not spinning) with torch single-threaded beside it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detkd.data.synth import CLASSES, SynthConfig, render_scene

SIZE = 64


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    from detkd.export import export_model
    from tests.conftest import save_model_checkpoint

    folder = tmp_path_factory.mktemp("threads")
    checkpoint = save_model_checkpoint("yolov8n.yaml", dict(enumerate(CLASSES)), folder / "m.pt")
    return {"pt": checkpoint, "onnx": export_model(checkpoint, "onnx", imgsz=SIZE, out=folder / "m.onnx")}


@pytest.fixture
def torch_threads_kept():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _predict(yolo, image) -> np.ndarray:
    (result,) = yolo.predict(image, imgsz=SIZE, conf=0.0, verbose=False)
    return result.boxes.data.numpy()


def test_onnx_session_rebuilt_with_its_threads_no_spinning_and_torch_single_threaded(models, torch_threads_kept):
    from detkd.evaluation import load_yolo_checkpoint
    from detkd.ultralytics_internals import ORT_SESSION_CONFIG, quiet_ultralytics, runtime_threads

    image, _ = render_scene(0, "val", 0, SynthConfig(imgsz=SIZE))
    with quiet_ultralytics():
        expected = _predict(load_yolo_checkpoint(models["onnx"]), image)  # Ultralytics' own session
        torch.set_num_threads(3)
        yolo = load_yolo_checkpoint(models["onnx"])
        with runtime_threads(yolo, models["onnx"], threads=2):
            boxes = _predict(yolo, image)
            inside = torch.get_num_threads()
            options = yolo.predictor.model.backend.session.get_session_options()
    assert inside == 1  # pre- and post-processing: not a second pool beside ONNX Runtime's
    assert options.intra_op_num_threads == 2
    for key, value in ORT_SESSION_CONFIG.items():
        assert options.get_session_config_entry(key) == value
    assert torch.get_num_threads() == 3  # restored
    np.testing.assert_allclose(boxes, expected, atol=1e-4)  # the same model, the same detections
    assert all(callback.__name__ != "configure" for callback in yolo.callbacks["on_predict_start"])  # removed


def test_checkpoint_runs_on_the_threads_given_despite_the_predictor_set_up(models, torch_threads_kept):
    from detkd.evaluation import load_yolo_checkpoint
    from detkd.ultralytics_internals import quiet_ultralytics, runtime_threads

    image, _ = render_scene(0, "val", 0, SynthConfig(imgsz=SIZE))
    torch.set_num_threads(3)
    yolo = load_yolo_checkpoint(models["pt"])
    with quiet_ultralytics(), runtime_threads(yolo, models["pt"], threads=2):
        seen = []
        yolo.add_callback("on_predict_batch_start", lambda predictor: seen.append(torch.get_num_threads()))
        _predict(yolo, image)  # sets the predictor up: Ultralytics' select_device sets torch_utils.NUM_THREADS
        _predict(yolo, image)
    assert seen == [2, 2]
    assert torch.get_num_threads() == 3


def test_threads_below_one_is_one_error_line(run_detkd, models):
    for command in (("video", "x.mp4", "--model", models["pt"], "--jsonl", "a.jsonl"), ("speed", models["pt"])):
        proc = run_detkd(*command, "--threads", 0, "--imgsz", SIZE)
        assert proc.returncode == 2 and "--threads" in proc.stderr and "Traceback" not in proc.stderr
