"""`detkd diagnose`: CKA against an independent formula, the judging of measurements, bad set-ups measured on tiny
real models, and the reading of finished runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_model_checkpoint

from detkd.diagnose import (
    BALANCE_SLACK,
    TERM_GRADIENT_RATIO,
    Diagnosis,
    balanced_weight,
    diagnose_recipe,
    diagnose_run,
    judge,
    linear_cka,
)

RECIPE = "recommended"

# CKA


def _cka_by_hsic(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA from its definition through Gram matrices: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = XXᵀ, with the
    centring matrix H = I − 11ᵀ/n (Kornblith et al. 2019, eq. 3) — no shared code with linear_cka."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l_ = x.double() @ x.double().T, y.double() @ y.double().T

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h)

    return float(hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_)))


def test_linear_cka_matches_the_hsic_definition_and_its_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    y = x[:, :8] @ torch.randn(8, 24, generator=g) + 0.5 * torch.randn(200, 24, generator=g)
    assert linear_cka(x, y) == pytest.approx(_cka_by_hsic(x, y), rel=1e-9)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, 3.0 * x @ q + 7.0) == pytest.approx(1.0)  # rotation, isotropic scale, shift
    assert linear_cka(x, torch.randn(200, 16, generator=g)) < 0.15  # unrelated features


# judging measurements


def _measurements(**changes) -> dict:
    """Measurements of a healthy set-up (numbers of the shape measure_recipe returns)."""
    m = {
        "kind": "recipe",
        "teacher": {"AP": 0.40, "per_class": {"car": 0.45, "bus": 0.35}, "images": 150, "parameters": 11_000_000},
        "student": {"parameters": 3_000_000},
        "weights": {"kd_cls": 2.0, "kd_box": 8.0},
        "feature_terms": [],
        "classes": {"paired": ["car", "bus"], "unpaired": []},
        "balance": {
            "task": 15.0,
            "task_gradient": 60.0,
            "terms": {
                name: {"value": 1.0, "gradient": 60.0 * ratio, "gradient_ratio": ratio}
                for name, ratio in TERM_GRADIENT_RATIO.items()
            },
        },
        "features": [
            {"stride": s, "student_channels": c, "teacher_level": i, "teacher_channels": 2 * c, "cka": 0.3}
            for i, (s, c) in enumerate(((8, 64), (16, 128), (32, 256)))
        ],
    }
    for key, value in changes.items():
        m[key] = {**m.get(key, {}), **value}
    return m


def _severities(findings, topic):
    return [f.severity for f in findings if f.topic == topic]


def test_a_healthy_setup_has_no_warnings():
    findings = judge(_measurements())
    assert {f.severity for f in findings} == {"ok"}


def test_an_untrained_teacher_is_an_error():
    findings = judge(_measurements(teacher={"AP": 0.0005, "per_class": {"car": 0.0, "bus": 0.001}}))
    assert _severities(findings, "teacher") == ["error"]
    assert "untrained" in next(f.message for f in findings if f.topic == "teacher")


def test_a_teacher_the_student_reaches_alone_is_flagged():
    findings = judge(_measurements(baseline={"AP": 0.39}))
    assert "warn" in _severities(findings, "teacher")
    assert "not clearly above the student trained alone" in " ".join(f.message for f in findings)


def test_a_weight_100x_too_large_gets_the_weight_that_balances_it():
    m = _measurements()
    ratio = TERM_GRADIENT_RATIO["kd_cls"] * 100
    m["weights"]["kd_cls"] = 200.0
    m["balance"]["terms"]["kd_cls"] = {"value": 100.0, "gradient": 60.0 * ratio, "gradient_ratio": ratio}
    finding = next(f for f in judge(m) if f.topic == "balance" and "kd_cls" in f.message)
    assert finding.severity == "warn" and "Lower distill.logit.weight to ≈ 2" in finding.message
    assert balanced_weight("kd_cls", 200.0, ratio) == pytest.approx(2.0)


def test_a_weight_within_the_slack_is_accepted():
    m = _measurements()
    ratio = TERM_GRADIENT_RATIO["kd_box"] * BALANCE_SLACK * 0.9
    m["balance"]["terms"]["kd_box"]["gradient_ratio"] = ratio
    assert _severities(judge(m), "balance") == ["ok", "ok"]


def test_a_teacher_whose_weights_the_student_could_start_from_is_advice_not_a_fault():
    m = _measurements()
    m["selectable_from_teacher"] = 0.97
    findings = judge(m)
    assert _severities(findings, "init") == ["info"] and "warn" not in {f.severity for f in findings}
    assert "97% of the student's weights" in next(f.message for f in findings if f.topic == "init")
    assert "init.source=teacher" in next(f.message for f in findings if f.topic == "init")


def test_no_class_overlap_is_an_error_and_partial_overlap_a_warning():
    none = judge(_measurements(classes={"paired": [], "unpaired": ["car", "bus"]}))
    assert _severities(none, "classes") == ["error"]
    partial = judge(_measurements(classes={"paired": ["car"], "unpaired": ["bus"]}))
    assert _severities(partial, "classes") == ["warn"]
    assert "(bus)" in next(f.message for f in partial if f.topic == "classes")


# measured on tiny real models


@pytest.fixture(scope="module")
def untrained_diagnosis(synth_data, teacher_checkpoint):
    """The recommended recipe with an untrained teacher and the logit weight 100× the recipe's."""
    overrides = {"teacher": str(teacher_checkpoint), "data": str(synth_data), "imgsz": 64, "batch": 8}
    overrides["distill"] = {"logit": {"weight": 200.0}}
    return diagnose_recipe(RECIPE, overrides, batches=2, images=8)


