"""Checkpoints load without running code from them: whatever a crafted file plants never runs, and is named.

Each planted file creates a marker file when unpickled the ordinary way; every loader detkd uses (and every one
Ultralytics uses on detkd's behalf) must refuse it in one line with the marker still absent, and load real
checkpoints (all families, classifiers, training state) exactly as before.
"""

import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_model_checkpoint

from detkd import safe_load
from detkd.adapters.ultralytics import load_teacher
from detkd.cli import main
from detkd.errors import DetkdError
from detkd.evaluation import load_yolo_checkpoint
from detkd.transfer import load_model
from detkd.ultralytics_internals import load_checkpoint_file, ultralytics_offline

ultralytics_offline()
from ultralytics import YOLO  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

TRAIN = {"imgsz": 64, "batch": 8, "workers": 0, "plots": False, "exist_ok": True}


class ShellCommand:
    """Unpickles as ``os.system("touch MARKER")``: the file references ``posix.system``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class CallsModelClass:
    """Unpickles as ``DetectionModel(cfg)``, whose ``activation`` Ultralytics would ``eval``: every name it
    references is one that real checkpoints hold, only its use (a call, not a rebuild) differs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        layer = [[-1, 1, "Conv", [16, 3, 2]]]
        code = f"__import__('os').system('touch {self.marker}') or __import__('torch').nn.SiLU()"
        return DetectionModel, ({"nc": 1, "activation": code, "backbone": layer, "head": layer},)


PLANTED = {  # name -> (how it is written, what the refusal names)
    "references os.system": ("torch.save", "it references posix.system, which no Ultralytics checkpoint holds"),
    "calls a model class": ("torch.save", "it calls ultralytics.nn.tasks.DetectionModel with arguments of its own"),
    "pickle protocol 4": ("torch.save protocol 4", "torch's weights-only unpickler rejects it"),
    "plain pickle": ("pickle.dump", "not an Ultralytics checkpoint: not the zip archive torch.save writes"),
}


def plant(kind: str, path: Path, marker: Path) -> Path:
    payload = {"model": (CallsModelClass if kind == "calls a model class" else ShellCommand)(marker), "epoch": -1}
    how = PLANTED[kind][0]
    if how == "pickle.dump":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path, pickle_protocol=4 if how.endswith("4") else 2)
    return path


@pytest.fixture(params=list(PLANTED))
def planted(request, tmp_path):
    """``(file, marker, expected refusal)``: a ``.pt``-looking file that creates ``marker`` when unpickled, where
    a killed run leaves its last checkpoint."""
    marker = tmp_path / "ran"
    path = tmp_path / "run" / "weights" / "last.pt"
    path.parent.mkdir(parents=True)
    return plant(request.param, path, marker), marker, PLANTED[request.param][1]


def _resume(path: Path):
    """``detkd train resume=RUN`` over the run folder of ``path``."""
    from detkd.config import load_recipe, save_recipe
    from detkd.engine import resume

    save_recipe(load_recipe(None, {"teacher": "t.pt"}), path.parent.parent / "distill.yaml")
    resume(path.parent.parent)


def _load_checkpoint(path: Path):
    """What Ultralytics calls for ``YOLO(path)``, trainer set-up and resume, and the ``distill_model=`` teacher."""
    from ultralytics.nn.tasks import load_checkpoint

    load_checkpoint(str(path))


