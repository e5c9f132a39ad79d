#!/usr/bin/env python
"""The deployment evidence for one student and its teacher, in one run on one machine: export → parity → speed →
video, written as DIR/deploy.md and DIR/deploy.json.

    python tools/deploy_report.py STUDENT.pt TEACHER.pt --data DATA.yaml --footage VIDEO.mp4 --imgsz S --out DIR
        [--formats onnx,openvino] [--batch 8] [--frames 100] [--tracker bytetrack] [--device cpu] [--threads N]

1. **Exports and parity.** The student is exported to ONNX fp32, ONNX fp16 (Ultralytics converts the graph on CPU
   with ONNX Runtime's float16 tool), OpenVINO fp32 and OpenVINO int8 (calibrated by NNCF on the train split of
   DATA); the teacher to ONNX and OpenVINO fp32. Each export gets ``detkd export``'s parity report (its own
   functions: :func:`detkd.export.export_model`, :func:`detkd.export.check_and_record`), with the COCO AP of the
   export and of its checkpoint on DATA's val split. An export that cannot be made here (OpenVINO not installed, a
   converter failing) is listed with its one-line reason, and the rest goes on.
2. **Speed.** ``detkd speed`` (:func:`detkd.speed.measure_speed`) of every model in the same process: model-call
   latency p50/p95 at batch 1, throughput at ``--batch``, parameters, GFLOPs (of the checkpoint an export comes
   from), file size, with the AP of step 1 beside them.
3. **Video.** ``detkd video`` (:func:`detkd.video.run_video`: tracking, annotated MP4 and JSONL) of the student's
   checkpoint and its ONNX fp32 export on the footage, its summary, and the comparison the deployment issue asks
   for: the video's frames/s against the speed table's rate for the same model, with the time per frame split into
   its stages (decode, preprocess, inference, postprocess, tracking, drawing and writing, the rest) and the thread
   each runs in, so that the overheads are shown, not hidden: decoding and writing overlap the model thread's
   stages, which (with the rest of that thread's loop) make a frame's time. A stream runs one frame per call, so
   the rate compared is the batch-1 model call's (1000 / p50); the ratio to the batch throughput is shown too. Both
   run the model's runtime on the same threads (``--threads``, :func:`detkd.ultralytics_internals.runtime_threads`),
   so the ratio compares like with like: the whole loop (decode to written MP4 and JSONL) against the model call
   alone.

Run it on a quiet machine: every number is a timing. Exit status 1 when an fp32 export fails parity, 2 on bad
input (one line), else 0.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from detkd.errors import DetkdError
from detkd.utils import save_json, write_text

WITHIN = 0.20  # the deployment issue's tolerance: the video sustains the speed table's rate within 20 %
# (role, label, format, precision, file name under DIR/exports): the exports the report makes, in its order
EXPORTS = (
    ("student", "ONNX fp32", "onnx", "fp32", "student.onnx"),
    ("student", "ONNX fp16", "onnx", "fp16", "student_fp16.onnx"),
    ("student", "OpenVINO fp32", "openvino", "fp32", "student_openvino_model"),
    ("student", "OpenVINO int8", "openvino", "int8", "student_int8_openvino_model"),
    ("teacher", "ONNX fp32", "onnx", "fp32", "teacher.onnx"),
    ("teacher", "OpenVINO fp32", "openvino", "fp32", "teacher_openvino_model"),
)
VIDEO_OF = (("student", "PyTorch"), ("student", "ONNX fp32"))  # the models run on the footage


@dataclass
class Variant:
    """One model of the report: a checkpoint, or an export of it with its parity report."""

    role: str  # student | teacher
    label: str  # "PyTorch", "ONNX fp32", ...
    path: Path | None  # None: the export could not be made
    parity: object = None  # detkd.export.ParityReport of an export
    missing: str = ""  # why there is no such export


def make_exports(checkpoints: dict, args) -> list[Variant]:
    """Step 1: the checkpoints, then each export of :data:`EXPORTS` whose format is in ``--formats``, checked."""
    from detkd.export import check_and_record, export_model

    variants = [Variant(role, "PyTorch", Path(path)) for role, path in checkpoints.items()]
    for role, label, fmt, precision, name in EXPORTS:
        if fmt not in args.formats:
            continue
        print(f"deploy_report: {role} {label} ...", flush=True)
        out = args.out / "exports" / name
        try:
            path = export_model(
                checkpoints[role], fmt, args.imgsz, precision, data=args.data, out=out, device=args.device
            )
            report, _ = check_and_record(
                checkpoints[role], path, args.imgsz, precision, data=args.data, device=args.device
            )
        except DetkdError as e:  # not possible here (a runtime not installed, a converter failing): say why
            variants.append(Variant(role, label, None, missing=str(e)))
            continue
        print(f"  {report.summary()}", flush=True)
        variants.append(Variant(role, label, path, report))
    return variants


def ap_of(variant: Variant, variants: list[Variant]) -> float | None:
    """The COCO AP measured by the parity reports: an export's own, a checkpoint's from any of its exports."""
    if variant.parity is not None:
        return variant.parity.ap_export
    checked = [v.parity for v in variants if v.role == variant.role and v.parity is not None]
    return checked[0].ap_pytorch if checked else None


def measure_all(variants: list[Variant], args) -> dict[tuple[str, str], object]:
    """Step 2: :func:`detkd.speed.measure_speed` of every model made, keyed by (role, label)."""
    from detkd.speed import measure_speed

    rows = {}
    for v in variants:
        if v.path is not None:
            print(f"deploy_report: speed of {v.role} {v.label} ...", flush=True)
            batches = (1, args.batch)
            rows[v.role, v.label] = measure_speed(v.path, args.imgsz, batches, args.device, args.frames, args.threads)
    return rows


def run_videos(variants: list[Variant], speed: dict, args) -> list[dict]:
    """Step 3: ``detkd video`` of the models of :data:`VIDEO_OF` on the footage, compared with their speed rows."""
    from detkd.video import run_video

    runs = []
    for role, label in VIDEO_OF:
        variant = next((v for v in variants if (v.role, v.label) == (role, label) and v.path is not None), None)
        if variant is None:
            continue
        print(f"deploy_report: video with {role} {label} ...", flush=True)
        stem = args.out / "video" / f"{role}_{label.lower().replace(' ', '_')}"
        summary = run_video(
            args.footage, variant.path, out=stem.with_suffix(".mp4"), jsonl=stem.with_suffix(".jsonl"),
            track=args.tracker, imgsz=args.imgsz, device=args.device, threads=args.threads,
        )  # fmt: skip
        runs.append({"role": role, "label": label, **compare(summary, speed[role, label])})
    return runs


def compare(summary, row) -> dict:
    """The video's steady frames/s (after the first frame's set-up) against the speed row's batch-1 model-call rate,
    and where each frame's time went (stage means after the first frame; "other" is the rest of a steady frame in the
    model thread: the predictor's call around its stages, the loop, waits for the reader or the writer)."""
    from detkd.video import STAGES

    fps = summary.steady_fps or summary.fps
    per_frame_ms = 1e3 / fps if fps else None
    steady = {stage: v[1:] or v for stage, v in summary.latency_ms.items() if v}  # the first frame: set-up
    stages = {stage: sum(v) / len(v) for stage, v in steady.items()}
    call_rate = 1e3 / row.latency_p50_ms
    ratio = fps / call_rate
    return {
        "summary": summary.to_json(),
        "fps": fps,
        "model_call_rate_b1": call_rate,
        "ratio_to_model_call_b1": ratio,
        "ratio_to_batch_throughput": None if row.images_per_s is None else fps / row.images_per_s,
        "within": ratio >= 1 - WITHIN,
        "per_frame_ms": per_frame_ms,
        "stage_mean_ms": stages,
        "stage_thread": {stage: STAGES[stage] for stage in stages},
        "other_ms": None
        if per_frame_ms is None
        else per_frame_ms - sum(ms for stage, ms in stages.items() if STAGES[stage] == "model"),
    }


