"""``detkd diagnose``: before training, will this teacher help this student on this data; after a run, why it did
or did not.

"Distillation gave no improvement" is the most frequent complaint in every distillation tracker, and its causes
are few and measurable before the first epoch: a teacher that is not clearly better than what the student can
become, classes the teacher does not know, terms whose gradients drown the task loss (or vanish under it),
features that do not line up. :func:`diagnose_recipe` measures each on the user's own data and pair, in minutes;
:func:`diagnose_run` reads a finished run's ``results.csv`` beside its teacher and, when one exists, the student
trained alone. :func:`judge` turns the measurements into findings in plain words, each with concrete advice; it is
a pure function of the numbers, so what it says is tested on its own.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from detkd.config import Recipe, load_recipe
from detkd.errors import DetkdError
from detkd.utils import read_results

# Calibration: the ratio of each term's gradient norm to the task loss's at the student's initialisation, for the
# weights that won the recipe screens (soft class targets ×2, LD ×8), measured on the setup those screens used: a
# yolov8s teacher of AP ≈ 0.14-0.19 on the synthetic scenes, a yolov8n from scratch (2026-11-30: the `converged`
# profile's teacher after 9 epochs, AP 0.141; `detkd diagnose recommended teacher=... data=... imgsz=128
# --images 150 --batches 8`, then the recipe's v1 (no init): kd_cls 0.89, kd_box 0.21; with its epoch-3 checkpoint,
# AP 0.025: 1.43 and 0.27). On the v2 recipe's weight-selected start (the converged teacher, AP 0.439): 0.52 and
# 0.60, inside the slack.
# A term more than BALANCE_SLACK times off its ratio is flagged, with the weight that restores it.
TERM_GRADIENT_RATIO = {"kd_cls": 0.9, "kd_box": 0.2}
DEFAULT_GRADIENT_RATIO = 0.5  # feature terms (none won a screen): between the two
BALANCE_SLACK = 10.0
# the terms of a two-stage teacher's RoI head (detkd.losses.second_stage) and the recipe keys that weigh them
SECOND_STAGE_TERMS = {
    "kd_rcnn_cls": "distill.second_stage.cls_weight",
    "kd_rcnn_box": "distill.second_stage.box_weight",
}
TEACHER_MIN_AP = 0.01  # below this a teacher's outputs are noise on this data (untrained, or another domain)
TEACHER_MARGIN = 0.02  # a teacher must beat the student trained alone by at least this AP to have much to teach
CAPACITY_RATIO = 1.5  # a teacher with fewer than 1.5× the student's parameters is hardly larger
WEAK_CLASS_FRACTION = 0.5  # classes where the teacher's AP is below half its mean are flagged


@dataclass
class Finding:
    severity: Literal["ok", "info", "warn", "error"]  # info: worth knowing, no effect on the verdict
    topic: str  # teacher, classes, balance, features, run
    message: str  # what was measured, what it means, what to do


@dataclass
class Diagnosis:
    subject: str  # the recipe or run folder diagnosed
    measurements: dict[str, Any]
    findings: list[Finding] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        errors = [f for f in self.findings if f.severity == "error"]
        warnings = [f for f in self.findings if f.severity == "warn"]
        if self.measurements.get("kind") == "run":
            return _run_verdict(self.measurements, errors, warnings)
        if errors:
            return f"distillation will not help as set up: {len(errors)} problem(s) to fix first (marked ✗)"
        if warnings:
            return f"distillation may help, less than it could: {len(warnings)} thing(s) to adjust (marked !)"
        return "distillation should help: the teacher is clearly ahead, classes pair, terms are balanced"

    def format(self) -> str:
        marks = {"ok": "✓", "info": "·", "warn": "!", "error": "✗"}
        lines = [f"detkd diagnose: {self.subject}"]
        lines += [f"  {marks[f.severity]} [{f.topic}] {f.message}" for f in self.findings]
        lines.append(f"verdict: {self.verdict}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "subject": self.subject,
            "verdict": self.verdict,
            "findings": [vars(f) for f in self.findings],
            "measurements": self.measurements,
        }


def _run_verdict(m: dict, errors: list[Finding], warnings: list[Finding]) -> str:
    if errors:
        return "the run has a problem to fix (marked ✗)"
    if m.get("gain") is None:
        return "no run of the student alone to compare with (give --baseline RUN_DIR)"
    gain, distilled = m["gain"], bool(m["terms"])
    what = {(True, True): "the recipe (transferred weights and distillation)", (True, False): "the transferred weights"}
    what = what.get((bool(m.get("transferred")), distilled), "distillation")
    return f"{what} {'helped' if gain > 0 else 'did not help'}: {gain:+.4f} mAP50-95 over the student alone"


# --- judging: numbers → findings ------------------------------------------------------------------------------


def judge(m: dict[str, Any]) -> list[Finding]:
    """Findings from a recipe's measurements (the dict :func:`measure_recipe` returns); pure, so it is testable."""
    return [*_judge_teacher(m), *_judge_init(m), *_judge_classes(m), *_judge_balance(m), *_judge_features(m)]


