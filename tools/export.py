#!/usr/bin/env python
"""Export a checkpoint with Ultralytics' exporter and check that the export reproduces it (parity report).

    python tools/export.py runs/x/weights/best.pt --format onnx --imgsz 160 [--data data.yaml] [--out student.onnx]

Same as ``detkd export``; see ``detkd export --help``. Exit status 1 when an fp32 export fails parity.
"""

import sys

from detkd.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