def test_untrained_teacher_is_measured_and_named(untrained_diagnosis):
    m = untrained_diagnosis.measurements
    assert 0.0 <= m["teacher"]["AP"] < 0.01 and m["teacher"]["images"] == 8
    assert _severities(untrained_diagnosis.findings, "teacher") == ["error"]
    assert untrained_diagnosis.verdict.startswith("distillation will not help")
    # yolov8s → yolov8n: the recommended recipe starts the student from the teacher's weights, all of them selected
    assert m["transferred"] > 0.9 and m["selectable_from_teacher"] is None
    assert _severities(untrained_diagnosis.findings, "init") == ["info"]  # says where the student starts, no advice
    assert "starts from transferred weights" in next(
        f.message for f in untrained_diagnosis.findings if f.topic == "init"
    )


def test_terms_are_weighed_on_real_batches(untrained_diagnosis):
    m = untrained_diagnosis.measurements
    assert set(m["balance"]["terms"]) == {"kd_cls", "kd_box"} and m["balance"]["task_gradient"] > 0
    assert all(t["gradient"] > 0 for t in m["balance"]["terms"].values())
    assert [lv["stride"] for lv in m["features"]] == [8, 16, 32]
    assert all(0.0 <= lv["cka"] <= 1.0 for lv in m["features"])


def test_term_gradients_scale_with_their_weight(synth_data, teacher_checkpoint, untrained_diagnosis):
    overrides = {"teacher": str(teacher_checkpoint), "data": str(synth_data), "imgsz": 64, "batch": 8}
    overrides["distill"] = {"logit": {"weight": 2.0}}
    small = diagnose_recipe(RECIPE, overrides, batches=2, images=8).measurements["balance"]["terms"]["kd_cls"]
    large = untrained_diagnosis.measurements["balance"]["terms"]["kd_cls"]
    assert large["gradient"] == pytest.approx(100 * small["gradient"], rel=1e-3)


def test_a_teacher_with_none_of_the_students_classes(synth_data, tmp_path):
    teacher = save_model_checkpoint("yolov8n.yaml", {0: "apple", 1: "pear"}, tmp_path / "fruit.pt")
    overrides = {"teacher": str(teacher), "data": str(synth_data), "imgsz": 64, "batch": 8}
    overrides["init"] = {"source": None}  # the recipe without its transfer: the advice says the student could have it
    diagnosis = diagnose_recipe(RECIPE, overrides, batches=1, images=4)
    assert _severities(diagnosis.findings, "classes") == ["error"]
    assert "class_map" in next(f.message for f in diagnosis.findings if f.topic == "classes")
    assert diagnosis.verdict.startswith("distillation will not help")
    m = diagnosis.measurements  # yolov8n → yolov8n: all but the class convs (other classes) can be taken
    assert m["transferred"] is None and 0.9 < m["selectable_from_teacher"] < 1.0
    assert _severities(diagnosis.findings, "init") == ["info"]


# finished runs


def _results(path: Path, maps: list[float], kd: list[float] | None = None) -> Path:
    path.mkdir(parents=True)
    header = ["epoch", "train/box_loss", *(["train/kd_cls"] if kd else []), "metrics/mAP50-95(B)"]
    rows = [[e + 1, 1.0, *([kd[e]] if kd else []), v] for e, v in enumerate(maps)]
    text = "\n".join(",".join(f"{c:>12}" for c in row) for row in [header, *rows])  # Ultralytics pads its columns
    (path / "results.csv").write_text(text + "\n")
    return path


