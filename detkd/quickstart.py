"""The main job on built-in data: a teacher, the student alone, the student distilled, one COCO table.

It is what the README's first command runs: generate synthetic scenes, check them, train (or reuse) a yolov8s
teacher, train a yolov8n student alone and with the built-in ``recommended`` recipe at the same budget (the student
starts from weights selected from the teacher's, then is distilled), and print the COCO table of all three side by
side. About 15 minutes on two CPU cores.
"""

from __future__ import annotations

import time
from pathlib import Path

from detkd.config import load_recipe
from detkd.data import check_dataset
from detkd.data.synth import SynthConfig, generate_synthetic
from detkd.evaluation import evaluate_checkpoint, format_table
from detkd.utils import save_json

QUICKSTART = {
    "train": 500,
    "val": 100,
    "imgsz": 160,
    "seed": 0,
    "teacher": "yolov8s.yaml",
    "teacher_epochs": 15,
    "student": "yolov8n.yaml",
    "epochs": 10,
    "batch": 16,
}
RECIPE = "recommended"  # the built-in recipe (detkd/configs/recommended.yaml)


def quickstart(
    root: str | Path = "runs/quickstart", epochs: int | None = None, train: int | None = None, val: int | None = None
) -> dict[str, dict[str, float]]:
    """Run the main job in ``root``; ``epochs`` (every training) and ``train``/``val`` (scenes) shrink it."""
    from detkd.ultralytics_internals import ultralytics_offline

    ultralytics_offline()
    from ultralytics import YOLO

    from detkd.engine import distill

    cfg = dict(QUICKSTART)
    if epochs:
        cfg.update(epochs=epochs, teacher_epochs=epochs)
    cfg.update({k: v for k, v in (("train", train), ("val", val)) if v})
    root = Path(root).resolve()
    t0 = time.time()
    data_yaml = root / f"data_{cfg['train']}_{cfg['val']}" / "data.yaml"  # sizes in the name: reuse only a match
    if not data_yaml.exists():
        _step(1, f"generating {cfg['train']} + {cfg['val']} synthetic scenes in {data_yaml.parent}")
        generate_synthetic(data_yaml.parent, cfg["train"], cfg["val"], seed=cfg["seed"], cfg=SynthConfig(cfg["imgsz"]))
    report = check_dataset(data_yaml)
    print(report.format(), flush=True)
    report.raise_if_errors()
    common = {
        "data": str(data_yaml),
        "imgsz": cfg["imgsz"],
        "batch": cfg["batch"],
        "seed": cfg["seed"],
        "project": str(root),
        "exist_ok": True,
        "plots": False,
        "workers": 2,
    }

    runs = {
        "teacher": f"teacher_{Path(cfg['teacher']).stem}_{data_yaml.parent.name}_{cfg['teacher_epochs']}ep",
        "student_alone": "student_alone",
        "student_distilled": "student_distilled",
    }
    teacher = root / runs["teacher"] / "weights" / "best.pt"
    if teacher.exists():
        _step(2, f"reusing the teacher trained before: {teacher}")
    else:
        _step(2, f"training the teacher {cfg['teacher']} for {cfg['teacher_epochs']} epochs")
        YOLO(cfg["teacher"]).train(**common, epochs=cfg["teacher_epochs"], name=runs["teacher"])

    _step(3, f"training the student {cfg['student']} alone for {cfg['epochs']} epochs")
    YOLO(cfg["student"]).train(**common, epochs=cfg["epochs"], name="student_alone")

    _step(
        4,
        f"training the student with the {RECIPE} recipe (weights selected from the teacher, distillation) "
        f"for {cfg['epochs']} epochs",
    )
    recipe = load_recipe(RECIPE, {"teacher": str(teacher), "student": cfg["student"]})
    distill(recipe, **common, epochs=cfg["epochs"], name="student_distilled")

    _step(5, "COCO evaluation")
    coco_json = data_yaml.parent / "annotations" / "instances_val.json"
    results = {
        name: evaluate_checkpoint(
            root / run / "weights" / "best.pt", coco_json, imgsz=cfg["imgsz"], out=root / run / "coco_metrics.json"
        )
        for name, run in runs.items()
    }
    save_json(results, root / "results.json")
    print(format_table(results))
    print(f"done in {(time.time() - t0) / 60:.1f} min; runs and results.json in {root}")
    return results


def _step(i: int, message: str) -> None:
    print(f"\n[detkd quickstart {i}/5] {message}", flush=True)
