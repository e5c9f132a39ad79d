"""Benchmark profiles, the aggregation over seeds, the report, and one tiny benchmark through the real machinery.

The aggregation is checked on hand-made run records with known answers; the end-to-end benchmark evaluates a given
teacher and trains one student per kind of method (alone, Ultralytics' built-in, a detkd loss) for one epoch on 16
images, each in its own process (≈ 1.5 min on 2 cores).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from detkd.benchmark import (
    PROFILES_DIR,
    Bench,
    DataSpec,
    describe_method,
    gap_closed,
    load_profile,
    main,
    mean_std,
    method_recipe,
    read_curve,
    summarise,
    write_report,
)
from detkd.benchmark.report import curve_axis
from detkd.config import load_recipe
from detkd.errors import DetkdError
from detkd.evaluation import COCO_METRICS

# profiles


@pytest.mark.parametrize("name", ["quick", "cpu", "gpu_full"])
def test_builtin_profiles_load_with_a_baseline_and_every_kind(name):
    profile = load_profile(name)
    assert profile.name == name and profile.baseline == "alone"
    assert {m.kind for m in profile.methods} == {"alone", "builtin", "detkd"}
    assert any(m.init for m in profile.methods), "a method with transferred initialisation"


@pytest.mark.parametrize("path", sorted(PROFILES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_profile_builds_a_valid_recipe_for_each_method(path):
    profile = load_profile(path)
    for m in profile.methods:
        if m.kind == "detkd":
            recipe = method_recipe(m, "t.pt", profile.student, "d.yaml")
            assert recipe.distills or recipe.init.source, f"{path.name}: {m.name} neither distils nor transfers"


def test_recipe_screen_holds_the_recommended_recipe():
    """The screen's row marked as the recipe must stay the recipe that detkd ships as ``recommended``."""
    screen = {m.name: m for m in load_profile("recipe_screen").methods}
    screened = method_recipe(screen["logit2_box8"], "t.pt", "yolov8n.yaml", "d.yaml").distill
    assert screened == load_recipe("recommended").distill


def test_cpu_profile_runs_three_seeds_where_it_matters():
    profile = load_profile("cpu")
    seeds = {m.name: m.seeds or profile.seeds for m in profile.methods}
    assert all(len(seeds[name]) >= 3 for name in ("alone", "builtin", "recommended"))
    families = {"fitnet", "cwd", "pkd", "mgd", "fgd", "logit", "box"}
    assert families <= set(seeds)


def test_every_method_gets_the_same_budget_and_the_same_teacher(synth_data, tmp_path):
    profile = load_profile("cpu")
    profile.data = DataSpec(yaml=str(synth_data))  # no generation of the profile's scenes
    bench = Bench.prepare(profile, tmp_path)
    jobs = {m.name: bench.job(m, 1) for m in profile.methods}

    def shared(job):
        return {k: v for k, v in job.train.items() if k not in ("name", "distill_model", "dis")}

    assert all(shared(j) == shared(jobs["alone"]) for j in jobs.values())
    assert jobs["alone"].train["seed"] == 1 and jobs["alone"].recipe is None
    teacher = str(bench.teacher.checkpoint)
    assert jobs["builtin"].train["distill_model"] == teacher and jobs["builtin"].train["dis"] == 6.0
    pkd = jobs["pkd"].recipe
    assert pkd["teacher"] == teacher and pkd["train"] == {} and pkd["student"] == profile.student
    assert [f["loss"] for f in pkd["distill"]["feature"]] == ["pkd"] and pkd["distill"]["logit"]["weight"] == 0
    recommended = load_recipe("recommended")
    assert jobs["recommended"].recipe["distill"] == recommended.to_dict()["distill"]
    transfer = jobs["transfer"].recipe
    assert transfer["init"]["source"] == teacher and transfer["teacher"] is None  # transfer only: no distillation
    assert jobs["recommended+transfer"].recipe["teacher"] == teacher