def test_a_run_that_led_then_fell_behind_names_the_epoch(tmp_path):
    _results(tmp_path / "alone_s0", [0.1, 0.2, 0.3, 0.4, 0.5])
    run = _results(tmp_path / "recommended_s0", [0.2, 0.3, 0.35, 0.38, 0.45], kd=[2.0, 1.5, 1.0, 0.8, 0.7])
    diagnosis = diagnose_run(run)  # the benchmark's alone_s0 beside it is found
    messages = " ".join(f.message for f in diagnosis.findings)
    assert "ahead of the student alone until epoch 3 of 5" in messages
    assert "kd_cls fell from 2 to 0.7" in messages
    assert diagnosis.verdict == "distillation did not help: -0.0500 mAP50-95 over the student alone"
    shorter = diagnose_run(_results(tmp_path / "short_s0", [0.2, 0.3, 0.35], kd=[2.0, 1.5, 1.0]), tmp_path / "alone_s0")
    assert shorter.verdict == "distillation helped: +0.0500 mAP50-95 over the student alone"  # at epoch 3 of both
    # a run that also started from transferred weights (its transfer.json): the gain is the recipe's, not distillation's
    (tmp_path / "short_s0" / "transfer.json").write_text(json.dumps({"fraction_from_source": 0.98}))
    both = diagnose_run(tmp_path / "short_s0", tmp_path / "alone_s0")
    assert both.verdict.startswith("the recipe (transferred weights and distillation) helped: +0.0500")
    plain = _results(tmp_path / "transfer_s0", [0.2, 0.3, 0.35])  # weights transferred, nothing distilled
    (plain / "transfer.json").write_text(json.dumps({"fraction_from_source": 0.98}))
    assert diagnose_run(plain, tmp_path / "alone_s0").verdict.startswith("the transferred weights helped: +0.0500")


def test_a_run_whose_terms_did_not_fall_and_cli(tmp_path):
    alone = _results(tmp_path / "plain", [0.1, 0.2, 0.3])
    run = _results(tmp_path / "kd", [0.15, 0.25, 0.35], kd=[1.0, 1.0, 1.1])
    diagnosis = diagnose_run(run, baseline=alone)
    assert any(f.severity == "warn" and "did not decrease" in f.message for f in diagnosis.findings)
    assert diagnosis.verdict.startswith("distillation helped: +0.0500")
    cli = [sys.executable, "-m", "detkd.cli", "diagnose"]
    done = subprocess.run([*cli, str(run), "--baseline", str(alone)], capture_output=True, text=True)
    assert done.returncode == 0 and "verdict: distillation helped" in done.stdout
    bad = subprocess.run([*cli, str(run), "epochs=3"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "overrides apply to a recipe" in bad.stderr


def test_the_benchmarks_setup_as_measured_should_help():
    """The measurements of the benchmark's pair (a yolov8s teacher of the cpu screens' quality, a yolov8n from
    scratch, the recommended recipe), as `detkd diagnose` took them: the verdict is that it should help."""
    measured = json.loads((Path(__file__).parent / "data" / "diagnose_benchmark_setup.json").read_text())
    findings = judge(measured["measurements"])
    assert not [f for f in findings if f.severity in ("warn", "error")], findings
    diagnosis = Diagnosis("benchmark", measured["measurements"], findings)
    assert diagnosis.verdict.startswith("distillation should help")
    assert any(f.severity == "info" and "weak on truck" in f.message for f in findings)  # named, not held against it


def test_a_named_torchvision_teacher_is_evaluated_from_its_adapter(synth_data, tmp_path):
    """``teacher: torchvision:ARCH`` has no checkpoint to evaluate: its AP comes from the loaded adapter."""
    from detkd.adapters.torchvision import build_model

    torch.manual_seed(0)
    torch.save(build_model("fasterrcnn_resnet18_fpn", 91).state_dict(), tmp_path / "coco_state.pt")
    overrides = {
        "teacher": "torchvision:fasterrcnn_resnet18_fpn",
        "teacher_weights": str(tmp_path / "coco_state.pt"),
        "data": str(synth_data),
        "imgsz": 64,
        "batch": 4,
    }
    diagnosis = diagnose_recipe("frcnn", overrides, batches=1, images=4)
    t = diagnosis.measurements["teacher"]
    assert "error" not in t and 0.0 <= t["AP"] < 0.01 and t["images"] == 4  # measured: untrained, not unknown
    assert _severities(diagnosis.findings, "teacher") == ["error"]
    assert "could not be measured" not in diagnosis.format()
    assert set(diagnosis.measurements["balance"]["terms"]) == {"kd_rcnn_cls", "kd_rcnn_box"}