def _judge_init(m: dict) -> list[Finding]:
    """Worth knowing (info): where the student starts, when the recipe transfers weights; advice, not a fault, for a
    student that could start from its teacher's weights but does not."""
    if m.get("transferred"):
        return [
            Finding(
                "info",
                "init",
                f"the student starts from transferred weights ({m['transferred']:.0%} of them, the recipe's init): the "
                "balance and feature similarity below are measured on that start",
            )
        ]
    selectable = m.get("selectable_from_teacher")
    if not selectable:
        return []
    return [
        Finding(
            "info",
            "init",
            f"the teacher is a larger model of the student's family: {selectable:.0%} of the student's weights can "
            "be selected from it (weight selection, detkd transfer). Start from them as well as distilling "
            "(init.source=teacher, as the recommended recipe does; over a student checkpoint's own weights: "
            "init.optional=false): in detkd's benchmarks that was the largest gain, at 20 epochs and at "
            "convergence (README, Benchmarks).",
        )
    ]


def _judge_teacher(m: dict) -> list[Finding]:
    t = m["teacher"]
    ap, out = t["AP"], []
    if ap is None:
        return [Finding("warn", "teacher", f"the teacher's AP could not be measured on this data: {t['error']}")]
    if ap < TEACHER_MIN_AP:
        return [
            Finding(
                "error",
                "teacher",
                f"the teacher's COCO AP on the val split is {ap:.4f}: it is untrained, or trained for other data. "
                "Its outputs are noise that the student would learn: train or fine-tune the teacher on this data "
                "first (check with `detkd eval --model TEACHER.pt --data DATA`).",
            )
        ]
    base = m.get("baseline")
    if base is not None and ap < base["AP"] + TEACHER_MARGIN:
        out.append(
            Finding(
                "warn",
                "teacher",
                f"the teacher's AP {ap:.4f} is not clearly above the student trained alone ({base['AP']:.4f}): a "
                "teacher the student can reach has little to teach and caps it near its own level. Use a stronger "
                "teacher (larger, trained longer or on more data), or decay the distillation "
                "(distill.schedule.decay=linear) so the student can pass it.",
            )
        )
    ratio = t["parameters"] / max(m["student"]["parameters"], 1)
    if ratio < CAPACITY_RATIO:
        out.append(
            Finding(
                "warn",
                "teacher",
                f"the teacher has only {ratio:.1f}× the student's parameters: trained as long, the student may "
                "reach it. Distil from a larger model, or compare with --baseline STUDENT_ALONE.pt.",
            )
        )
    if not out:
        against = f", {ap - base['AP']:+.4f} over the student alone" if base else ""
        out.append(
            Finding("ok", "teacher", f"AP {ap:.4f} on {t['images']} val images{against}, {ratio:.1f}× the parameters")
        )
    if weak := _weak_classes(t.get("per_class", {}), ap):
        out.append(
            Finding(
                "info",
                "teacher",
                f"it is weak on {', '.join(f'{n} ({v:.3f})' for n, v in weak)} (its mean AP {ap:.3f}): its soft "
                "targets there teach little; expect the gain on the other classes",
            )
        )
    return out


