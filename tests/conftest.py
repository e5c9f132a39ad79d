"""Shared pytest fixtures, grouped by the part of detkd they serve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

# process fixtures


def detkd_env() -> dict[str, str]:
    """The environment of a child process that imports the detkd under test, whatever its working directory."""
    import detkd

    root = str(Path(detkd.__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


@pytest.fixture
def run_detkd(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """``run_detkd(*args, timeout=120)``: the ``detkd`` command in a fresh process run in ``tmp_path``."""

    def run(*args, timeout: float = 120) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "detkd.cli", *map(str, args)]
        return subprocess.run(command, cwd=tmp_path, env=detkd_env(), capture_output=True, text=True, timeout=timeout)

    return run


# data fixtures
# Tiny sets on disk: noise images written with cv2 (so JPEGs have real entropy and can be truncated), labels
# written by hand, so that the tests check the loaders against known numbers rather than against themselves.


def _write_image(path: Path, width: int = 32, height: int = 32, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), pixels)
    return path


@pytest.fixture
def write_image() -> Callable[..., Path]:
    """``write_image(path, width=32, height=32, seed=0)``: a noise image in whatever format the suffix names."""
    return _write_image


@pytest.fixture
def coco_json(tmp_path: Path) -> Path:
    """A COCO val set laid out as ``root/annotations/instances_val.json`` + ``root/images/val/``.

    Category ids 1, 3, 90 (gaps, like COCO's), image ids 17, 42, 5 (5 is a background image), one crowd box,
    and a segment area that differs from its box area, so that nothing survives a round trip by accident.
    """
    root = tmp_path / "coco"
    _write_image(root / "images/val/a.jpg", 32, 32, seed=1)
    _write_image(root / "images/val/b.png", 48, 32, seed=2)
    _write_image(root / "images/val/c.jpg", 32, 32, seed=3)
    data = {
        "images": [
            {"id": 17, "file_name": "images/val/a.jpg", "width": 32, "height": 32},
            {"id": 42, "file_name": "images/val/b.png", "width": 48, "height": 32},
            {"id": 5, "file_name": "images/val/c.jpg", "width": 32, "height": 32},
        ],
        "annotations": [
            {"id": 1, "image_id": 17, "category_id": 1, "bbox": [2.5, 3.25, 10.0, 12.0], "area": 120.0, "iscrowd": 0},
            {"id": 2, "image_id": 17, "category_id": 90, "bbox": [20.0, 0.0, 12.0, 8.5], "area": 61.5, "iscrowd": 0},
            {"id": 9, "image_id": 42, "category_id": 3, "bbox": [0.0, 10.0, 48.0, 20.0], "area": 700.0, "iscrowd": 1},
            {"id": 12, "image_id": 42, "category_id": 3, "bbox": [30.125, 4.0, 6.0, 7.0], "area": 40.0, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 90, "name": "toothbrush"}],
    }
    path = root / "annotations" / "instances_val.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return path


# label files of ``yolo_yaml``; images/val/v2.jpg has none (a background image)
YOLO_LABELS = {
    "train/t1": "0 0.5 0.5 0.25 0.5\n1 0.25 0.25 0.125 0.125\n",
    "train/t2": "1 0.5 0.5 1.0 1.0\n",
    "val/v1": "0 0.3125 0.5 0.125 0.25\n1 0.75 0.25 0.25 0.5\n",
}


@pytest.fixture
def yolo_yaml(tmp_path: Path) -> Path:
    """A plain Ultralytics set: ``names`` as a list, train and val directories, v1 is 48x32, v2 has no labels."""
    root = tmp_path / "yolo"
    sizes = {"train/t1": (32, 32), "train/t2": (32, 32), "val/v1": (48, 32), "val/v2": (32, 32)}
    for seed, (stem, size) in enumerate(sizes.items()):
        _write_image(root / "images" / f"{stem}.jpg", *size, seed=seed)
    for stem, text in YOLO_LABELS.items():
        label = root / "labels" / f"{stem}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text(text)
    path = root / "data.yaml"
    path.write_text("train: images/train\nval: images/val\nnames: [cat, dog]\n")
    return path


# model fixtures
# Models built from Ultralytics configs (nothing is downloaded), saved as ordinary Ultralytics checkpoints.


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A tiny synthetic train/val set at 64 px; returns its data.yaml."""
    from detkd.data.synth import SynthConfig, generate_synthetic

    root = tmp_path_factory.mktemp("synth")
    return generate_synthetic(root, train=16, val=8, seed=0, cfg=SynthConfig(imgsz=64))


def save_model_checkpoint(cfg: str, names: dict[int, str], path: Path, seed: int = 0) -> Path:
    """An untrained model from ``cfg`` saved the way Ultralytics saves one (loads with ``YOLO(path)``)."""
    import torch

    from detkd.ultralytics_internals import ultralytics_offline

    ultralytics_offline()
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(seed)
    model = DetectionModel(cfg, nc=len(names), verbose=False)
    model.names = dict(names)
    torch.save({"model": model.half(), "train_args": {}, "epoch": -1}, path)
    return path


@pytest.fixture(scope="session")
def teacher_checkpoint(tmp_path_factory) -> Path:
    """An untrained yolov8s over the synthetic classes: a real, wider teacher network for mechanics tests."""
    from detkd.data.synth import CLASSES

    return save_model_checkpoint("yolov8s.yaml", dict(enumerate(CLASSES)), tmp_path_factory.mktemp("t") / "t.pt")


# loss fixtures


@pytest.fixture(scope="session")
def toy_feature_loss() -> str:
    """A feature loss added the way a contributor adds one: a function and its registration, nothing else.

    'toy' = scale · mean |S − T|; unregistered at the end of the session. Returns its recipe name.
    """
    from detkd.losses.registry import FEATURE_LOSSES, register_feature_loss

    @register_feature_loss("toy")
    def toy(student, teacher, scale: float = 1.0):
        return scale * (student - teacher.detach()).abs().mean()

    yield "toy"
    del FEATURE_LOSSES["toy"]
