"""Plumbing every layer shares: atomic writes and the one rule by which class names match.

The bottom layer beside :mod:`detkd.errors`: it imports nothing else from detkd, so any module may use it.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write ``path`` through ``write(tmp)`` into a temporary file beside it, then rename it into place.

    A process killed mid-write leaves the previous file (or none), never half a file: runs are resumed from what
    they wrote (``run.json``, ``distiller.pt``, ``transfer.json``), so a torn file would be trusted or crash the
    resume. The temporary name carries the process id, so two processes writing the same file cannot mix their
    halves; the rename is atomic on one file system, which the folder guarantees.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_json(obj, path: str | os.PathLike) -> Path:
    """Write JSON atomically (see :func:`atomic_write`)."""
    return write_text(path, json.dumps(obj, indent=1))


def class_key(name: str) -> str:
    """The form in which class names are compared: case, surrounding spaces and ``_`` against space do not count.

    Data sets and models spell the same class differently (COCO's ``traffic light``, a YOLO yaml's
    ``traffic_light``, ``Bus``); teacher-student pairing and evaluation must agree on what matches.
    """
    return name.strip().lower().replace("_", " ")


def read_results(path: str | os.PathLike) -> dict[str, list[float]]:
    """Ultralytics' ``results.csv`` (one row per epoch) as columns: names stripped of their padding, values float;
    empty when no epoch was recorded. The one reader of training curves (benchmark reports, ``detkd diagnose``)."""
    with open(path, newline="") as f:
        rows = [{k.strip(): float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
