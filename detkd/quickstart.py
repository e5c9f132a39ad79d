"""The main job on built-in data: generate scenes, check them, train a nano YOLO, print its COCO table.

It is what the README's first command runs; the distillation engine extends it to teacher → student.
"""

from __future__ import annotations

import time
from pathlib import Path

from detkd.data import check_dataset
from detkd.data.synth import SynthConfig, generate_synthetic
from detkd.evaluation import evaluate_checkpoint, format_table

# Built-in default: small enough to finish in minutes on two CPU cores.
QUICKSTART = {"train": 400, "val": 100, "imgsz": 160, "epochs": 10, "batch": 16, "seed": 0, "student": "yolov8n.yaml"}


def quickstart(root: str | Path = "runs/quickstart", epochs: int | None = None) -> dict[str, dict[str, float]]:
    from detkd.runtime import ultralytics_offline

    ultralytics_offline()
    from ultralytics import YOLO

    cfg = dict(QUICKSTART, epochs=epochs or QUICKSTART["epochs"])
    root = Path(root).resolve()
    t0 = time.time()
    data_dir = root / "data"
    data_yaml = data_dir / "data.yaml"
    if not data_yaml.exists():
        print(f"[1/3] generating {cfg['train']} + {cfg['val']} synthetic scenes in {data_dir}", flush=True)
        generate_synthetic(data_dir, cfg["train"], cfg["val"], seed=cfg["seed"], cfg=SynthConfig(imgsz=cfg["imgsz"]))
    report = check_dataset(data_yaml)
    print(report.format(), flush=True)
    report.raise_if_errors()

    print(f"[2/3] training {cfg['student']} for {cfg['epochs']} epochs at {cfg['imgsz']} px", flush=True)
    run = root / "student_alone"
    YOLO(cfg["student"]).train(
        data=str(data_yaml),
        epochs=cfg["epochs"],
        imgsz=cfg["imgsz"],
        batch=cfg["batch"],
        seed=cfg["seed"],
        project=str(root),
        name=run.name,
        exist_ok=True,
        plots=False,
        verbose=False,
    )
    print("[3/3] COCO evaluation", flush=True)
    coco_json = data_dir / "annotations" / "instances_val.json"
    results = {
        "student_alone": evaluate_checkpoint(
            run / "weights" / "best.pt", coco_json, imgsz=cfg["imgsz"], out=run / "coco_metrics.json"
        )
    }
    print(format_table(results))
    print(f"done in {time.time() - t0:.0f} s; runs in {root}")
    return results