def test_a_method_may_set_its_own_epochs_and_training_keys(synth_data, tmp_path):
    """A method on more images matches the others' iterations with fewer epochs (the ``unlabeled`` profile's
    ceiling): its ``epochs`` and ``train`` keys reach its run only."""
    path = tmp_path / "p.yaml"
    path.write_text(
        f"data: {{yaml: {synth_data}}}\nbudget: {{epochs: 6, train: {{close_mosaic: 3}}}}\n"
        "methods: [{name: a, kind: alone}, {name: b, kind: builtin},\n"
        "  {name: short, kind: builtin, epochs: 2, train: {close_mosaic: 1, lr0: 0.02}}]"
    )
    profile = load_profile(path)
    bench = Bench.prepare(profile, tmp_path / "out")
    a, b, short = (bench.job(m, 0).train for m in profile.methods)
    assert (a["epochs"], a["close_mosaic"], b["epochs"], b["close_mosaic"]) == (6, 3, 6, 3) and "lr0" not in b
    assert (short["epochs"], short["close_mosaic"], short["lr0"]) == (2, 1, 0.02)
    assert {k: v for k, v in short.items() if k not in ("epochs", "close_mosaic", "lr0", "name")} == {
        k: v for k, v in b.items() if k not in ("epochs", "close_mosaic", "name")
    }
    said = describe_method(profile.methods[2], "yolov8n.yaml")
    assert said == describe_method(profile.methods[1], "yolov8n.yaml") + " (2 epochs, close_mosaic=1, lr0=0.02)"


@pytest.mark.parametrize(
    "text, message",
    [
        ("budget: {epoch: 3}\nmethods: [{name: a, kind: alone}]", "unknown key 'budget.epoch'"),
        ("methods: [{name: a, kind: alone, dis: 2.0}]", "'methods[0]' (a): 'dis' is for kind 'builtin' only"),
        ("methods: [{name: a, kind: alone}, {name: a, kind: builtin}]", "'methods[1].name' 'a' is already used"),
        ("methods: [{name: x, distill: {feature: [{loss: nope}]}}]", "'methods[0]' (x): recipe: 'distill.feature[0]"),
        ("methods: [{name: x, recipe: missing.yaml}]", "missing.yaml: recipe not found"),
        ("methods: [{name: x}]", "'methods[0]' (x): the recipe neither distills nor transfers"),
        ("methods: [{name: 'a b', kind: alone}]", "'methods[0].name' must be"),
        ("methods: [{name: a, kind: fast}]", "'methods[0].kind' must be one of alone, builtin, detkd"),
        ("data: {yaml: none.yaml}\nmethods: [{name: a, kind: alone}]", "'data.yaml' file not found"),
        ("methods: []", "'methods' is empty"),
        ("budget: {train: {epochs: 3}}\nmethods: [{name: a, kind: alone}]", "'budget.train.epochs' is set by the"),
        ("methods: [{name: a, kind: alone, train: {imgsz: 64}}]", "'methods[0]' (a): 'train.imgsz' is set by the"),
        ("methods: [{name: a, kind: alone, epochs: 0}]", "'methods[0].epochs'"),
    ],
)
def test_a_bad_profile_is_a_one_line_error_naming_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DetkdError) as e:
        load_profile(path)
    assert str(path) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_unknown_profile_lists_the_built_in_ones():
    with pytest.raises(DetkdError) as e:
        load_profile("nope")
    assert str(e.value) == (
        "nope: neither a benchmark profile file nor a built-in benchmark profile (built-in benchmark profiles: "
        "capped, chain, converged, cpu, frcnn, gpu, gpu_full, quick, recipe_screen, scale_gap, transfer, unlabeled)"
    )


def test_methods_are_described_by_what_they_train():
    """The report says what each method is: a name such as ``recommended`` does not (in a profile it is the
    recipe's distillation terms, its transfer off)."""
    converged = {m.name: m for m in load_profile("converged").methods}
    said = {name: describe_method(m, "yolov8n.yaml") for name, m in converged.items()}
    assert said["recommended"] == "soft class targets ×2 + box distillation ×8"
    selected = "; starts from the teacher's weights (weight selection)"
    assert said["recommended+transfer"] == said["recommended"] + selected
    assert said["transfer"] == "no distillation" + selected
    assert said["recommended+gate"].endswith(", gate teacher_better") and said["alone"] == "the student alone"
    assert describe_method(load_profile("chain").methods[2], "yolov8n.yaml").endswith("; through yolov8s")
    stop = describe_method(load_profile("capped").methods[-1], "yolov8n.yaml")
    assert stop == "soft class targets ×2 + box distillation ×8, off for the last 20 epochs"
    unlabeled = {m.name: describe_method(m, "yolov8n.yaml") for m in load_profile("unlabeled").methods}
    assert (
        unlabeled["ceiling"]
        == "the student alone, on every training image, fully labeled (16 epochs, close_mosaic=2, warmup_epochs=0.47)"
    )
    assert unlabeled["distilled+unlabeled"].endswith("; with unlabeled images (1 per labeled one)")
    boxes = "; with unlabeled images (1 per labeled one; boxes: the teacher's detections ≥ 0.5)"
    assert unlabeled["distilled+unlabeled+pseudo"].endswith(boxes)