def _weak_classes(per_class: dict[str, float], mean_ap: float) -> list[tuple[str, float]]:
    return [(n, v) for n, v in per_class.items() if 0 <= v < WEAK_CLASS_FRACTION * mean_ap]


def _judge_classes(m: dict) -> list[Finding]:
    c = m["classes"]
    if c.get("error"):
        return [Finding("error", "classes", c["error"])]
    if not m["weights"].get("kd_cls"):
        return []
    if not c["paired"]:
        return [
            Finding(
                "error",
                "classes",
                "no student class has a teacher counterpart (by name or class_map): the soft class targets have "
                "nothing to teach. Map them: distill.class_map: {student_name: teacher_name}.",
            )
        ]
    if c["unpaired"]:
        return [
            Finding(
                "warn",
                "classes",
                f"{len(c['unpaired'])} of {len(c['unpaired']) + len(c['paired'])} student classes get no soft "
                f"target ({', '.join(c['unpaired'][:8])}): add them to distill.class_map if the teacher knows them "
                "under another name.",
            )
        ]
    return [Finding("ok", "classes", f"all {len(c['paired'])} student classes pair with a teacher class")]


def balanced_weight(term: str, weight: float, gradient_ratio: float) -> float:
    """The weight that brings ``term``'s gradient to its calibrated share of the task loss's gradient."""
    return weight * TERM_GRADIENT_RATIO.get(term, DEFAULT_GRADIENT_RATIO) / gradient_ratio


def _judge_balance(m: dict) -> list[Finding]:
    out = []
    for term, b in m.get("balance", {}).get("terms", {}).items():
        weight, ratio = m["weights"][term], b["gradient_ratio"]
        target = TERM_GRADIENT_RATIO.get(term, DEFAULT_GRADIENT_RATIO)
        key = _weight_key(term, m)
        if not math.isfinite(ratio):
            out.append(Finding("error", "balance", f"{term} is not finite on real batches: check the data and pair"))
        elif ratio > target * BALANCE_SLACK or ratio < target / BALANCE_SLACK:
            verb, what = ("lower", "drowns") if ratio > target else ("raise", "vanishes under")
            suggested = balanced_weight(term, weight, ratio)
            out.append(
                Finding(
                    "warn",
                    "balance",
                    f"{term}'s gradient is {ratio:.3g}× the task loss's (value {b['value']:.3g} vs "
                    f"{m['balance']['task']:.3g}): it {what} the task. "
                    f"{verb.capitalize()} {key} to ≈ {suggested:.2g} (now {weight:g}).",
                )
            )
        else:
            out.append(Finding("ok", "balance", f"{term}: gradient {ratio:.3g}× the task loss's, weight {weight:g}"))
    return out


def _weight_key(term: str, m: dict) -> str:
    if term == "kd_cls":
        return "distill.logit.weight"
    if term == "kd_box":
        return "distill.box.weight"
    if term in SECOND_STAGE_TERMS:
        return SECOND_STAGE_TERMS[term]
    if term == "pseudo":  # the labeled images' missed boxes (detkd.engine.criterion.MISSED)
        return "distill.pseudo.weight"
    index = m["feature_terms"].index(term)
    return f"distill.feature[{index}].weight"