def _show(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(variants, speed, videos, args, command: str) -> str:
    from detkd.ultralytics_internals import cpu_name

    lines = [
        f"# Deployment report: {args.student.name} (teacher {args.teacher.name})",
        "",
        f"{datetime.date.today().isoformat()}, {cpu_name()}, imgsz {args.imgsz}, data `{args.data}`, footage "
        f"`{args.footage}`. Command: `{command}`",
        "",
        "## Exports and parity",
        "",
        "| model | export | file | matched top detections | box max px | score max | AP PyTorch | AP export "
        "| AP diff | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        if v.label == "PyTorch":
            continue
        if v.parity is None:
            lines.append(f"| {v.role} | {v.label} | - | - | - | - | - | - | - | not made: {v.missing} |")
            continue
        p = v.parity
        lines.append(
            f"| {v.role} | {v.label} | {Path(p.export).name} | {p.matched}/{p.compared} | {_show(p.box_max_px, '.3f')} "
            f"| {_show(p.score_max, '.4f')} | {_show(p.ap_pytorch, '.4f')} | {_show(p.ap_export, '.4f')} "
            f"| {_show(p.ap_difference, '+.4f')} | {p.summary().removeprefix('parity: ')} |"
        )
    lines += [
        "",
        f"## Speed (model call alone; throughput at batch {args.batch}; {args.frames} timed calls at batch 1)",
        "",
        f"| model | AP | b1 p50 ms | b1 p95 ms | images/s b{args.batch} | predict p50 ms | params M | "
        f"GFLOPs@{args.imgsz} | size MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in sorted(variants, key=lambda v: v.role != "teacher"):  # the teacher's rows first: what distilling saves
        row = speed.get((v.role, v.label))
        if row is None:
            continue
        source = speed.get((v.role, "PyTorch"))  # an export has its checkpoint's network
        params, gflops = (source.params_m, source.gflops) if source else (None, None)
        note = f" ({row.throughput_note})" if row.throughput_note else ""
        lines.append(
            f"| {v.role} {v.label} | {_show(ap_of(v, variants), '.4f')} | {row.latency_p50_ms:.2f} "
            f"| {row.latency_p95_ms:.2f} | {_show(row.images_per_s, '.1f')}{note} | {row.predict_p50_ms:.2f} "
            f"| {_show(params, '.3f')} | {_show(gflops, '.2f')} | {row.size_mb:.2f} |"
        )
    lines += [
        "",
        "## Video",
        "",
        "Each run's frames/s is the whole loop's (decode, model, tracking, drawing, writing the MP4 and JSONL) after "
        "its first frame (which carries the model's and tracker's set-up, given separately) against the model call "
        "alone of the speed table (1000 / its batch-1 p50), both on the same runtime threads. Decoding (reader "
        "thread) and drawing and writing (writer thread) overlap the model thread's stages; the model thread's "
        "stages and its other work make a frame.",
        "",
    ]
    for run in (run for run in videos if run["per_frame_ms"] is not None):  # a video with frames
        s = run["summary"]
        verdict = "within" if run["within"] else "NOT within"
        lines += [
            f"### {run['role']} {run['label']} on `{Path(s['source']).name}` ({s['tracking'] or 'no'} tracking)",
            "",
            f"{s['frames']['processed']} frames processed in {s['wall_s']:.2f} s (the first, with set-up, in "
            f"{s['first_frame_s']:.2f} s): **{run['fps']:.1f} frames/s** after the first, "
            f"{run['ratio_to_model_call_b1']:.2f} × the model call's batch-1 rate ({run['model_call_rate_b1']:.1f}/s, "
            f"{verdict} {WITHIN:.0%}; both on {s['threads']} runtime threads)"
            + (
                ""
                if run["ratio_to_batch_throughput"] is None
                else f", {run['ratio_to_batch_throughput']:.2f} × its batch-{args.batch} throughput"
            )
            + f". Frames: {s['frames']['read']} read, {s['frames']['unreadable']} unreadable.",
            "",
            "| stage | thread | p50 ms | p95 ms | mean ms after the first frame | share of a frame |",
            "|---|---|---|---|---|---|",
        ]
        for stage, v in s["latency_ms"].items():
            mean = run["stage_mean_ms"][stage]
            lines.append(
                f"| {stage} | {run['stage_thread'][stage]} | {v['p50']:.2f} | {v['p95']:.2f} | {mean:.2f} "
                f"| {mean / run['per_frame_ms']:.0%} |"
            )
        lines += [
            f"| other (predictor call, loop, waits) | model | | | {run['other_ms']:.2f} "
            f"| {run['other_ms'] / run['per_frame_ms']:.0%} |",
            f"| **frame (wall, after the first)** | | | | {run['per_frame_ms']:.2f} | 100% |",
            "",
        ]
    return "\n".join(lines) + "\n"


def deploy_report(args, command: str) -> int:
    for path, what in ((args.student, "student"), (args.teacher, "teacher"), (args.data, "--data")):
        if not path.is_file():
            raise DetkdError(f"{path}: {what} not found")
    if args.data.suffix not in {".yaml", ".yml"}:
        raise DetkdError(f"{args.data}: give a YOLO data yaml (its val split is evaluated, its train split calibrates)")
    if not args.footage.is_file():
        raise DetkdError(f"{args.footage}: footage not found (make some with: detkd synth --video {args.footage})")
    unknown = set(args.formats) - {"onnx", "openvino"}
    if unknown:
        raise DetkdError(f"--formats {','.join(sorted(unknown))}: choose from onnx, openvino")
    variants = make_exports({"student": args.student, "teacher": args.teacher}, args)
    speed = measure_all(variants, args)
    videos = run_videos(variants, speed, args)
    report = {
        "command": command,
        "date": datetime.date.today().isoformat(),
        "imgsz": args.imgsz,
        "within": WITHIN,
        "models": [
            {
                "role": v.role,
                "label": v.label,
                "path": None if v.path is None else str(v.path),
                "missing": v.missing or None,
                "ap": ap_of(v, variants),
                "parity": None if v.parity is None else v.parity.to_json(),
                "speed": None if (v.role, v.label) not in speed else asdict(speed[v.role, v.label]),
            }
            for v in variants
        ],
        "video": videos,
    }
    save_json(report, args.out / "deploy.json")
    md = write_text(args.out / "deploy.md", markdown(variants, speed, videos, args, command))
    print(md.read_text(), end="")
    print(f"deploy_report: {md} and {args.out / 'deploy.json'}")
    return 0 if all(v.parity.passed for v in variants if v.parity is not None) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("student", type=Path, help="student checkpoint (.pt)")
    p.add_argument("teacher", type=Path, help="teacher checkpoint (.pt, Ultralytics)")
    p.add_argument("--data", type=Path, required=True, help="YOLO data yaml: AP on val, int8 calibration on train")
    p.add_argument("--footage", type=Path, required=True, help="video for detkd video (e.g. detkd synth --video)")
    p.add_argument("--imgsz", type=int, required=True)
    p.add_argument("--out", type=Path, required=True, help="folder: deploy.md, deploy.json, exports/, video/")
    p.add_argument("--formats", default="onnx,openvino", type=lambda s: s.split(","), help="(default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="throughput batch (default: %(default)s)")
    p.add_argument("--frames", type=int, default=100, help="timed batch-1 calls per model (default: %(default)s)")
    p.add_argument("--tracker", default="bytetrack", choices=("bytetrack", "botsort"), help="(default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu or a CUDA index (default: Ultralytics' choice)")
    p.add_argument("--threads", type=int, default=None, help="model runtime threads (default: OMP_NUM_THREADS or all)")
    args = p.parse_args(argv)
    try:
        return deploy_report(args, " ".join(["python tools/deploy_report.py", *argv]))
    except DetkdError as e:
        print(f"deploy_report: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