def test_a_profile_finds_recipes_by_path_relative_to_it_or_by_built_in_name(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.yaml").write_text("distill: {logit: {weight: 3.0}}\n")
    path = tmp_path / "p.yaml"
    path.write_text(
        "methods: [{name: a, kind: alone}, {name: mine, recipe: sub/mine.yaml}, {name: rec, recipe: recommended},\n"
        "  {name: ta, recipe: recommended, chain: [yolov8s.yaml]}]"
    )
    methods = {m.name: m for m in load_profile(path).methods}
    assert method_recipe(methods["mine"], "t.pt", "s.yaml", "d.yaml").distill.logit.weight == 3.0
    assert method_recipe(methods["rec"], "t.pt", "s.yaml", "d.yaml").distill == load_recipe("recommended").distill
    assert method_recipe(methods["rec"], "t.pt", "s.yaml", "d.yaml").chain == []
    assert method_recipe(methods["ta"], "t.pt", "s.yaml", "d.yaml").chain == ["yolov8s.yaml"]  # a method's chain
    path.write_text("methods: [{name: a, kind: alone, chain: [yolov8s.yaml]}]")
    with pytest.raises(DetkdError, match="'chain' is for kind 'detkd' only"):
        load_profile(path)


# aggregation


def _run(
    method: str, seed: int, ap: float, seconds_per_epoch: float, memory: float, curve: list[float], epochs: int = 2
) -> dict:
    metrics = {k: ap for k in ("AP", "AP50", "AP75", "APs", "APm", "AR1", "AR10", "AR100", "ARs", "ARm")}
    metrics |= {"APl": -1.0, "ARl": -1.0}  # no large objects in the set
    return {
        "method": method,
        "seed": seed,
        "metrics": metrics,
        "epochs": epochs,
        "time_per_epoch_s": seconds_per_epoch,
        "peak_memory_mb": memory,
        "memory": "rss",
        "map_per_epoch": curve,
    }


RUNS = [
    _run("alone", 0, 0.30, 10.0, 900.0, [0.1, 0.2]),
    _run("alone", 1, 0.32, 12.0, 950.0, [0.2, 0.3]),
    _run("alone", 2, 0.34, 11.0, 920.0, [0.3, 0.4]),
    _run("kd", 0, 0.36, 16.5, 1200.0, [0.2, 0.4]),
    _run("kd", 1, 0.38, 16.5, 1100.0, [0.2, 0.4]),
    _run("cwd", 0, 0.31, 22.0, 1000.0, [0.1, 0.3]),
]


def test_mean_std_and_gap_closed():
    assert mean_std([0.30, 0.32, 0.34]) == pytest.approx({"mean": 0.32, "std": 0.02})
    assert mean_std([0.5]) == {"mean": 0.5, "std": None}
    assert gap_closed(0.37, 0.32, 0.42) == pytest.approx(0.5)
    assert gap_closed(0.30, 0.32, 0.42) == pytest.approx(-0.2)  # worse than alone: negative
    assert gap_closed(0.37, 0.32, 0.30) is None  # a teacher no better than the student closes no gap


def test_summarise_over_seeds_against_baseline_and_teacher():
    rows = {r["method"]: r for r in summarise(RUNS, ["alone", "kd", "cwd", "absent"], "alone", teacher_ap=0.42)}
    assert list(rows) == ["alone", "kd", "cwd"]
    alone, kd, cwd = rows["alone"], rows["kd"], rows["cwd"]
    assert alone["seeds"] == [0, 1, 2] and alone["metrics"]["AP"] == pytest.approx({"mean": 0.32, "std": 0.02})
    assert alone["gap_closed"] == 0 and alone["time_ratio"] == 1 and alone["gain_AP"] == 0
    assert kd["metrics"]["AP"]["mean"] == pytest.approx(0.37) and kd["gain_AP"] == pytest.approx(0.05)
    assert kd["gap_closed"] == pytest.approx(0.5) and kd["time_ratio"] == pytest.approx(1.5)
    assert kd["peak_memory_mb"] == 1200.0 and kd["map_per_epoch"] == pytest.approx([0.2, 0.4])
    assert alone["map_per_epoch"] == pytest.approx([0.2, 0.3])
    assert cwd["metrics"]["AP"]["std"] is None and cwd["time_ratio"] == pytest.approx(2.0)
    assert cwd["gap_closed"] == pytest.approx(-0.1)
    # paired by seed where both ran; gain/σ in the baseline's seed standard deviations (0.02), from 2 seeds on
    assert kd["paired_gains_AP"] == pytest.approx({0: 0.06, 1: 0.06}) and kd["gain_sigma"] == pytest.approx(2.5)
    assert cwd["paired_gains_AP"] == pytest.approx({0: 0.01}) and cwd["gain_sigma"] is None


def test_curves_of_runs_with_other_epochs_are_drawn_against_the_share_of_the_run():
    same = [{"map_per_epoch": [0.1, 0.2]}, {"map_per_epoch": [0.1, 0.3]}, {"map_per_epoch": []}]
    assert curve_axis(same) == ("epoch", [[1, 2], [1, 2], []])
    assert curve_axis([{"map_per_epoch": [0.1] * 4}, {"map_per_epoch": [0.2]}]) == (
        "% of the run",
        [[25.0, 50.0, 75.0, 100.0], [100.0]],
    )


def test_the_time_ratio_is_a_runs_so_that_methods_with_other_epochs_compare():
    """A method on twice the images in half the epochs (the iterations matched) costs what the baseline costs,
    though each of its epochs takes twice as long."""
    runs = [*RUNS[:3], _run("ceiling", 0, 0.4, 22.0, 900.0, [0.3], epochs=1)]
    rows = {r["method"]: r for r in summarise(runs, ["alone", "ceiling"], "alone", teacher_ap=None)}
    assert rows["alone"]["time_per_epoch_s"] == pytest.approx(11.0) and rows["ceiling"]["time_per_epoch_s"] == 22.0
    assert rows["ceiling"]["time_ratio"] == pytest.approx(1.0)


def test_a_ceiling_gives_the_share_of_its_difference_to_the_baseline_each_method_recovers():
    rows = {r["method"]: r for r in summarise(RUNS, ["alone", "kd", "cwd"], "alone", teacher_ap=0.42, ceiling="kd")}
    assert rows["cwd"]["labels_recovered"] == pytest.approx((0.31 - 0.32) / (0.37 - 0.32))
    assert rows["kd"]["labels_recovered"] == pytest.approx(1.0) and rows["alone"]["labels_recovered"] == 0
    assert all(r["labels_recovered"] is None for r in summarise(RUNS, ["alone", "kd"], "alone", teacher_ap=0.42))


def test_without_baseline_or_teacher_the_relative_columns_are_empty():
    rows = summarise(RUNS, ["kd"], "alone", teacher_ap=None)
    assert rows[0]["gap_closed"] is None and rows[0]["time_ratio"] is None and rows[0]["gain_AP"] is None


def test_read_curve_from_cumulative_time(tmp_path):
    csv = tmp_path / "results.csv"
    header = "epoch,time,train/box_loss,metrics/mAP50(B),metrics/mAP50-95(B)\n"
    csv.write_text(header + "1,29.2,5.8,0,0\n2,60.5,4.1,0.1,0.05\n3,90.0,3.5,0.2,0.12\n")
    assert read_curve(csv) == {"epochs": 3, "time_per_epoch_s": 30.0, "map_per_epoch": [0, 0.05, 0.12]}
    # resumed after epoch 2: Ultralytics' clock starts again (epoch 3 took 31 s, epoch 4 another 29 s)
    csv.write_text(header + "1,29.2,5.8,0,0\n2,60.5,4.1,0.1,0.05\n3,31.0,3.5,0.2,0.12\n4,60.3,3.4,0.2,0.13\n")
    assert read_curve(csv)["time_per_epoch_s"] == 30.2  # (60.5 + 31.0 + 29.3) / 4


# report


def test_report_written_from_fake_results(tmp_path):
    methods = summarise(RUNS, ["alone", "kd", "cwd"], "alone", teacher_ap=0.42)
    report = {
        "profile": "fake",
        "command": "python tools/benchmark.py --profile fake",
        "date": "2025-01-01T00:00:00",
        "machine": {"cpus": 2, "torch_threads": 2, "device": "AMD EPYC"},
        "data": {"synthetic": {"train": 450, "val": 150, "imgsz": 160, "seed": 0}, "yaml": None},
        "budget": {"epochs": 20, "imgsz": 160, "batch": 16, "train": {"nbs": 16}},
        "student": "yolov8n.yaml",
        "teacher": {"model": "yolov8s.yaml", "epochs": 60, "checkpoint": None, "metrics": {"AP": 0.42}},
        "baseline": "alone",
        "methods": methods,
        "runs": RUNS,
        "failed": ["runs/fgd_s0"],
    }
    methods[1]["chain"] = ["yolov8s.yaml"]  # kd through an assistant
    write_report(report, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["methods"][1]["method"] == "kd"
    md = (tmp_path / "results.md").read_text()
    assert "`python tools/benchmark.py --profile fake`" in md and "2 CPUs, 2 torch threads, AMD EPYC" in md
    assert "teacher yolov8s.yaml (60 epochs): AP 0.4200; baseline (alone): AP 0.3200 ± 0.0200" in md
    assert "budget: 20 epochs at 160 px, batch 16, nbs=16; student yolov8n.yaml" in md  # the budget's own keys
    assert "(a chain's counts its student's epochs only, not its assistants' training before them)" in md
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in md.splitlines())}
    assert rows["kd"][1] == "0.3700 ± 0.0141" and rows["kd"][6] == "n/a"
    assert rows["kd"][7:] == ["2", "+0.0500 (+0.0600, +0.0600)", "2.5", "50.0 %", "1.50×", "1200"]
    assert "labels recovered" not in md.lower()  # no ceiling: no such column
    # cwd: below the baseline's mean, above its seed 0; one seed, so no σ claim
    assert rows["cwd"][1] == "0.3100 ± —" and rows["cwd"][7:10] == ["1", "-0.0100 (+0.0100)", "—"]
    assert rows["alone"][8:11] == ["—", "0.0", "0.0 %"]
    assert "runs/fgd_s0" in md
    for png in ("map_vs_epoch.png", "gains.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# end to end: every kind of method through the real machinery (each run in its own process), resumed twice


def _finite_metrics(metrics: dict) -> bool:
    """COCO's 12 numbers, each in [0, 1] or COCO's -1 (no object of that size)."""
    return set(metrics) == set(COCO_METRICS) and all(v == -1 or 0 <= v <= 1 for v in metrics.values())


def test_tiny_benchmark_runs_every_kind_of_method_reports_and_resumes(synth_data, teacher_checkpoint, tmp_path, capsys):
    profile = tmp_path / "tiny.yaml"
    profile.write_text(
        f"data: {{yaml: {synth_data}}}\n"
        "budget: {epochs: 1, imgsz: 64, batch: 8, workers: 0}\n"
        "methods: [{name: alone, kind: alone}, {name: builtin, kind: builtin},\n"
        "          {name: logit, distill: {logit: {weight: 1.0}}}]\n"
    )
    out = tmp_path / "out"
    args = ["--profile", str(profile), "--out", str(out), "--teacher", str(teacher_checkpoint)]

    # a cut benchmark: the teacher's evaluation and one method
    assert main([*args, "--methods", "alone"]) == 0
    assert "[bench 2/2] alone seed 0: AP " in capsys.readouterr().out
    report = json.loads((out / "results.json").read_text())
    assert [m["method"] for m in report["methods"]] == ["alone"]
    (alone,) = report["runs"]
    assert alone["epochs"] == 1 and alone["time_per_epoch_s"] > 0 and alone["peak_memory_mb"] > 100
    assert _finite_metrics(report["teacher"]["metrics"]) and _finite_metrics(alone["metrics"])
    record = out / "runs" / "alone_s0" / "run.json"
    stamp = record.stat().st_mtime_ns

    # resumed: the other two run, side by side, the finished one is kept; the report lists every method
    assert main([*args, "--parallel", "2"]) == 0
    assert "3 runs, 2 to do, 2 side by side" in capsys.readouterr().out and record.stat().st_mtime_ns == stamp
    report = json.loads((out / "results.json").read_text())
    assert report["failed"] == [] and report["baseline"] == "alone"
    assert [(m["method"], m["kind"], m["seeds"]) for m in report["methods"]] == [
        ("alone", "alone", [0]),
        ("builtin", "builtin", [0]),
        ("logit", "detkd", [0]),
    ]
    assert all(_finite_metrics({k: v["mean"] for k, v in m["metrics"].items()}) for m in report["methods"])
    runs = {r["method"]: r for r in report["runs"]}
    assert all(r["epochs"] == 1 and len(r["map_per_epoch"]) == 1 for r in runs.values())
    assert all(_finite_metrics(r["metrics"]) for r in runs.values())
    assert runs["alone"]["metrics"] == alone["metrics"]
    builtin_log = (out / "runs" / "builtin_s0" / "results.csv").read_text()  # Ultralytics' own distillation ran
    logit_log = (out / "runs" / "logit_s0" / "results.csv").read_text()  # and detkd's, with its term logged
    assert "train/dis_loss" in builtin_log.splitlines()[0] and "train/kd_cls" in logit_log.splitlines()[0]
    md = (out / "results.md").read_text()
    assert all(f"| {name} | " in md for name in runs) and (out / "gains.png").is_file()
    assert "- logit: soft class targets ×1\n" in md and "- builtin: Ultralytics' built-in distillation" in md
    assert "a chain's counts" not in md  # no chain in this profile

    # nothing left: no run starts, no record is rewritten
    assert main(args) == 0
    assert "3 runs, 0 to do" in capsys.readouterr().out and record.stat().st_mtime_ns == stamp


def test_a_run_cut_after_an_epoch_resumes_instead_of_starting_over(synth_data, tmp_path):
    from ultralytics import YOLO

    from detkd.benchmark.jobs import run_in_child

    profile = tmp_path / "p.yaml"
    profile.write_text(
        f"data: {{yaml: {synth_data}}}\nbudget: {{epochs: 2, imgsz: 64, batch: 8, workers: 0}}\n"
        "methods: [{name: alone, kind: alone}]\n"
    )
    bench = Bench.prepare(load_profile(profile), tmp_path / "out")
    job = bench.job(bench.profile.methods[0], 0)
    run = Path(job.run_dir)
    run.mkdir(parents=True)
    (run / "job.json").write_text(json.dumps(asdict(job)))
    model = YOLO(job.model)

    def cut_after_first_epoch(trainer):
        if trainer.epoch == 0:
            raise KeyboardInterrupt  # what a killed process leaves: last.pt of epoch 1

    model.add_callback("on_model_save", cut_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        model.train(**job.train)
    (run / "bench.log").write_text("first part\n")

    assert run_in_child(job) == 0
    record = job.finished()
    assert record is not None and record["epochs"] == 2
    epochs = [line.split(",")[0].strip() for line in (run / "results.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2"]  # continued from epoch 2, not restarted
    assert (run / "bench.log").read_text().startswith("first part\n")  # the log goes on too

    # cut after training ended (before its record was written): evaluated again, not trained again
    (run / "run.json").unlink()
    stamp = (run / "results.csv").stat().st_mtime_ns
    assert run_in_child(job) == 0 and job.finished() is not None
    assert (run / "results.csv").stat().st_mtime_ns == stamp


def test_a_crops_backbone_is_pretrained_once_in_the_teachers_run(synth_data, tmp_path, monkeypatch):
    """``teacher: {backbone: crops}``: the teacher's job first trains the ResNet on object crops (with the profile's
    seed) beside its run folder, then starts the teacher from it; a rerun job (its folder wiped when it was cut
    before its first epoch ended) finds it trained and goes on."""
    import detkd.teacher_train
    from detkd.benchmark import jobs

    pretrained, trained = [], []

    def pretrain(out, settings, workers, device):
        pretrained.append(settings)
        Path(out).write_bytes(b"weights")

    monkeypatch.setattr(jobs, "pretrain_backbone", pretrain)
    monkeypatch.setattr(detkd.teacher_train, "train_teacher", lambda arch, data, **kw: trained.append(kw["backbone"]))
    profile = load_profile("frcnn")
    profile.data, profile.seeds = DataSpec(yaml=str(synth_data)), [3]
    teacher = Bench.prepare(profile, tmp_path).teacher
    Path(teacher.run_dir).mkdir(parents=True)  # as jobs.run_in_child makes it
    jobs._train(teacher)
    jobs._train(teacher)
    assert [(s.arch, s.seed) for s in pretrained] == [("resnet18", 3)]
    weights = Path(teacher.train["backbone"])
    assert trained == [str(weights)] * 2 and weights.parent == Path(teacher.run_dir).parent


def test_frcnn_profile_trains_a_torchvision_teacher_and_distils_with_its_second_stage(synth_data, tmp_path):
    profile = load_profile("frcnn")
    assert profile.teacher.model == "torchvision:fasterrcnn_resnet18_fpn" and profile.baseline == "alone"
    profile.data = DataSpec(yaml=str(synth_data))  # no generation of the profile's scenes
    bench = Bench.prepare(profile, tmp_path)
    assert bench.teacher.checkpoint == Path(bench.teacher.run_dir) / "teacher.pt"  # what detkd teacher train writes
    assert Path(bench.teacher.run_dir).name.startswith("torchvision_fasterrcnn_resnet18_fpn_e6_")
    assert bench.teacher.train["crops"]["arch"] == "resnet18" and bench.teacher.train["batch"] == 8  # teacher.batch
    jobs = {m.name: bench.job(m, 0) for m in profile.methods}
    assert all(j.recipe["teacher"] == str(bench.teacher.checkpoint) for n, j in jobs.items() if n != "alone")
    assert "second_stage" not in jobs["features"].recipe["distill"]  # at its defaults: left out of the cache key
    assert jobs["class"].recipe["distill"]["second_stage"] == {
        **jobs["frcnn"].recipe["distill"]["second_stage"],
        "box_weight": 0.0,
    }
    assert jobs["frcnn"].recipe["distill"] == load_recipe("frcnn").to_dict()["distill"]
    said = {m.name: describe_method(m, "yolov8n.yaml") for m in profile.methods}
    assert said["frcnn"] == (
        "second-stage class ×1 + second-stage box ×2.5 (top 50 + positives, IoU-aware class targets), off for the "
        "last 10 epochs"
    )
    assert "(top 50, positives left out, IoU-aware class targets)" in said["frcnn-positives"]

    # a backbone file for the teacher (detkd teacher backbone), or none: passed to detkd teacher train, each a
    # teacher of its own
    (tmp_path / "crops.pt").write_bytes(b"")
    profile.teacher.backbone = str(tmp_path / "crops.pt")
    started = Bench.prepare(profile, tmp_path).teacher
    assert started.train["backbone"] == str(tmp_path / "crops.pt") and started.run_dir != bench.teacher.run_dir
    profile.teacher.backbone = None
    scratch = Bench.prepare(profile, tmp_path).teacher
    assert "backbone" not in scratch.train and scratch.run_dir not in (started.run_dir, bench.teacher.run_dir)
    for text, message in (
        ("teacher: {model: yolov8s.yaml, backbone: crops.pt}", "'teacher.backbone' is for a torchvision:ARCH teacher"),
        ("teacher: {model: 'torchvision:fasterrcnn_resnet18_fpn', backbone: nope.pt}", "'teacher.backbone' file not"),
        (
            "teacher: {model: 'torchvision:fasterrcnn_mobilenet_v3_large_fpn', backbone: crops}",
            "'teacher.backbone: crops': torchvision:fasterrcnn_mobilenet_v3_large_fpn: its backbone is not a ResNet",
        ),
    ):
        (tmp_path / "b.yaml").write_text(text + "\nmethods: [{name: a, kind: alone}]")
        with pytest.raises(DetkdError, match=message):
            load_profile(tmp_path / "b.yaml")

    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: {model: 'torchvision:fasterrcnn_resnet7_fpn'}\nmethods: [{name: a, kind: alone}]")
    with pytest.raises(DetkdError, match=r"bad.yaml: 'teacher.model' torchvision:fasterrcnn_resnet7_fpn: unknown arch"):
        load_profile(bad)


def test_a_finished_run_stays_cached_when_a_recipe_key_is_added_since_at_its_default(synth_data, tmp_path):
    """A run saved before ``second_stage.iou_aware`` and ``positives`` existed is the same job today; one whose
    recipe differs is not (``run.json`` is then not trusted)."""
    profile = load_profile("frcnn")
    profile.data = DataSpec(yaml=str(synth_data))
    job = Bench.prepare(profile, tmp_path).job(next(m for m in profile.methods if m.name == "second_stage"), 0)
    saved = json.loads(json.dumps(asdict(job)))
    for key in ("iou_aware", "positives"):
        saved["recipe"]["distill"]["second_stage"].pop(key, None)
    assert job.same_as(saved)
    saved["recipe"]["distill"]["second_stage"]["topk"] = 7
    assert not job.same_as(saved) and not job.same_as(None)