def _judge_features(m: dict) -> list[Finding]:
    levels = m.get("features", [])
    if not levels:
        return []
    unpaired = [lv for lv in levels if lv["teacher_level"] is None]
    if unpaired and m["feature_terms"]:
        strides = ", ".join(str(lv["stride"]) for lv in unpaired)
        return [
            Finding(
                "error",
                "features",
                f"student levels at stride {strides} have no teacher level with the same stride: feature terms "
                "cannot pair them; restrict distill.feature[].levels to the shared strides.",
            )
        ]
    parts = [
        f"stride {lv['stride']}: {lv['student_channels']}→{lv['teacher_channels']} ch, CKA {lv['cka']:.2f}"
        for lv in levels
        if lv["teacher_level"] is not None
    ]
    return [
        Finding(
            "ok",
            "features",
            "levels pair by stride (" + "; ".join(parts) + "); linear CKA at the student's initialisation says how "
            "far its features start from the teacher's (1 = same up to rotation and scale)",
        )
    ]


# --- measuring a recipe ---------------------------------------------------------------------------------------


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA (Kornblith et al., ICML 2019) between two representations of the same n samples: (n, p), (n, q).

    ‖Yᵀ X‖²_F / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F) on column-centred matrices; invariant to rotations and isotropic scaling of
    either side, so feature maps of different widths compare directly.
    """
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = (y.T @ x).norm() ** 2
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()).clamp(min=1e-12))


def _paired_positions(s: Tensor, t: Tensor, limit: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Student and teacher feature maps (N, C, H, W) of one level → (≤ limit, C) each: the feature vectors at the
    same random image positions (the same rows in both, so they describe the same samples)."""
    if s.shape[-2:] != t.shape[-2:]:
        s = torch.nn.functional.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
    rows_s = s.detach().float().permute(0, 2, 3, 1).reshape(-1, s.shape[1])
    rows_t = t.detach().float().permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    keep = torch.randperm(rows_s.shape[0], generator=generator)[:limit]
    return rows_s[keep].cpu(), rows_t[keep].cpu()


def _gradient_norm(value: Tensor, params: list[Tensor]) -> float:
    if not value.requires_grad:
        return 0.0
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def _evaluate_ap(predict: Callable[[Any], list[dict]], data: str, images: int) -> dict[str, Any]:
    """COCO AP and AP per class of a model's COCO-format detections (``predict(dataset)``) on the first ``images``
    of the val split (AP None, with the reason, when its classes are none of the data's)."""
    from detkd.data import load_data
    from detkd.evaluation import ap_per_class, coco_evaluate

    dataset = load_data(data, split="val")
    kept = dataset.images[:images]
    ids = {im.id for im in kept}
    subset = replace(dataset, images=kept, annotations=[a for a in dataset.annotations if a.image_id in ids])
    try:
        detections = predict(subset)
    except DetkdError as e:
        return {"AP": None, "error": str(e), "per_class": {}, "images": len(kept)}
    ap = coco_evaluate(subset, detections)["AP"]
    return {"AP": ap, "per_class": ap_per_class(subset, detections), "images": len(kept)}


