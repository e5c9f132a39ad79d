#!/usr/bin/env python
"""COCO evaluation of an Ultralytics checkpoint: the 12-number table, metrics json and detections json.

    python tools/coco_eval.py --model runs/x/weights/best.pt --data data.yaml --imgsz 160 [--out metrics.json]

Same as ``detkd eval``; see ``detkd eval --help``.
"""

import sys

from detkd.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
