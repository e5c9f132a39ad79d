#!/usr/bin/env python
"""How much a larger YOLO beats a nano one on the synthetic scenes at the same budget.

Distillation needs a gap to close: this trains each model alone from scratch on ``detkd synth`` data and prints
their COCO tables side by side. Default budget (the ``cpu`` benchmark budget): 1000 train / 200 val scenes at
160 px, 30 epochs, batch 16, seed 0.

    python tools/scale_gap.py [--models yolov8n.yaml yolov8s.yaml] [--epochs 30] [--out runs/scale_gap]

Results are written after each model (``results.json``), so a cut run keeps what it finished.
"""

import argparse
import json
import time
from pathlib import Path

from detkd.data.synth import SynthConfig, generate_synthetic
from detkd.evaluation import evaluate_checkpoint, format_table, save_json
from detkd.runtime import ultralytics_offline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["yolov8n.yaml", "yolov8s.yaml"])
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/scale_gap")
    args = p.parse_args()

    ultralytics_offline()
    from ultralytics import YOLO

    out = Path(args.out).resolve()
    data = out / "data" / "data.yaml"
    if not data.exists():
        generate_synthetic(data.parent, args.train, args.val, seed=args.seed, cfg=SynthConfig(imgsz=args.imgsz))
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for cfg in args.models:
        name = Path(cfg).stem
        if name in results:
            continue
        t = time.time()
        YOLO(cfg).train(
            data=str(data),
            epochs=args.epochs,
            imgsz=args.imgsz,
            batch=args.batch,
            seed=args.seed,
            workers=2,
            project=str(out),
            name=name,
            exist_ok=True,
            plots=False,
        )
        minutes = (time.time() - t) / 60
        metrics = evaluate_checkpoint(
            out / name / "weights" / "best.pt",
            data.parent / "annotations" / "instances_val.json",
            imgsz=args.imgsz,
            out=out / name / "coco_metrics.json",
        )
        results[name] = {**metrics, "train_minutes": round(minutes, 1)}
        save_json(results, results_file)
    print(format_table(results))
    print(json.dumps({k: v["train_minutes"] for k, v in results.items()}), "training minutes")


if __name__ == "__main__":
    main()
