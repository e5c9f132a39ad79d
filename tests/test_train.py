"""End-to-end distillation inside Ultralytics' loop on tiny data: logging, frozen teacher, plain checkpoints."""

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_model_checkpoint

from detkd.config import load_recipe
from detkd.engine.trainer import trainer_for
from detkd.errors import DetkdError

TRAIN = {"epochs": 2, "imgsz": 64, "batch": 8, "workers": 0, "plots": False, "val": True, "exist_ok": True}


def _state_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def distilled_run(synth_data, teacher_checkpoint, tmp_path_factory, toy_feature_loss):
    """One short run of the recommended recipe plus two feature terms, a shipped one and one registered by the
    tests (every kind of term at once); records what the trainer looked like while it trained."""
    project = tmp_path_factory.mktemp("runs")
    features = [{"loss": "cwd"}, {"loss": toy_feature_loss, "params": {"scale": 2.0}}]
    overrides = {"teacher": str(teacher_checkpoint), "data": str(synth_data), "distill": {"feature": features}}
    recipe = load_recipe("recommended", overrides)
    trainer = trainer_for(recipe)(
        overrides={"model": "yolov8n.yaml", "data": str(synth_data), "project": str(project), "name": "kd", **TRAIN}
    )
    seen = {}

    def inspect(tr):
        teacher = tr.teacher.model
        optimized = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
        seen.setdefault("teacher_hash_start", _state_hash(teacher))
        seen["teacher_training"] = teacher.training
        seen["teacher_requires_grad"] = any(p.requires_grad for p in teacher.parameters())
        seen["teacher_in_optimizer"] = any(id(p) in optimized for p in teacher.parameters())
        seen["distiller_in_optimizer"] = all(id(p) in optimized for p in tr.distiller.parameters())
        seen["teacher_in_ema"] = any(p is q for p in tr.ema.ema.parameters() for q in teacher.parameters())
        seen["ema_size"] = sum(p.numel() for p in tr.ema.ema.parameters())
        seen["teacher_hash_end"] = _state_hash(teacher)

    trainer.add_callback("on_train_epoch_end", inspect)
    trainer.train()
    return trainer, seen


def test_each_distillation_term_is_a_results_column(distilled_run):
    trainer, _ = distilled_run
    rows = list(csv.DictReader((Path(trainer.save_dir) / "results.csv").read_text().splitlines()))
    assert len(rows) == 2
    for term in ("train/kd_cwd", "train/kd_toy", "train/kd_cls", "train/kd_box"):
        assert float(rows[-1][term]) > 0, term  # computed and logged (epoch 1 starts at warm-up factor 0)
    assert "metrics/mAP50-95(B)" in rows[-1]  # Ultralytics' validation ran as usual


def test_teacher_frozen_outside_optimizer_and_ema_and_unchanged(distilled_run, teacher_checkpoint):
    trainer, seen = distilled_run
    assert seen["teacher_training"] is False
    assert seen["teacher_requires_grad"] is False
    assert seen["teacher_in_optimizer"] is False and seen["teacher_in_ema"] is False
    assert seen["distiller_in_optimizer"] is True
    assert seen["teacher_hash_start"] == seen["teacher_hash_end"]
    assert getattr(trainer.model, "criterion", None) is None  # the student left training with its own criterion
    from detkd.adapters.ultralytics import load_teacher

    assert _state_hash(load_teacher(teacher_checkpoint)) == seen["teacher_hash_start"]


def test_saved_student_is_a_plain_ultralytics_checkpoint(distilled_run, tmp_path):
    trainer, seen = distilled_run
    weights = Path(trainer.save_dir) / "weights"
    assert (weights / "distiller.pt").is_file() and (Path(trainer.save_dir) / "distill.yaml").is_file()
    # a fresh interpreter where importing detkd fails: only Ultralytics may be needed to load, predict, export
    script = f"""
import sys, json
sys.modules["detkd"] = None
from ultralytics import YOLO
image = sorted(__import__("pathlib").Path({str(Path(trainer.data["val"]))!r}).glob("*.jpg"))[0]
out = {{}}
for name in ("best.pt", "last.pt"):
    model = YOLO({str(weights)!r} + "/" + name)
    model.predict(str(image), imgsz=64, verbose=False)
    out[name] = sum(p.numel() for p in model.model.parameters())
out["onnx"] = YOLO({str(weights)!r} + "/best.pt").export(format="onnx", imgsz=64)
print("RESULT", json.dumps(out))
"""
    env = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "YOLO_CONFIG_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    out = json.loads(lines[0][7:])
    assert out["best.pt"] == out["last.pt"] == seen["ema_size"]  # the student alone: no teacher, no connectors
    assert Path(out["onnx"]).is_file()


