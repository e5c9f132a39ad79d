"""The ``detkd`` command. Each subcommand is a thin layer over a library function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detkd.data.frames import DEDUPE_DEFAULT
from detkd.errors import DataError, DetkdError
from detkd.safe_load import TRUST_HELP, trust_checkpoints

DEDUPE_HELP = (
    "skip a video frame whose 32x32 grayscale thumbnail differs from the last frame taken by less than this many "
    "gray levels on average (default: %(default)s; 0 keeps every frame)"
)
THREADS_HELP = (
    "threads of the model's runtime, in one pool: torch for .pt and .torchscript, ONNX Runtime for .onnx "
    "(default: OMP_NUM_THREADS, else every core)"
)


def _synth(args) -> None:
    from detkd.data.synth import SynthConfig, generate_synthetic

    if args.video:
        from detkd.data.footage import write_footage

        if args.out or args.train is not None or args.val is not None:
            raise DetkdError("--video writes footage: --out, --train and --val apply to scene sets")
        frames = 300 if args.frames is None else args.frames
        fps = 15.0 if args.fps is None else args.fps
        paths = write_footage(args.video, frames=frames, imgsz=args.imgsz, fps=fps, seed=args.seed)
        for label, path in zip(("video", "COCO", "MOT gt"), paths):
            print(f"{label}: {path}")
        return
    if not args.out:
        raise DetkdError("give --out DIR (a scene set) or --video OUT.mp4 (footage)")
    if args.frames is not None or args.fps is not None:
        raise DetkdError("--frames and --fps apply to footage (--video)")
    args.train = 1000 if args.train is None else args.train
    args.val = 200 if args.val is None else args.val
    data_yaml = generate_synthetic(
        args.out, train=args.train, val=args.val, seed=args.seed, cfg=SynthConfig(imgsz=args.imgsz)
    )
    print(f"YOLO data: {data_yaml}")
    for split in ("train", "val"):
        print(f"COCO {split}: {Path(args.out) / 'annotations' / f'instances_{split}.json'}")


def _data_check(args) -> int:
    from detkd.data import check_dataset

    report = check_dataset(args.data, images_dir=args.images)
    print(report.format())
    if args.unlabeled:
        from detkd.data.frames import collect_frames

        print(collect_frames(args.unlabeled, every=args.every, dedupe=args.dedupe).format())
    return 0 if report.ok else 1


def _pseudo_label(args) -> None:
    from detkd.pseudo_label import pseudo_label

    report = pseudo_label(
        args.teacher,
        args.source,
        args.out,
        conf=args.conf,
        every=args.every,
        imgsz=args.imgsz,
        dedupe=args.dedupe,
        batch=args.batch,
        device=args.device,
    )
    print(report.format())


def _data_convert(args) -> None:
    from detkd.data import convert

    print(convert(args.data, args.to, args.out, images_dir=args.images))


def _eval(args) -> None:
    from detkd.evaluation import default_eval_out, evaluate_checkpoint, format_table

    out = args.out or str(default_eval_out(args.model))
    metrics = evaluate_checkpoint(
        args.model,
        args.data,
        imgsz=args.imgsz,
        out=out,
        images_dir=args.images,
        split=args.split,
        batch=args.batch,
        device=args.device,
    )
    print(format_table({Path(args.model).stem: metrics}))
    print(f"metrics: {out}")


def _export(args) -> int:
    import json

    from detkd.export import check_and_record, export_model

    if args.half and args.int8:
        raise DetkdError("--half and --int8 exclude each other: choose one precision")
    precision = "fp16" if args.half else "int8" if args.int8 else "fp32"
    if args.check:
        ignored = [flag for flag, on in (("--out", args.out), ("--dynamic", args.dynamic)) if on]
        if ignored:
            raise DetkdError(f"--check {args.check} checks an existing export: {', '.join(ignored)} do not apply")
        exported = args.check
    else:
        exported = export_model(
            args.model,
            format=args.format,
            imgsz=args.imgsz,
            precision=precision,
            data=args.data,
            dynamic=args.dynamic,
            batch=args.batch,
            nms=args.nms,
            out=args.out,
            device=args.device,
        )
        print(f"export: {exported}")
    report, path = check_and_record(
        args.model, exported, imgsz=args.imgsz, precision=precision, data=args.data, device=args.device, nms=args.nms
    )
    print(json.dumps(report.to_json(), indent=1))
    print(f"parity report: {path}")
    print(report.summary())
    return 0 if report.passed else 1


def _video(args) -> int:
    from detkd.video import run_video, summary_path

    summary = run_video(
        args.source,
        args.model,
        out=args.out,
        jsonl=args.jsonl,
        track=args.tracker if args.track else None,
        imgsz=args.imgsz,
        conf=args.conf,
        classes=args.classes,
        vid_stride=args.vid_stride,
        device=args.device,
        threads=args.threads,
    )
    print(summary.format())
    outputs = (("video", args.out), ("detections", args.jsonl), ("summary", summary_path(args.out, args.jsonl)))
    for label, path in outputs:
        if path:
            print(f"{label}: {path}")
    return 130 if summary.interrupted else 0


def _speed(args) -> None:
    from detkd.speed import measure_speed, speed_json, speed_table
    from detkd.utils import save_json

    try:
        batches = tuple(int(b) for b in args.batch.split(","))
    except ValueError:
        raise DetkdError(f"--batch {args.batch}: expected batch sizes separated by commas (1,8)") from None
    rows = [measure_speed(m, args.imgsz, batches, args.device, args.frames, args.threads) for m in args.models]
    print(speed_table(rows, args.imgsz))
    print(f"speed: {save_json(speed_json(rows, args.imgsz, batches, args.frames), args.out)}")


def _train(args) -> None:
    from detkd.engine import distill

    overrides = _overrides(args.overrides)
    if args.recipe.startswith("resume="):  # detkd train resume=RUN_DIR_OR_LAST_PT
        overrides["resume"] = args.recipe.split("=", 1)[1]
        args.recipe = None
    print(f"best: {distill(args.recipe, **overrides)}")


def _transfer(args) -> None:
    from detkd.transfer import report_path, transfer

    report = transfer(args.source, args.student, args.out, data=args.data, kind=args.kind)
    print(report.format())
    print(f"checkpoint: {args.out}\nreport: {report_path(args.out)}")


def _diagnose(args) -> None:
    from detkd.diagnose import diagnose_recipe, diagnose_run
    from detkd.utils import save_json

    if Path(args.target).is_dir():
        if args.overrides:
            raise DetkdError(f"{args.target}: key=value overrides apply to a recipe, not to a finished run")
        diagnosis = diagnose_run(args.target, baseline=args.baseline)
    else:
        diagnosis = diagnose_recipe(
            args.target,
            args.overrides,
            baseline=args.baseline,
            batches=args.batches,
            images=args.images,
            device=args.device,
        )
    print(diagnosis.format())
    if args.out:
        print(f"diagnosis: {save_json(diagnosis.to_json(), args.out)}")


def _teacher_backbone(args) -> None:
    from detkd.backbone_pretrain import CropsPretraining, pretrain_backbone

    settings = CropsPretraining(args.arch, args.epochs, args.per_class, args.imgsz, args.batch, args.seed)
    print(f"backbone: {pretrain_backbone(args.out, settings, workers=args.workers, device=args.device)}")


def _teacher_train(args) -> None:
    import json

    from detkd.evaluation import format_table
    from detkd.teacher_train import train_teacher

    teacher = train_teacher(
        args.arch,
        args.data,
        epochs=args.epochs,
        imgsz=args.imgsz,
        out=args.out,
        batch=args.batch,
        device=args.device,
        workers=args.workers,
        lr=args.lr,
        seed=args.seed,
        weights=args.weights,
        backbone=args.backbone_weights,
    )
    metrics = json.loads((teacher.parent / "coco_metrics.json").read_text())
    print(format_table({teacher.stem: metrics}))
    print(f"teacher: {teacher}")


def _overrides(pairs: list[str]) -> dict:
    from detkd.config import parse_overrides

    return parse_overrides(pairs)


def _quickstart(args) -> None:
    from detkd.quickstart import quickstart

    quickstart(args.dir, epochs=args.epochs, train=args.train, val=args.val)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detkd", description="Knowledge distillation and transfer for object detectors."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("quickstart", help="the main job on built-in synthetic data, end to end")
    p.add_argument("--dir", default="runs/quickstart", help="where data and runs go (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="override the training budget (smoke runs)")
    p.add_argument("--train", type=int, default=None, help="training scenes (default: 500)")
    p.add_argument("--val", type=int, default=None, help="validation scenes (default: 100)")
    p.set_defaults(func=_quickstart)

    p = sub.add_parser("train", help="distil a teacher into a student from a recipe (and start it from weights: init)")
    p.add_argument(
        "recipe",
        help="recipe YAML, or a built-in recipe's name (recommended, ...), or resume=RUN_DIR to continue a killed run",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="recipe keys (teacher=, student=, data=, distill.logit.weight=, init.source=null) or any Ultralytics "
        "training key",
    )
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=_train)

    p = sub.add_parser("diagnose", help="will distillation help this pair (a recipe), or why did it not (a run)")
    p.add_argument("target", help="recipe YAML (before training) or a run folder with results.csv (after)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, as for detkd train")
    p.add_argument(
        "--baseline",
        help="the student trained alone: its checkpoint (recipe) or run folder (run; default: the benchmark's "
        "alone_s<seed> beside the run)",
    )
    p.add_argument("--batches", type=int, default=4, help="training batches to weigh the terms on (default: 4)")
    p.add_argument("--images", type=int, default=200, help="val images to score the teacher on (default: 200)")
    p.add_argument("--device", default=None, help="cpu, 0 ... (default: cpu)")
    p.add_argument("--out", help="also write the diagnosis (findings and every number) as JSON")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=_diagnose)

    p = sub.add_parser("transfer", help="initialise a student's weights from another model")
    p.add_argument("--source", required=True, help="classification or detection checkpoint (.pt)")
    p.add_argument("--student", required=True, help="student model config (yolov8n.yaml) or checkpoint")
    p.add_argument("--out", required=True, help="checkpoint to write (a plain Ultralytics checkpoint)")
    p.add_argument("--data", help="YOLO data yaml: the student's class names")
    p.add_argument("--kind", default="auto", choices=("auto", "classifier", "detector", "larger"))
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=_transfer)

    # listed for --help; its own options are parsed by detkd.benchmark (see main below)
    sub.add_parser("benchmark", help="compare methods at one budget: detkd benchmark --profile quick|cpu|gpu ...")

    teacher = sub.add_parser("teacher", help="train a torchvision two-stage teacher").add_subparsers(
        dest="teacher_command", required=True, metavar="ACTION"
    )
    p = teacher.add_parser("train", help="train a Faster R-CNN on letterboxed images, as distillation will feed it")
    p.add_argument("--arch", required=True, help="fasterrcnn_resnet18_fpn, fasterrcnn_resnet50_fpn_v2, ...")
    p.add_argument(
        "--weights",
        default=None,
        help="fine-tune these detector weights (a torchvision state dict file, or a weights name of ARCH in "
        "torchvision's cache: COCO_V1): a new box predictor for the data's classes, the backbone's batch norms "
        "frozen (default: from scratch; never downloads)",
    )
    p.add_argument(
        "--backbone-weights",
        default=None,
        help="start the backbone from a torchvision ResNet classifier's state dict file (ImageNet's, or "
        "detkd teacher backbone's), its batch norms frozen",
    )
    p.add_argument("--data", required=True, help="YOLO data .yaml or COCO instances .json (train and val splits)")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--imgsz", type=int, required=True, help="letterboxed input size, a multiple of 32")
    p.add_argument("--out", required=True, help="folder: teacher.pt, results.csv, coco_metrics.json, weights/last.pt")
    p.add_argument("--batch", type=int, default=8, help="(default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, 0 ... (default: Ultralytics' choice)")
    p.add_argument("--workers", type=int, default=2, help="data loader processes (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.02, help="SGD learning rate at batch 16 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.set_defaults(func=_teacher_train)
    p = teacher.add_parser(
        "backbone", help="train a ResNet classifier on synthetic object crops: --backbone-weights without ImageNet"
    )
    p.add_argument("--out", required=True, help="state dict file for detkd teacher train --backbone-weights")
    p.add_argument(
        "--arch", default="resnet18", help="resnet18 or resnet50: the detector's ResNet (default: %(default)s)"
    )
    p.add_argument("--epochs", type=int, default=6, help="(default: %(default)s)")
    p.add_argument("--per-class", type=int, default=300, help="training crops per class (default: %(default)s)")
    p.add_argument("--imgsz", type=int, default=64, help="crop size (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="data loader processes (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, 0 ... (default: Ultralytics' choice)")
    p.set_defaults(func=_teacher_backbone)

    p = sub.add_parser("synth", help="generate synthetic traffic scenes (YOLO and COCO formats) or footage (MP4)")
    p.add_argument("--out", help="output folder of a scene set")
    p.add_argument("--train", type=int, default=None, help="training images (default: 1000)")
    p.add_argument("--val", type=int, default=None, help="validation images (default: 200)")
    p.add_argument(
        "--video", help="write footage instead: moving traffic as an MP4, with <stem>.coco.json and <stem>.gt.txt"
    )
    p.add_argument("--frames", type=int, default=None, help="footage length in frames (default: 300)")
    p.add_argument("--fps", type=float, default=None, help="footage frame rate (default: 15)")
    p.add_argument("--imgsz", type=int, default=160, help="image side in pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the set is a pure function of the seed (default: %(default)s)")
    p.set_defaults(func=_synth)

    data = sub.add_parser("data", help="check or convert detection data sets").add_subparsers(
        dest="data_command", required=True, metavar="ACTION"
    )
    images_help = "image folder for a COCO json (default: beside the json or its parent)"
    p = data.add_parser("check", help="report unreadable images, bad labels, missing files, duplicate ids")
    p.add_argument("data", help="YOLO data .yaml or COCO instances .json")
    p.add_argument("--images", help=images_help)
    p.add_argument(
        "--unlabeled",
        nargs="+",
        metavar="SOURCE",
        help="also check unlabeled frames: folders, globs, video files (unreadable files, frames taken per video)",
    )
    p.add_argument("--every", type=int, default=1, help="with --unlabeled: one video frame in N (default: 1)")
    p.add_argument("--dedupe", type=float, default=DEDUPE_DEFAULT, help=DEDUPE_HELP)
    p.set_defaults(func=_data_check)
    p = data.add_parser("convert", help="convert between COCO json and YOLO layouts, keeping ids and names")
    p.add_argument("data", help="YOLO data .yaml or COCO instances .json")
    p.add_argument("--to", required=True, choices=("coco", "yolo"))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--images", help=images_help)
    p.set_defaults(func=_data_convert)

    p = sub.add_parser("pseudo-label", help="label unlabeled images or video frames with a teacher (a YOLO data set)")
    p.add_argument("--teacher", required=True, help="teacher checkpoint: Ultralytics YOLO or detkd torchvision teacher")
    p.add_argument("--source", required=True, nargs="+", help="image folders, globs, image or video files")
    p.add_argument("--out", required=True, help="a new or empty folder for the data set")
    p.add_argument("--conf", type=float, default=0.25, help="lowest teacher score kept as a box (default: %(default)s)")
    p.add_argument("--every", type=int, default=1, help="one video frame in N (default: %(default)s)")
    p.add_argument("--imgsz", type=int, default=640, help="the teacher's inference size (default: %(default)s)")
    p.add_argument("--dedupe", type=float, default=DEDUPE_DEFAULT, help=DEDUPE_HELP)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default=None, help="cpu, 0 ... (default: Ultralytics' choice)")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=_pseudo_label)

    p = sub.add_parser("export", help="export a checkpoint (ONNX, TorchScript, OpenVINO, TensorRT) and check parity")
    p.add_argument("model", help="Ultralytics checkpoint (.pt)")
    p.add_argument("--format", default="onnx", choices=("onnx", "torchscript", "openvino", "engine"))
    p.add_argument("--imgsz", type=int, default=640, help="input size of the export (default: %(default)s)")
    p.add_argument("--half", action="store_true", help="fp16 export (its AP drop is reported, not judged)")
    p.add_argument("--int8", action="store_true", help="int8 export calibrated on --data (AP drop reported)")
    p.add_argument("--data", help="YOLO data .yaml or COCO json: parity on its val images with COCO AP of both")
    p.add_argument("--dynamic", action="store_true", help="dynamic input shape")
    p.add_argument("--batch", type=int, default=1, help="batch size of the export (default: %(default)s)")
    p.add_argument("--nms", action="store_true", help="NMS inside the exported model (with --check: the export has it)")
    p.add_argument("--out", help="where the export goes (default: beside the checkpoint, Ultralytics' name)")
    p.add_argument("--device", default=None, help="cpu, 0 ... (default: cpu; TensorRT: 0)")
    p.add_argument("--check", metavar="EXPORT", help="do not export: check the parity of this existing export")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=_export)

    p = sub.add_parser("eval", help="COCO mAP (12-number table) of a checkpoint or an exported model")
    p.add_argument(
        "--model",
        required=True,
        help="Ultralytics checkpoint (.pt), detkd torchvision teacher (.pt) or export (.onnx, .torchscript, "
        "_openvino_model/)",
    )
    p.add_argument("--data", required=True, help="YOLO data .yaml or COCO instances .json")
    p.add_argument("--imgsz", type=int, default=640, help="inference size (default: %(default)s)")
    p.add_argument("--out", help="metrics JSON (default: runs/eval/<model>/metrics.json); detections go beside it")
    p.add_argument("--images", help=images_help)
    p.add_argument("--split", default="val", help="split of a YOLO data yaml (default: %(default)s)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default=None, help="cpu, 0, 0,1 ... (default: Ultralytics' choice)")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=_eval)

    p = sub.add_parser("video", help="detect (and track) on a video, frame folder, camera or stream; annotated MP4")
    p.add_argument("source", help="video file, folder of frames, camera index (0) or RTSP/HTTP URL")
    p.add_argument("--model", required=True, help="Ultralytics checkpoint (.pt) or export (.onnx, .torchscript, ...)")
    p.add_argument("--out", help="annotated MP4 (boxes, class, score, track id)")
    p.add_argument("--jsonl", help="detections, one JSON line per frame")
    p.add_argument("--track", action="store_true", help="track objects across frames (ids in the MP4 and JSONL)")
    p.add_argument("--tracker", default="bytetrack", choices=("bytetrack", "botsort"), help="(default: %(default)s)")
    p.add_argument("--imgsz", type=int, default=640, help="inference size (default: %(default)s)")
    p.add_argument("--conf", type=float, default=None, help="score threshold (default: 0.25; 0.1 with --track)")
    p.add_argument("--classes", nargs="+", help="keep only these classes (indices or names)")
    p.add_argument("--vid-stride", type=int, default=1, help="process every N-th frame (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, 0 ... (default: Ultralytics' choice)")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=_video)

    p = sub.add_parser("speed", help="latency and throughput of checkpoints and exports, side by side")
    p.add_argument("models", nargs="+", metavar="MODEL", help="checkpoints (.pt) and exports (.onnx, ...)")
    p.add_argument("--imgsz", type=int, default=640, help="input size (default: %(default)s)")
    p.add_argument("--batch", default="1,8", help="latency at the first, throughput at the last (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, 0 ... (default: Ultralytics' choice)")
    p.add_argument("--frames", type=int, default=100, help="timed calls at batch 1 (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--out", default="runs/speed/speed.json", help="JSON of every number (default: %(default)s)")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=_speed)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["benchmark"]:
        from detkd.benchmark import main as benchmark_main

        return benchmark_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        with trust_checkpoints(getattr(args, "trust_checkpoint", False)):
            return args.func(args) or 0
    except DataError as e:
        if e.report is not None:
            print(e.report.format(), file=sys.stderr)
        print(f"detkd: error: {e}", file=sys.stderr)
        return 2
    except DetkdError as e:
        print(f"detkd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