def measure_recipe(
    recipe: Recipe,
    baseline: str | None = None,
    batches: int = 4,
    images: int = 200,
    device: str | None = None,
) -> dict[str, Any]:
    """Everything :func:`judge` needs, measured on the recipe's data and pair (a few minutes on a CPU)."""
    from detkd.ultralytics_internals import ultralytics_offline

    ultralytics_offline()
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.nn.tasks import DetectionModel

    from detkd.adapters.teachers import create_teacher
    from detkd.adapters.torchvision import TorchvisionAdapter
    from detkd.adapters.ultralytics import UltralyticsAdapter, load_ultralytics_model
    from detkd.data import check_dataset
    from detkd.distiller import Distiller, class_pairs
    from detkd.engine.api import resolve_teacher
    from detkd.engine.criterion import MISSED, DistillationCriterion
    from detkd.evaluation import predict_checkpoint, predict_teacher

    if not recipe.teacher or not recipe.data:
        raise DetkdError("recipe: diagnose needs 'teacher' and 'data' (give teacher=T.pt data=DATA.yaml)")
    recipe = resolve_teacher(recipe)  # as training will: an optional init the teacher cannot give is dropped
    check_dataset(recipe.data).raise_if_errors()
    cfg = get_cfg(overrides={k: v for k, v in recipe.train.items() if k not in ("model", "data")})
    from ultralytics.utils.torch_utils import select_device

    dev = select_device(device or "cpu", verbose=False)  # "0", "cuda:0", "cpu" as everywhere in Ultralytics
    imgsz = int(cfg.imgsz)
    data = check_det_dataset(str(recipe.data))
    names = dict(data["names"])

    teacher = create_teacher(recipe.teacher, dev, recipe.teacher_weights)
    if Path(recipe.student).suffix in {".yaml", ".yml"}:
        torch.manual_seed(0)
        student = DetectionModel(recipe.student, nc=len(names), verbose=False)
        student.names = names
    else:
        student = load_ultralytics_model(recipe.student, role="student")
    from detkd.transfer import load_model, transfer_weights

    selectable = transferred = None
    if recipe.init.source:
        transferred = transfer_weights(load_model(recipe.init_checkpoint), student, recipe.init.kind)
        transferred = transferred.fraction_from_source
    elif not isinstance(teacher, TorchvisionAdapter):  # could it start from the teacher's weights?
        with contextlib.suppress(DetkdError):  # another family, or not larger: nothing to advise
            selectable = transfer_weights(teacher.model, copy.deepcopy(student), "larger").fraction_from_source
    student = student.to(dev).train()
    student.args = cfg  # Ultralytics' criterion reads its loss gains (box, cls, dfl) from here
    student_view = UltralyticsAdapter(student)

    # a torchvision teacher is evaluated as it teaches, from its adapter (a named one has no checkpoint to load)
    teacher_predict = (
        partial(predict_teacher, teacher, imgsz=imgsz)
        if isinstance(teacher, TorchvisionAdapter)
        else partial(predict_checkpoint, recipe.teacher, imgsz=imgsz, device=device)
    )
    d = recipe.distill
    m: dict[str, Any] = {
        "kind": "recipe",
        "teacher": {
            **_evaluate_ap(teacher_predict, recipe.data, images),
            "parameters": sum(p.numel() for p in teacher.model.parameters()),
        },
        "student": {"parameters": sum(p.numel() for p in student.parameters())},
        "selectable_from_teacher": selectable,  # the student's share of weights selectable from the teacher's
        "transferred": transferred,  # the share the recipe's init.source gave the student (measured with it)
        "weights": {
            k: w
            for k, w in (
                ("kd_cls", d.logit.weight),
                ("kd_box", d.box.weight),
                ("kd_rcnn_cls", d.second_stage.cls_weight),
                ("kd_rcnn_box", d.second_stage.box_weight),
                (MISSED, d.pseudo.weight if d.pseudo else 0.0),
            )
            if w > 0
        },
        "feature_terms": [],
    }
    if baseline:
        m["baseline"] = _evaluate_ap(
            partial(predict_checkpoint, baseline, imgsz=imgsz, device=device), recipe.data, images
        )
    try:
        paired, _ = class_pairs(names, teacher.names, recipe.distill.class_map)
        m["classes"] = {
            "paired": [names[i] for i in paired],
            "unpaired": [n for i, n in sorted(names.items()) if i not in paired],
        }
    except DetkdError as e:
        m["classes"] = {"error": str(e), "paired": [], "unpaired": list(names.values())}

    try:
        distiller = Distiller(recipe.distill, student_view, teacher, names).to(dev)
    except DetkdError as e:  # unpairable heads or classes: judged from the measurements above, nothing to weigh
        m["setup_error"] = str(e)
        return m
    m["feature_terms"] = [n for n in distiller.term_names if n not in ("kd_cls", "kd_box", *SECOND_STAGE_TERMS)]
    m["weights"].update(zip(m["feature_terms"], [f.weight for f in d.feature]))
    criterion = DistillationCriterion(student.init_criterion(), student_view, teacher, distiller)

    dataset = build_yolo_dataset(cfg, data["train"], int(cfg.batch), data, mode="val")  # letterbox, no augmentation
    loader = torch.utils.data.DataLoader(dataset, batch_size=int(cfg.batch), collate_fn=dataset.collate_fn)
    params = [p for p in student.parameters() if p.requires_grad]
    sums: dict[str, list[float]] = {}
    feats: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
    generator = torch.Generator().manual_seed(0)
    measured = 0
    for i, batch in enumerate(loader):
        if i == batches:
            break
        measured += 1
        batch = {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in batch.items()}
        batch["img"] = batch["img"].float() / 255
        preds = student(batch["img"])
        loss, _, terms = criterion.task_and_terms(preds, batch)
        task = loss.sum() / batch["img"].shape[0]  # Ultralytics' criteria return loss × batch size
        _add(sums, "task", task.item(), _gradient_norm(task, params))
        for name, value in terms.items():
            _add(sums, name, value.item(), _gradient_norm(value, params))
        s_feats, t_feats = student_view.view(preds).feats, teacher(batch["img"]).feats
        for level, t_level in distiller.level_pairs.items():
            x, y = _paired_positions(s_feats[level], t_feats[t_level], 512, generator)
            feats.setdefault(level, ([], []))[0].append(x)
            feats[level][1].append(y)
    criterion.remove()
    if "task" not in sums:
        raise DetkdError(f"{recipe.data}: the train split has no images to measure on")
    task_value, task_grad = (sum(v) / len(v) for v in zip(*sums.pop("task")))
    m["balance"] = {
        "task": task_value,
        "task_gradient": task_grad,
        "batches": measured,
        "terms": {
            name: {
                "value": (value := sum(v for v, _ in rows) / len(rows)),
                "gradient": (grad := sum(g for _, g in rows) / len(rows)),
                "gradient_ratio": grad / task_grad if task_grad > 0 else math.inf,
            }
            for name, rows in sums.items()
        },
    }
    m["features"] = [
        {
            "stride": stride,
            "student_channels": student_view.channels[level],
            "teacher_level": distiller.level_pairs.get(level),
            "teacher_channels": teacher.channels[distiller.level_pairs[level]]
            if level in distiller.level_pairs
            else None,
            "cka": linear_cka(torch.cat(feats[level][0]), torch.cat(feats[level][1])) if level in feats else None,
        }
        for level, stride in enumerate(student_view.strides)
    ]
    return m