def test_other_family_student_with_coco_teacher_through_the_api(synth_data, tmp_path):
    """A COCO-80-class yolov8s teaches an 8-class yolo26n (reg_max 1: decoded-box distillation) by class name."""
    from detkd.engine import distill
    from detkd.ultralytics_internals import ultralytics_offline

    ultralytics_offline()
    from ultralytics.utils import YAML
    from ultralytics.utils.checks import check_yaml

    coco = YAML.load(check_yaml("coco8.yaml"))["names"]
    teacher = save_model_checkpoint("yolov8s.yaml", coco, tmp_path / "coco_teacher.pt")
    best = distill(
        None,
        teacher=str(teacher),
        student="yolo26n.yaml",
        data=str(synth_data),
        project=str(tmp_path),
        name="x",
        distill={"feature": [{"loss": "pkd", "weight": 1.0}], "logit": {"weight": 1.0}, "box": {"weight": 1.0}},
        **{**TRAIN, "epochs": 1},
    )
    rows = list(csv.DictReader((best.parent.parent / "results.csv").read_text().splitlines()))
    assert {"train/kd_pkd", "train/kd_cls", "train/kd_box"} <= set(rows[0])
    assert best.is_file()


def test_missing_teacher_or_bad_data_is_a_one_line_error(synth_data, tmp_path):
    from detkd.engine import distill

    with pytest.raises(DetkdError, match="'teacher' is not set"):
        distill("recommended", data=str(synth_data))
    with pytest.raises(DetkdError, match="nothing to do beyond plain training"):
        distill(None, data=str(synth_data))
    with pytest.raises(DetkdError, match="a teacher is set but 'distill' has no loss"):
        distill(None, teacher=str(tmp_path / "nope.pt"), data=str(synth_data))
    with pytest.raises(DetkdError, match="nope.pt: teacher checkpoint not found"):
        distill("recommended", teacher=str(tmp_path / "nope.pt"), data=str(synth_data), **TRAIN)


def test_init_from_the_teacher_selects_its_weights_without_distilling(
    synth_data, teacher_checkpoint, tmp_path, monkeypatch
):
    """``init.source: teacher`` starts the student from weight selection of the recipe's own teacher; with no
    distillation term the teacher gives only its weights: no teacher is built, no term is logged."""
    import detkd.engine.trainer
    from detkd.engine import distill

    def no_teacher(*args, **kwargs):
        raise AssertionError("a teacher that only gives weights must not be built")

    monkeypatch.setattr(detkd.engine.trainer, "create_teacher", no_teacher)

    train = {**TRAIN, "epochs": 1, "project": str(tmp_path), "name": "sel"}
    init = {"source": "teacher", "kind": "larger"}
    best = distill(None, teacher=str(teacher_checkpoint), init=init, data=str(synth_data), **train)
    run = best.parent.parent
    report = json.loads((run / "transfer.json").read_text())
    assert report["kind"] == "larger" and report["fraction_from_source"] > 0.9  # yolov8s → yolov8n: all selected
    assert load_recipe(run / "distill.yaml").init.source == "teacher"  # saved as given: a resume resolves it again
    header = (run / "results.csv").read_text().splitlines()[0]
    assert "kd_" not in header
    with pytest.raises(DetkdError, match="'init.source: teacher' starts the student from the teacher's weights"):
        distill(None, init=init, data=str(synth_data), **train)


def _classifier():
    from detkd.ultralytics_internals import ultralytics_offline

    ultralytics_offline()
    from ultralytics.nn.tasks import ClassificationModel

    torch.manual_seed(1)
    return ClassificationModel("yolov8n-cls.yaml", nc=8, verbose=False)


