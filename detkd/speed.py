"""How fast models run, side by side in one process on one machine: checkpoints and their exports.

Per model, after warm-up:

- **latency** (p50, p95) at batch 1 of the **model call alone**: the predictor's inference stage (Ultralytics'
  ``AutoBackend``: PyTorch for ``.pt``, ONNX Runtime for ``.onnx``, OpenVINO, TorchScript, TensorRT when installed)
  on an input already preprocessed by the predictor, CUDA synchronised; no decoding, letterbox or NMS;
- **throughput** (images/s) of the same call at the larger batch; an export fixed to batch 1 is run as that many
  batch-1 calls (as the predictor runs it), and the table says so;
- **end to end**: ``YOLO.predict`` on one image (preprocess, inference, NMS), p50 per image;
- parameters and GFLOPs at the input size from Ultralytics' model info (thop) for ``.pt``; "-" for exports,
  whose graphs do not tell; the file size (an OpenVINO folder: its files).

Every model sees the same image (a synthetic scene of the input size). Threads are set as ``detkd video`` sets them
(:func:`detkd.ultralytics_internals.runtime_threads`, ``--threads``, recorded), so that the video's frames/s and
this model call are compared like with like: torch's intra-op threads for ``.pt`` and TorchScript; for ``.onnx``,
ONNX Runtime's (workers sleeping between calls, not spinning) with torch single-threaded; OpenVINO and the others
size their own pools.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from detkd.errors import DetkdError, first_line


@dataclass
class SpeedRow:
    model: str
    format: str
    device: str
    size_mb: float
    params_m: float | None
    gflops: float | None
    latency_p50_ms: float
    latency_p95_ms: float
    batch: int  # the throughput's batch
    images_per_s: float | None
    throughput_note: str  # how the batch was run
    predict_p50_ms: float
    threads: int  # the runtime's threads (torch for .pt; ONNX Runtime for .onnx, torch then single-threaded)


def _size_mb(path: Path) -> float:
    files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files) / 1e6


def _timed(call, n: int, synchronize) -> list[float]:
    """``n`` timed calls (ms) after ``max(3, n // 10)`` untimed ones."""
    for _ in range(max(3, n // 10)):
        call()
    synchronize()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure_speed(
    model: str | os.PathLike,
    imgsz: int = 640,
    batches: tuple[int, ...] = (1, 8),
    device=None,
    frames: int = 100,
    threads: int | None = None,
) -> SpeedRow:
    """Measure one model (see the module docstring); ``frames`` timed calls at batch 1, ``frames // batch`` (at
    least 3) at the larger batch; the runtime on ``threads`` threads as ``detkd video`` runs it."""
    import torch

    from detkd.data.synth import SynthConfig, render_scene
    from detkd.evaluation import load_yolo_checkpoint
    from detkd.runtime import default_threads
    from detkd.ultralytics_internals import fixed_batch, prediction_backend, quiet_ultralytics, runtime_threads

    if frames < 1 or min(batches) < 1 or (threads is not None and threads < 1):
        raise DetkdError(f"--frames, --batch and --threads must be at least 1 (got {frames}, {batches}, {threads})")
    path = Path(model)
    yolo = load_yolo_checkpoint(path)
    image, _ = render_scene(0, "val", 0, SynthConfig(imgsz=imgsz))
    with quiet_ultralytics(), runtime_threads(yolo, path, threads):
        params = gflops = None
        if path.suffix == ".pt":
            _, n_params, _, flops = yolo.info(verbose=True, imgsz=imgsz)  # verbose: else it returns nothing
            params, gflops = n_params / 1e6, (flops or None)
        try:
            backend, tensor = prediction_backend(yolo, image, imgsz, device)
        except Exception as e:  # a fixed-size export at another size, a device the runtime lacks
            where = device or "the default device"
            raise DetkdError(f"{path}: cannot run at imgsz {imgsz} on {where}: {first_line(e)}") from e
        cuda = backend.device.type == "cuda"
        synchronize = torch.cuda.synchronize if cuda else lambda: None
        latency = _timed(lambda: backend(tensor), frames, synchronize)
        small, big = min(batches), max(batches)
        images_per_s, note = None, ""
        if big > small:
            stacked = torch.cat([tensor] * big)
            per_batch = np.median(_timed(lambda: backend(stacked), max(3, frames // big), synchronize))
            images_per_s = big / per_batch * 1e3
            if (fixed := fixed_batch(backend)) is not None and fixed < big:
                note = f"fixed batch {fixed}: run as {-(-big // fixed)} calls"
        predict = _timed(
            lambda: yolo.predict(image, imgsz=imgsz, device=device, verbose=False), max(5, frames // 4), lambda: None
        )
    return SpeedRow(
        model=str(path),
        format=backend.format,
        device=str(backend.device),
        size_mb=round(_size_mb(path), 2),
        params_m=None if params is None else round(params, 3),
        gflops=None if gflops is None else round(gflops, 3),
        latency_p50_ms=round(float(np.percentile(latency, 50)), 3),
        latency_p95_ms=round(float(np.percentile(latency, 95)), 3),
        batch=big,
        images_per_s=None if images_per_s is None else round(float(images_per_s), 1),
        throughput_note=note,
        predict_p50_ms=round(float(np.percentile(predict, 50)), 3),
        threads=threads or default_threads(),
    )


def speed_table(rows: list[SpeedRow], imgsz: int) -> str:
    """The rows as a markdown table."""

    def show(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    batch = rows[0].batch if rows else 1
    lines = [
        f"| model | format | device | size MB | params M | GFLOPs@{imgsz} | model call b1 p50 ms | p95 ms "
        f"| images/s b{batch} | predict p50 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        throughput = show(r.images_per_s, ".1f") + (f" ({r.throughput_note})" if r.throughput_note else "")
        lines.append(
            f"| {Path(r.model).name} | {r.format} | {r.device} | {r.size_mb:.2f} | {show(r.params_m, '.3f')} "
            f"| {show(r.gflops, '.2f')} | {r.latency_p50_ms:.2f} | {r.latency_p95_ms:.2f} | {throughput} "
            f"| {r.predict_p50_ms:.2f} |"
        )
    return "\n".join(lines)


def speed_json(rows: list[SpeedRow], imgsz: int, batches: tuple[int, ...], frames: int) -> dict:
    from detkd.ultralytics_internals import cpu_name

    return {
        "imgsz": imgsz,
        "batches": list(batches),
        "frames": frames,
        "cpu": cpu_name(),
        "latency": "model call alone (predictor's inference stage) on a preprocessed tensor; predict: end to end",
        "models": [asdict(r) for r in rows],
    }