LOADERS = {
    "teacher": load_teacher,
    "transfer source": load_model,
    "student": load_yolo_checkpoint,
    "resume": _resume,
    "YOLO(path)": YOLO,
    "Ultralytics' load_checkpoint": _load_checkpoint,
    "distiller state": load_checkpoint_file,
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_every_loader_refuses_a_planted_file_in_one_line_and_nothing_runs(loader, planted):
    path, marker, refusal = planted
    with pytest.raises(DetkdError) as e:
        LOADERS[loader](path)
    assert not marker.exists()
    message = str(e.value)
    assert message.startswith(f"{path}: refused to load: ") and refusal in message and "\n" not in message
    assert "--trust-checkpoint" in message


def test_detkd_eval_refuses_a_planted_file_with_one_line_and_exit_2(planted, yolo_yaml, capsys):
    path, marker, refusal = planted
    assert main(["eval", "--model", str(path), "--data", str(yolo_yaml), "--imgsz", "64"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert err.count("\n") == 1 and err.startswith(f"detkd: error: {path}: refused to load: ") and refusal in err


def test_strip_optimizer_at_the_end_of_training_skips_a_planted_file(planted):
    from ultralytics.utils.torch_utils import strip_optimizer

    path, marker, _ = planted
    assert strip_optimizer(path) == {}  # Ultralytics logs "not a valid Ultralytics model" and skips it
    assert not marker.exists()


def test_model_classes_admitted_elsewhere_still_cannot_be_called(tmp_path):
    """Ultralytics' own opt-in safe loading registers real model classes process-wide; detkd's loads ignore that."""
    marker = tmp_path / "ran"
    path = plant("calls a model class", tmp_path / "evil.pt", marker)
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([DetectionModel])
    try:
        with pytest.raises(DetkdError, match="calls ultralytics.nn.tasks.DetectionModel"):
            load_checkpoint_file(path)
        assert DetectionModel in torch.serialization.get_safe_globals()  # restored after the load
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)
    assert not marker.exists()


def test_model_configs_in_checkpoints_are_built_without_eval(tmp_path, synth_data):
    """A checkpoint's model config is built again to train or transfer it; a crafted ``activation`` never runs."""
    from detkd.data.synth import CLASSES
    from detkd.transfer import transfer

    marker = tmp_path / "ran"
    student = save_model_checkpoint("yolov8n.yaml", {0: "other"}, tmp_path / "student.pt")
    ckpt = torch.load(student, weights_only=False)
    ckpt["model"].yaml["activation"] = f"__import__('os').system('touch {marker}') or nn.SiLU()"
    torch.save(ckpt, student)
    source = save_model_checkpoint("yolov8n.yaml", dict(enumerate(CLASSES)), tmp_path / "source.pt")
    with pytest.raises(DetkdError) as e:  # the student's classes differ from the data's: rebuilt from its config
        transfer(source, student, tmp_path / "out.pt", data=synth_data)
    assert not marker.exists()
    assert str(e.value).startswith(f"{student}: cannot build a model from this config") and "\n" not in str(e.value)
    assert "activation" in str(e.value)


# --- trusting a file ------------------------------------------------------------------------------------------


def test_trust_checkpoint_loads_the_planted_file_with_a_warning(tmp_path, yolo_yaml):
    marker = tmp_path / "ran"
    path = plant("references os.system", tmp_path / "evil.pt", marker)
    command = [sys.executable, "-m", "detkd.cli", "eval", "--model", str(path), "--data", str(yolo_yaml)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop(safe_load.TRUST_ENV, None)
    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2 and not marker.exists()
    trusted = subprocess.run([*command, "--trust-checkpoint"], capture_output=True, text=True, env=env, timeout=300)
    assert marker.exists()  # unpickled the ordinary way: the planted command ran
    warnings = [line for line in trusted.stderr.splitlines() if line.startswith("detkd: warning:")]
    assert warnings == [
        f"detkd: warning: {path}: it references posix.system, which no Ultralytics checkpoint holds; "
        "loading it anyway, with full unpickling (trusted)"
    ]
    assert f"detkd: error: {path}: not an Ultralytics checkpoint" in trusted.stderr  # what it held is no model


def test_recipe_key_trusts_the_checkpoints_of_its_run(tmp_path, synth_data, teacher_checkpoint, caplog):
    from detkd.engine import distill

    marker = tmp_path / "ran"
    student = plant("references os.system", tmp_path / "evil.pt", marker)
    recipe = {"teacher": str(teacher_checkpoint), "student": str(student), "data": str(synth_data)}
    recipe["distill"] = {"logit": {"weight": 1.0}}
    with pytest.raises(DetkdError, match="refused to load"):
        distill(None, **recipe, **TRAIN)
    assert not marker.exists()
    with pytest.raises(DetkdError, match="not an Ultralytics checkpoint"):
        distill(None, **recipe, trust_checkpoints=True, **TRAIN)
    assert marker.exists()
    assert [r.getMessage() for r in caplog.records if str(student) in r.getMessage()] == [
        f"detkd: warning: {student}: it references posix.system, which no Ultralytics checkpoint holds; "
        "loading it anyway, with full unpickling (trusted)"
    ]
    assert safe_load.TRUST_ENV not in os.environ  # trusted for that run only


def test_trust_is_scoped_and_every_loading_command_offers_it():
    from detkd.benchmark.runner import build_parser as benchmark_parser
    from detkd.cli import build_parser

    with safe_load.trust_checkpoints():
        assert safe_load.trusted()
        with safe_load.trust_checkpoints(False):  # False never narrows what the caller trusts
            assert safe_load.trusted()
    assert not safe_load.trusted()
    for command in (["train", "r.yaml"], ["eval", "--model", "m.pt", "--data", "d.yaml"], ["transfer", "--source",
                    "s.pt", "--student", "n.yaml", "--out", "o.pt"]):  # fmt: skip
        assert build_parser().parse_args([*command, "--trust-checkpoint"]).trust_checkpoint is True
    assert benchmark_parser().parse_args(["--profile", "quick", "--trust-checkpoint"]).trust_checkpoint is True


# --- real checkpoints -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml", "yolov8n-cls.yaml"])
def test_every_family_loads_restricted_and_equal(cfg, tmp_path):
    from ultralytics.data.augment import classify_transforms
    from ultralytics.nn.tasks import ClassificationModel

    torch.manual_seed(0)
    model = (ClassificationModel if "-cls" in cfg else DetectionModel)(cfg, nc=3, verbose=False)
    if "-cls" in cfg:  # what Ultralytics' classification trainer attaches: torchvision preprocessing
        model.transforms = classify_transforms(32)
    metrics = {"fitness": np.float64(0.25), "metrics/mAP50-95(B)": np.float64(0.125)}  # as older releases stored
    torch.save({"model": model.half(), "train_metrics": metrics, "epoch": -1}, tmp_path / "m.pt")
    loaded = load_checkpoint_file(tmp_path / "m.pt")
    assert type(loaded["model"]) is type(model) and loaded["train_metrics"] == metrics
    expected = model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded["model"].state_dict().items())
    if "-cls" in cfg:
        assert [type(t).__name__ for t in loaded["model"].transforms.transforms] == [
            type(t).__name__ for t in model.transforms.transforms
        ]


def test_trained_checkpoint_predicts_and_resumes_through_the_restricted_path(synth_data, tmp_path, monkeypatch):
    """A killed run's last.pt (optimizer, EMA, train args) loads, predicts and resumes; every torch.load on the way,
    Ultralytics' own included (resume checks, set-up, strip_optimizer at the end), is weights-only."""
    model = YOLO("yolov8n.yaml")

    def kill_after_first_epoch(trainer):
        if trainer.epoch == 0:
            raise KeyboardInterrupt

    model.add_callback("on_model_save", kill_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        model.train(data=str(synth_data), epochs=2, project=str(tmp_path), name="r", **TRAIN)
    last = tmp_path / "r" / "weights" / "last.pt"
    assert "optimizer" in torch.load(last, weights_only=False)

    loads = []
    torch_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return torch_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    image = sorted((synth_data.parent / "images" / "val").glob("*.jpg"))[0]
    assert len(YOLO(last).predict(str(image), imgsz=64, verbose=False)) == 1
    resumed = YOLO(last)
    resumed.train(resume=True)
    rows = (tmp_path / "r" / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # header, epoch 1, epoch 2: continued, not restarted
    assert len(loads) >= 4 and set(loads) == {True}