def test_the_recommended_init_falls_back_when_the_teacher_cannot_give_weights(
    synth_data, teacher_checkpoint, tmp_path, monkeypatch
):
    """The recommended recipe starts the student from its teacher's weights when it can (``init.optional``); a
    teacher of another family, or a student checkpoint with weights of its own, trains without the transfer and one
    line says why. The same init without ``optional`` refuses, with the same reason."""
    from ultralytics.utils import LOGGER

    from detkd.config import InitConfig
    from detkd.engine import distill
    from detkd.engine.api import resolve_teacher

    said = []
    monkeypatch.setattr(LOGGER, "warning", said.append)
    other_family = save_model_checkpoint("yolo11s.yaml", {0: "car"}, tmp_path / "yolo11s.pt")
    student_ckpt = save_model_checkpoint("yolov8n.yaml", {0: "car"}, tmp_path / "yolov8n.pt")

    def resolved(**overrides):
        return resolve_teacher(load_recipe("recommended", {"data": "d.yaml", **overrides}))

    assert resolved(teacher=str(teacher_checkpoint)).init == load_recipe("recommended").init and not said
    assert resolved(teacher=str(other_family)).init == InitConfig()
    assert resolved(teacher=str(teacher_checkpoint), student=str(student_ckpt)).init == InitConfig()
    assert len(said) == 2 and all(line.count("\n") == 0 for line in said)
    assert "not the student's model family" in said[0] and "yolo11s.pt" in said[0]
    assert f"the student {student_ckpt} brings weights of its own, which are kept" in said[1]
    with pytest.raises(DetkdError, match="'init.source: teacher' cannot give the student weights: .*model family"):
        resolved(teacher=str(other_family), init={"optional": False})
    assert resolved(teacher=str(teacher_checkpoint), student=str(student_ckpt), init={"optional": False}).init.source
    # a classifier source names no detection classes: the dry run still checks its backbone against the student's
    classifier = {"source": str(tmp_path / "cls.pt"), "kind": "classifier", "optional": False}
    torch.save({"model": _classifier(), "train_args": {}}, tmp_path / "cls.pt")
    assert resolved(teacher=None, init=classifier).init.source == classifier["source"]

    # end to end: the run trains without the transfer and saves the recipe it ran; with no term left, it refuses
    train = {**TRAIN, "epochs": 1, "project": str(tmp_path), "name": "fallback", "data": str(synth_data)}
    run = distill("recommended", teacher=str(other_family), **train).parent.parent
    assert load_recipe(run / "distill.yaml").init == InitConfig() and not (run / "transfer.json").exists()
    no_terms = {"logit": {"weight": 0}, "box": {"weight": 0}}
    with pytest.raises(DetkdError, match="nothing to do beyond plain training: .* the optional init was dropped"):
        distill("recommended", teacher=str(other_family), distill=no_terms, **train)