def _add(sums: dict[str, list], name: str, value: float, gradient: float) -> None:
    sums.setdefault(name, []).append((value, gradient))


def diagnose_recipe(
    recipe: Recipe | str | os.PathLike,
    overrides: list[str] | dict | None = None,
    baseline: str | None = None,
    batches: int = 4,
    images: int = 200,
    device: str | None = None,
) -> Diagnosis:
    """Measure and judge a recipe before training. ``baseline``: the student trained alone (a checkpoint), to
    tell whether the teacher is clearly better than what the student becomes without it."""
    if not isinstance(recipe, Recipe):
        subject = str(recipe)
        recipe = load_recipe(recipe, overrides)
    else:
        subject = "recipe"
    from detkd.safe_load import trust_checkpoints
    from detkd.ultralytics_internals import quiet_ultralytics

    with quiet_ultralytics(), trust_checkpoints(recipe.trust_checkpoints):
        m = measure_recipe(recipe, baseline=baseline, batches=batches, images=images, device=device)
    findings = judge(m)
    if m.get("setup_error") and not any(f.severity == "error" for f in findings):
        findings.append(Finding("error", "setup", m["setup_error"]))
    return Diagnosis(subject, m, findings)


# --- diagnosing a finished run --------------------------------------------------------------------------------


MAP_COLUMN = "metrics/mAP50-95(B)"


def diagnose_run(run_dir: str | os.PathLike, baseline: str | os.PathLike | None = None) -> Diagnosis:
    """Did the distillation terms decrease, and did the student beat its run alone (``baseline``, or the
    benchmark's ``alone_s<seed>`` beside a ``<method>_s<seed>`` run)? Also: where the curves crossed."""
    run_dir = Path(run_dir)
    results = run_dir / "results.csv"
    if not results.is_file():
        raise DetkdError(f"{run_dir}: not a training run (no results.csv); give a recipe or a run folder")
    cols = read_results(results)
    if not cols:
        raise DetkdError(f"{results}: no epochs recorded")
    curve = cols[MAP_COLUMN]
    transfer = run_dir / "transfer.json"  # written by a run whose recipe transferred weights (detkd.engine.trainer)
    m: dict[str, Any] = {
        "kind": "run",
        "epochs": len(curve),
        "final_map": curve[-1],
        "best_map": max(curve),
        "transferred": json.loads(transfer.read_text())["fraction_from_source"] if transfer.is_file() else None,
        "terms": {},
    }
    findings = []
    for name in (k for k in cols if k.startswith("train/kd_")):
        values = [v for v in cols[name] if math.isfinite(v)]
        head, tail = _mean(values[: max(1, len(values) // 10)]), _mean(values[-max(1, len(values) // 10) :])
        m["terms"][name] = {"first": head, "last": tail}
        short = name.removeprefix("train/")
        if tail < 0.9 * head:
            findings.append(Finding("ok", "run", f"{short} fell from {head:.4g} to {tail:.4g}: the student followed"))
        elif tail == 0.0:
            findings.append(Finding("ok", "run", f"{short} ended at 0: the schedule stopped distillation"))
        else:
            findings.append(
                Finding(
                    "warn",
                    "run",
                    f"{short} did not decrease ({head:.4g} → {tail:.4g}): the student cannot follow this term "
                    "(weight too small to matter, or teacher and student disagree where it is measured)",
                )
            )
    if not m["terms"]:
        findings.append(Finding("warn", "run", "no distillation terms in results.csv: this run did not distil"))
    base_dir = Path(baseline) if baseline else _sibling_alone(run_dir)
    if base_dir is not None and (base_dir / "results.csv").is_file():
        base = read_results(base_dir / "results.csv")[MAP_COLUMN]
        n = min(len(curve), len(base))  # runs of other lengths compare at the epoch both reached
        m.update(baseline=str(base_dir), baseline_map=base[n - 1], gain=curve[n - 1] - base[n - 1])
        findings.append(_compare_curves(curve, base))
    elif baseline:
        raise DetkdError(f"{baseline}: not a training run (no results.csv)")
    return Diagnosis(str(run_dir), m, findings)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _sibling_alone(run_dir: Path) -> Path | None:
    match = re.fullmatch(r".+_s(\d+)", run_dir.name)
    candidate = run_dir.parent / f"alone_s{match.group(1)}" if match else None
    return candidate if candidate is not None and candidate != run_dir and candidate.is_dir() else None


def _compare_curves(curve: list[float], base: list[float]) -> Finding:
    """The final gain, and — when the distilled run led and then lost it — the epoch it stopped leading."""
    n = min(len(curve), len(base))
    gain = curve[n - 1] - base[n - 1]
    ahead = [e for e in range(n) if curve[e] > base[e]]
    if gain > 0:
        return Finding("ok", "run", f"final mAP50-95 {curve[n - 1]:.4f} vs {base[n - 1]:.4f} alone ({gain:+.4f})")
    if ahead:
        last = ahead[-1] + 1
        return Finding(
            "warn",
            "run",
            f"ahead of the student alone until epoch {last} of {n}, then behind ({gain:+.4f} at the end): the "
            "teacher accelerated training, then capped the student near its own level. Decay or stop the "
            "distillation before the end (distill.schedule.decay=linear, or stop_last_epochs) or use a stronger "
            "teacher.",
        )
    return Finding(
        "warn",
        "run",
        f"behind the student alone at every epoch ({gain:+.4f} at the end): check the pair with `detkd diagnose "
        "RECIPE` (teacher quality, class pairing, term balance)",
    )