def test_killed_run_resumes_from_last_checkpoint(synth_data, teacher_checkpoint, tmp_path):
    from detkd.engine import resume

    recipe = load_recipe("recommended", {"teacher": str(teacher_checkpoint), "data": str(synth_data)})
    trainer = trainer_for(recipe)(
        overrides={
            "model": "yolov8n.yaml",
            "data": str(synth_data),
            "project": str(tmp_path),
            "name": "r",
            **TRAIN,
            "epochs": 3,
        }
    )

    def kill_after_first_epoch(tr):
        if tr.epoch == 0:
            raise KeyboardInterrupt  # what a killed process leaves: last.pt and distiller.pt of epoch 1

    trainer.add_callback("on_model_save", kill_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    run = Path(trainer.save_dir)
    saved = torch.load(run / "weights" / "distiller.pt")
    assert len(list(csv.DictReader((run / "results.csv").read_text().splitlines()))) == 1

    # Ultralytics applies the keys it allows on resume (save_period) and ignores, with a warning, the others (epochs)
    best = resume(run, save_period=1, epochs=5)
    rows = list(csv.DictReader((run / "results.csv").read_text().splitlines()))
    assert [int(float(r["epoch"])) for r in rows] == [1, 2, 3]  # continued, not restarted
    assert sorted(p.name for p in (run / "weights").glob("epoch*.pt")) == ["epoch1.pt", "epoch2.pt"]
    assert best == run / "weights" / "best.pt" and best.is_file()
    assert saved.keys() == torch.load(run / "weights" / "distiller.pt").keys()


def test_transfer_then_distil_frozen_for_k_epochs_then_train(synth_data, teacher_checkpoint, tmp_path):
    """init: a classifier backbone, frozen (BN statistics included) for 1 of 2 epochs, then released at half lr,
    while a teacher distils (one recipe: transfer first, distil after)."""
    from detkd.data.synth import CLASSES
    from detkd.ultralytics_internals import ultralytics_offline

    ultralytics_offline()
    from ultralytics.nn.tasks import ClassificationModel

    torch.manual_seed(1)
    source = ClassificationModel("yolov8n-cls.yaml", nc=len(CLASSES), verbose=False)
    source.names = dict(enumerate(CLASSES))
    torch.save({"model": source, "train_args": {}}, tmp_path / "cls.pt")
    reference = {k: v.clone() for k, v in source.state_dict().items() if k.startswith("model.0.")}

    recipe = load_recipe(
        None,
        {
            "data": str(synth_data),
            "teacher": str(teacher_checkpoint),
            "distill": {"logit": {"weight": 1.0, "locations": "all"}},
            "init": {"source": str(tmp_path / "cls.pt"), "freeze_epochs": 1, "lr_mult": 0.5},
        },
    )
    trainer = trainer_for(recipe)(
        overrides={"model": "yolov8n.yaml", "data": str(synth_data), "project": str(tmp_path), "name": "f", **TRAIN}
    )
    seen = []

    def record(tr):
        state = tr.model.state_dict()
        stem_equal = all(torch.equal(state[k].float(), v.float()) for k, v in reference.items())
        head_grad = tr.model.model[-1].cv2[0][0].conv.weight.requires_grad
        lrs = sorted(
            {
                round(g["lr"] / tr.optimizer.param_groups[0]["lr"], 6)
                for g in tr.optimizer.param_groups
                if g.get("param_group") == "weight"
            }
        )
        seen.append({"stem_equal": stem_equal, "head_trains": head_grad, "lr_ratios": lrs})

    trainer.add_callback("on_train_epoch_end", record)
    trainer.train()
    report = json.loads((Path(trainer.save_dir) / "transfer.json").read_text())
    assert report["kind"] == "classifier" and "model.0.conv.weight" in report["transferred"]
    assert seen[0] == {"stem_equal": True, "head_trains": True, "lr_ratios": [0.5, 1.0]}  # frozen: weights and BN stats
    assert seen[1]["stem_equal"] is False  # released in epoch 2
    rows = list(csv.DictReader((Path(trainer.save_dir) / "results.csv").read_text().splitlines()))
    assert float(rows[-1]["train/kd_cls"]) > 0


def test_broken_data_is_refused_with_the_report(synth_data, teacher_checkpoint, tmp_path):
    import shutil

    from detkd.engine import distill
    from detkd.errors import DataError

    broken = tmp_path / "broken"
    shutil.copytree(synth_data.parent, broken)
    label = sorted((broken / "labels" / "train").glob("*.txt"))[0]
    label.write_text("99 0.5 0.5 0.2 0.2\n")  # a class beyond the names
    with pytest.raises(DataError) as e:
        distill("recommended", teacher=str(teacher_checkpoint), data=str(broken / "data.yaml"), **TRAIN)
    assert label.name in e.value.report.format()


def test_overrides_merge_deeply_into_a_recipe_object(synth_data, tmp_path):
    """The API applies the recipe rule to objects too: changing one logit key keeps the box term."""
    from detkd.engine import distill

    recommended = load_recipe(Path(__file__).parents[1] / "configs" / "recommended.yaml")
    nope = str(tmp_path / "nope.pt")
    with pytest.raises(DetkdError, match="nope.pt: teacher checkpoint not found"):  # still distils: box weight 8
        distill(recommended, teacher=nope, data=str(synth_data), distill={"logit": {"weight": 0.0}})
    no_terms = {"logit": {"weight": 0}, "box": {"weight": 0}}  # and no transfer: the teacher would have no use
    with pytest.raises(DetkdError, match="'distill' has no loss with a weight > 0"):
        distill(recommended, teacher=nope, data=str(synth_data), distill=no_terms, init={"source": None})


def test_resume_keeps_the_saved_recipe(tmp_path):
    from detkd.engine import distill, resume

    with pytest.raises(DetkdError, match=r"keeps its saved recipe \(distill.yaml\); given: distill, teacher"):
        distill(resume=str(tmp_path), teacher="t.pt", distill={"logit": {"weight": 1.0}}, epochs=3)
    with pytest.raises(DetkdError, match=r"keeps its saved recipe; give no recipe \(r.yaml\)"):
        distill("r.yaml", resume=str(tmp_path))
    with pytest.raises(DetkdError, match="'epochz' is not a valid YOLO argument"):
        resume(tmp_path, epochz=3)
    with pytest.raises(DetkdError, match="give the run folder"):
        distill(resume=True)


def test_a_chain_of_teacher_assistants_distils_in_turn_and_reuses_finished_stages(
    synth_data, teacher_checkpoint, tmp_path
):
    from detkd.engine import distill

    overrides = {"teacher": str(teacher_checkpoint), "data": str(synth_data), "chain": ["yolov8n.yaml"]}
    train = {**TRAIN, "epochs": 1, "project": str(tmp_path), "name": "kd"}
    best = distill("recommended", **overrides, **train)
    assistant = tmp_path / "kd_assistant1"
    stage = load_recipe(assistant / "distill.yaml")
    final = load_recipe(best.parent.parent / "distill.yaml")
    assert stage.teacher == str(teacher_checkpoint) and stage.student == "yolov8n.yaml" and stage.chain == []
    assert final.teacher == str(assistant / "weights" / "best.pt") and final.chain == []  # taught by the assistant
    assert best.parent.parent == tmp_path / "kd"
    stamp = (assistant / "weights" / "best.pt").stat().st_mtime_ns
    distill("recommended", **overrides, **train)  # the finished assistant is reused, not retrained
    assert (assistant / "weights" / "best.pt").stat().st_mtime_ns == stamp
    with pytest.raises(DetkdError, match="'chain' of teacher assistants needs a 'teacher'"):
        distill(None, data=str(synth_data), chain=["yolov8n.yaml"], init={"source": str(best)}, **train)
